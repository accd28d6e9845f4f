"""The console's history file (``console.history``): SQLite through ``twisted.enterprise.adbapi``,
one connection in one thread, so the reactor never waits on the disk and writes land in order.

:class:`HistoryService` is what the services that keep rows there share (the activity, the
failed requests): opening the file while the daemon starts, timers that stop with it, and a
last flush before the file is closed.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


@inlineCallbacks
def history(path: str, *schema: str) -> Generator[Deferred[Any], Any, adbapi.ConnectionPool]:
    """The history file, its ``schema`` made."""
    db = adbapi.ConnectionPool("sqlite3", path, check_same_thread=False, cp_min=1, cp_max=1)
    try:
        for statement in schema:
            yield db.runOperation(statement)
    except BaseException:
        db.close()
        raise
    return db


class HistoryService(Service):
    """A service whose rows are also kept in the history file, when there is one."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._db: adbapi.ConnectionPool | None = None
        self._opening: Deferred[Any] = succeed(None)
        self._loops: list[LoopingCall] = []

    def _open(self, path: str) -> Deferred[Any]:
        """Open the file and read back what it keeps (setting ``_db``, starting timers)."""
        raise NotImplementedError

    def _flush(self) -> Deferred[Any]:
        """Write what is not written yet."""
        raise NotImplementedError

    def open_history(self, path: str | None, what: str) -> None:
        """From ``startService``: open ``path``, if any; a file that cannot be used is logged
        and the service goes on in memory."""
        if path:
            self._opening = self._open(path).addErrback(
                lambda f: log.failure("{what} history {path} unusable", f, what=what, path=path)
            )

    def every(self, seconds: float, call: Callable[[], Deferred[Any]]) -> None:
        """Run ``call`` every ``seconds`` until the service stops."""
        loop = LoopingCall(call)
        loop.clock = self._clock
        loop.start(seconds, now=False).addErrback(lambda f: log.failure("history", f))
        self._loops.append(loop)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()
        yield self._opening  # a stop during the start closes the database after it is read
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._db is not None:
            try:
                yield self._flush()
            finally:
                self._db.close()
                self._db = None
