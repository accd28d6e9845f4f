"""The pipe: a backend's response body copied to the client as it arrives.

It exists from the moment the request is sent: its one timer measures the backend's silence (no
response headers, or no body bytes, for ``idle_timeout``) across the whole exchange.
"""

from __future__ import annotations

from collections import deque
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IRequest

from llmswap.interfaces import IAnswerWriter


class Pipe(Protocol):
    """Copies a backend response body to the client request (or its writer) as it arrives;
    ``done`` fires at its end, ``abort`` cuts it (and the request, while unanswered)."""

    def __init__(
        self,
        request: IRequest,
        clock: IReactorTime,
        idle_timeout: float,
        writer: IAnswerWriter | None,
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self._request = request
        # Where the body goes: the client as it is, or a writer that translates it.
        self._write = request.write if writer is None else writer.data
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall = clock.callLater(idle_timeout, self._went_idle)
        self.unanswered: Deferred[Any] | None = None  # the request, until its headers arrive
        self.idle = False
        # The body's end was its framing's (a length, a last chunk), not just a closed connection.
        self.framed = False
        self.first_at: float | None = None
        # The last chunks, for the usage object at the end: kept, not parsed, per chunk.
        self.tail: deque[bytes] = deque(maxlen=4)
        # A whole answer held until its last byte (see Relay): None when passed on as it comes.
        self.held: list[bytes] | None = None

    def hold(self) -> None:
        """Keep the body until its end instead of writing it: a backend that dies in the
        middle then leaves nothing written, and the client gets an error, not half a body."""
        self.held = []
        self._write = self.held.append

    def answered(self) -> None:
        self.unanswered = None
        self._timer.reset(self._idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        self._timer.reset(self._idle_timeout)
        if self.first_at is None:
            self.first_at = self._clock.seconds()
        self.tail.append(data)
        self._write(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.stop_timer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self.framed = reason.check(ResponseDone) is not None
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def abort(self) -> None:
        if self.unanswered is not None:
            self.unanswered.cancel()
        elif self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def stop_timer(self) -> None:
        if self._timer.active():
            self._timer.cancel()

    def _went_idle(self) -> None:
        self.idle = True
        self.abort()
