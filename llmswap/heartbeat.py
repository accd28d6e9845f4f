"""The heartbeat of streams waiting in the queue (their loading comments): one timer for all.

A client whose stream waits minutes for a model to load must keep seeing bytes, or it (or a
proxy in between) gives up.  (Not HTTP keep-alive, nor Ollama's ``keep_alive``: a model's
time loaded after its last request, :attr:`llmswap.swap.slot.Slot.keep_alive`.)

Every ``interval`` one LoopingCall says something to each waiting stream, and it runs only
while some stream waits: ten thousand waiting streams cost one timer and a set entry each, not
a timer, a LoopingCall and their Deferreds each.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from llmswap.relay.forward import started_writing
from llmswap.responses import sse_event

log = Logger()

T = TypeVar("T")


class Heartbeat(Service, Generic[T]):
    """Calls ``say(item)`` every ``interval()`` seconds for each item added and not discarded.

    The first call for an item comes within one interval of its arrival (the tick is shared).
    """

    def __init__(
        self, clock: IReactorTime, interval: Callable[[], float], say: Callable[[T], None]
    ) -> None:
        self._clock = clock
        self._interval = interval  # read at each start: a reload may change it
        self._say = say
        self._waiting: set[T] = set()
        self._loop: LoopingCall | None = None

    def add(self, item: T) -> None:
        self._waiting.add(item)
        if self._loop is None:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self._clock
            self._loop.start(self._interval(), now=False).addErrback(self._failed)

    def discard(self, item: T) -> None:
        self._waiting.discard(item)
        if not self._waiting:
            self._stop()

    def stopService(self) -> None:
        super().stopService()
        self._waiting.clear()
        self._stop()

    def _tick(self) -> None:
        for item in list(self._waiting):
            try:
                self._say(item)
            except Exception:  # one broken stream must not silence the others
                log.failure("loading comment failed; that stream gets no more")
                self._waiting.discard(item)

    def _failed(self, failure: Failure) -> None:
        log.failure("heartbeat timer failed; the next waiting stream restarts it", failure)
        self._loop = None

    def _stop(self) -> None:
        if self._loop is not None:
            loop, self._loop = self._loop, None
            loop.stop()


def say_waiting(
    request: IRequest,
    model: str,
    loading: bool,
    waited: float,
    usual: float | None,
    reasoning: bool,
    now: float,
) -> None:
    """What a waiting stream is told: an SSE comment, so clients and proxies keep the
    connection, or (``loading_status: reasoning``) a ``reasoning_content`` delta chat clients
    show as thinking: "loading gemma3, 12 s, usually 40 s"."""
    if not started_writing(request):
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
    status = f"{'loading' if loading else 'queued for'} {model}, {waited:.0f} s"
    if not reasoning:
        request.write(f": {status}\n\n".encode())
        return
    if usual:
        status += f", usually {usual:.0f} s"
    delta = {"role": "assistant", "reasoning_content": status + "\n"}
    choice = {"index": 0, "delta": delta, "finish_reason": None}
    chunk = {"id": "llmswap-loading", "object": "chat.completion.chunk", "created": int(now),
             "model": model, "choices": [choice]}  # fmt: skip
    request.write(sse_event(json.dumps(chunk).encode()))
