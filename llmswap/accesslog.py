"""The access log: one line per ended request, handed to the log observers in batches.

It follows the event stream's :class:`~llmswap.events.RequestEnded` events.

What a request's log line costs is its formatting by the log observer (timestamp, text).  Done
one line at a time right after each answer, that cost about 0.1 ms of CPU per request at
concurrency 1, a sixth of all llmswap added; the same formatting run back to back for a batch
costs a small fraction of it (measured, docs/benchmarks.md).  So access events are held and
passed on ``delay`` seconds after the first of a batch, each still its own event carrying the
time it was made: the log reads the same, at most ``delay`` later (as nginx's ``access_log ...
flush=``).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogPublisher
from zope.interface import implementer

from llmswap.errors import printable
from llmswap.events import EventBus, RequestEnded

# Seconds.  Batches of about 15 lines at 1,500 requests/s already cost what a longer delay's
# would per line, while a larger batch delays the request that arrives during its flush (p99:
# 1.1 ms at 10 ms, 1.4 at 20 ms, 2.5 at 100 ms; 0.9-1.0 ms without access log).
FLUSH_DELAY = 0.01


@implementer(ILogObserver)
class AccessLog(Service):
    """Log a line for each ended request while ``enabled()``; lines reach ``observer`` at
    most ``delay`` later.

    Until the service runs and once it stopped, events pass at once: nothing is held that a
    stopping daemon could lose.
    """

    name = "access log"

    def __init__(
        self,
        clock: IReactorTime,
        bus: EventBus,
        enabled: Callable[[], bool] = lambda: True,
        observer: ILogObserver = globalLogPublisher,
        delay: float = FLUSH_DELAY,
    ) -> None:
        self.logger = Logger(namespace="llmswap.access", observer=self)
        self._enabled = enabled  # read per request: a reload may turn the log on or off
        bus.subscribe(RequestEnded, self._ended)
        self._clock = clock
        self._observer = observer
        self._delay = delay
        self._held: list[LogEvent] = []
        self._flush: IDelayedCall | None = None

    def _ended(self, e: RequestEnded) -> None:
        if not self._enabled():
            return
        # The line, formatted here once, is the event's format string (braces escaped: the
        # model name is the client's text), so the log observer has no field to look up; the
        # fields stay in the event for structured (JSON) observers.
        line = (
            f"{printable(e.method)} {printable(e.path)} model={printable(e.model)} key={e.key} "
            f"stream={e.stream} "
            f"status={e.status} queue_wait={e.queue_wait or 0.0:.3f}s duration={e.duration:.3f}s"
        )
        self.logger.info(
            line.replace("{", "{{").replace("}", "}}"),
            model=e.model,
            key=e.key,
            status=e.status,
            queue_wait=e.queue_wait,
            duration=e.duration,
        )

    def __call__(self, event: LogEvent) -> None:
        if not self.running:
            self._observer(event)
            return
        self._held.append(event)
        if self._flush is None:
            self._flush = self._clock.callLater(self._delay, self._pass_on)

    def stopService(self) -> None:
        super().stopService()
        if self._flush is not None:
            self._flush.cancel()
        self._pass_on()

    def _pass_on(self) -> None:
        self._flush = None
        held, self._held = self._held, []
        for event in held:
            self._observer(event)
