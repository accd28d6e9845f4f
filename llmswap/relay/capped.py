"""A backend's control answer read whole (``/props``, ``/v1/models``), capped and cancellable.

treq's ``content()`` cannot be cancelled: a timeout on it fails the caller but leaves the
connection open, and a backend that keeps sending is buffered without limit.  Here a timeout
(a cancel) or a body over its cap stops the transfer, which closes that connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from llmswap.interfaces import BackendResponse

MOST = 1024 * 1024  # a control answer larger than this is not one


class TooLarge(Exception):
    """The answer passed its cap."""


class _Body(Protocol):
    def __init__(self, most: int) -> None:
        self._most = most
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._most:
            self._stop()
            if not self.done.called:
                self.done.errback(TooLarge(f"over {self._most} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._stop()

    def _stop(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


def read(response: BackendResponse, most: int = MOST) -> Deferred[bytes]:
    """The whole body of ``response``; cancelling it (a timeout) closes the connection."""
    body = _Body(most)
    response.deliverBody(body)
    return body.done
