"""The Logs view's data: llmswap's own log, and each backend's output.

llmswap's own log is kept as the last ``console.log_lines`` log events, as they are: formatting
a line costs more than keeping it, so a line is formatted only when a console reads or follows
it.  Backends' output comes from their drivers (:meth:`llmswap.interfaces.IBackend.output` and
``follow``): a process's log file and live output, a container's log through the engine.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.application.service import Service
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogPublisher,
    formatEvent,
    formatTime,
    globalLogPublisher,
)
from zope.interface import implementer


def line(event: LogEvent) -> str:
    level = event.get("log_level")
    text = formatEvent(event).replace("\n", "\n    ")
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n    " + failure.getTraceback().rstrip().replace("\n", "\n    ")
    when = formatTime(event.get("log_time"), timeFormat="%Y-%m-%d %H:%M:%S")
    return f"{when} {level.name if level else '-'} [{event.get('log_namespace', '-')}] {text}"


@implementer(ILogObserver)
class OwnLog(Service):
    """The last ``size`` events of llmswap's log, and the consoles that follow it."""

    name = "own log"

    def __init__(self, size: int, publisher: LogPublisher = globalLogPublisher) -> None:
        self._events: deque[LogEvent] = deque(maxlen=size)
        self._publisher = publisher
        self._followers: list[Callable[[str], None]] = []

    def __call__(self, event: LogEvent) -> None:
        self._events.append(event)
        for follower in list(self._followers):
            follower(line(event))

    def startService(self) -> None:
        super().startService()
        self._publisher.addObserver(self)

    def stopService(self) -> None:
        super().stopService()
        self._publisher.removeObserver(self)
        self._followers.clear()

    def lines(self, count: int) -> list[str]:
        return [line(e) for e in list(self._events)[-count:]]

    def follow(self, follower: Callable[[str], None]) -> Callable[[], None]:
        self._followers.append(follower)
        return lambda: self._followers.remove(follower) if follower in self._followers else None
