"""The Activity view's data: the last finished requests, with their figures.

Kept in memory (``console.activity`` requests, about 0.5 KB each) from the event stream's
:class:`~llmswap.events.RequestEnded`; with ``console.history`` also written to SQLite through
``twisted.enterprise.adbapi`` (its own thread: the reactor never waits on the disk), in batches
once a second, read back at start so the view survives a restart, and pruned to
``console.history_days``.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmswap.config.config import Console
from llmswap.console.history import HistoryService, history
from llmswap.events import EventBus, RequestEnded

log = Logger()

FIELDS = (
    "at", "path", "model", "key", "status", "stream", "queue_wait", "ttft", "duration",
    "prompt_tokens", "completion_tokens", "tokens_per_s", "console",
)  # fmt: skip
_FLUSH_SECONDS = 1.0
_PRUNE_SECONDS = 3600.0
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS activity (at REAL, path TEXT, model TEXT, key TEXT, "
    "status INTEGER, stream INTEGER, queue_wait REAL, ttft REAL, duration REAL, "
    "prompt_tokens INTEGER, completion_tokens INTEGER, tokens_per_s REAL, console INTEGER)"
)


def record(e: RequestEnded) -> dict[str, Any]:
    """One row: tokens per second as the backend measured them, else estimated from the time
    after the first byte (streams) or after the wait (whole answers)."""
    speed = e.tokens_per_second
    if speed is None and e.completion_tokens:
        start = e.first_byte if e.first_byte is not None else (e.queue_wait or 0.0)
        generating = e.duration - start
        speed = e.completion_tokens / generating if generating > 0 else None
    return {
        "at": e.at, "path": e.path, "model": e.model, "key": e.key, "status": e.status,
        "stream": e.stream, "queue_wait": e.queue_wait, "ttft": e.first_byte,
        "duration": e.duration, "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "tokens_per_s": round(speed, 1) if speed is not None else None,
        "console": e.console,  # the playground's
    }  # fmt: skip


class Activity(HistoryService):
    """The last ``console.activity`` finished requests, newest last."""

    name = "activity"

    def __init__(self, bus: EventBus, clock: IReactorTime, console: Console) -> None:
        super().__init__(clock)
        self._console = console
        self._rows: deque[dict[str, Any]] = deque(maxlen=console.activity)
        # Bounded: a history that cannot keep up (a full or stalled disk) loses its oldest.
        self._unsaved: deque[dict[str, Any]] = deque(maxlen=console.activity)
        self._failing = False  # the last write to the history failed
        bus.subscribe(RequestEnded, self._ended)

    def recent(
        self,
        model: str | None = None,
        key: str | None = None,
        status: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Newest first, filtered."""
        out = []
        for row in reversed(self._rows):
            if model is not None and row["model"] != model:
                continue
            if key is not None and row["key"] != key:
                continue
            if status is not None and row["status"] != status:
                continue
            out.append(row)
            if len(out) >= limit:
                break
        return out

    def _ended(self, e: RequestEnded) -> None:
        row = record(e)
        self._rows.append(row)
        if self._db is not None:
            self._unsaved.append(row)

    # -- history ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.open_history(self._console.history, "activity")

    @inlineCallbacks
    def _open(self, path: str) -> Generator[Deferred[Any], Any, None]:
        db = yield history(path, _SCHEMA, "CREATE INDEX IF NOT EXISTS activity_at ON activity (at)")
        try:
            columns = yield db.runQuery("PRAGMA table_info(activity)")
            if "console" not in {c[1] for c in columns}:  # a file of an earlier llmswap
                yield db.runOperation("ALTER TABLE activity ADD COLUMN console INTEGER")
        except BaseException:  # read-only, say: unusable, and closed
            db.close()
            raise
        self._db = db
        yield self._prune()
        rows = yield db.runQuery(
            f"SELECT {', '.join(FIELDS)} FROM activity ORDER BY at DESC LIMIT ?",
            (self._console.activity,),
        )
        loaded = [dict(zip(FIELDS, r, strict=True)) for r in reversed(rows)]
        for row in loaded:
            row["stream"], row["console"] = bool(row["stream"]), bool(row["console"])
        self._rows = deque([*loaded, *self._rows], maxlen=self._console.activity)
        self.every(_FLUSH_SECONDS, self._flush)
        self.every(_PRUNE_SECONDS, self._prune)

    def _flush(self) -> Deferred[Any]:
        rows = list(self._unsaved)
        self._unsaved.clear()
        if self._db is None or not rows:
            return succeed(None)
        values = [tuple(r[f] for f in FIELDS) for r in rows]
        marks = ", ".join("?" * len(FIELDS))

        def insert(cursor: sqlite3.Cursor) -> None:
            cursor.executemany(f"INSERT INTO activity ({', '.join(FIELDS)}) VALUES ({marks})",
                               values)  # fmt: skip

        def written(_: object) -> None:
            if self._failing:
                log.info("activity history {path} written again", path=self._console.history)
            self._failing = False

        def failed(f: Failure) -> None:
            # A full disk must not stop the history for good, nor grow memory while it lasts:
            # the rows not written wait for the next flush, the newest ``activity`` of them.
            waiting = rows + list(self._unsaved)  # oldest first; the deque keeps the newest
            self._unsaved.clear()
            self._unsaved.extend(waiting)
            if not self._failing:
                log.warn("activity history {path} not written ({e}); trying again each second",
                         path=self._console.history, e=f.value)  # fmt: skip
            self._failing = True

        d: Deferred[Any] = self._db.runInteraction(insert)
        return d.addCallbacks(written, failed)

    def _prune(self) -> Deferred[Any]:
        assert self._db is not None
        cutoff = self._clock.seconds() - self._console.history_days * 86400
        d: Deferred[Any] = self._db.runOperation("DELETE FROM activity WHERE at < ?", (cutoff,))
        # A prune that fails (the disk is full) is tried again in an hour.
        return d.addErrback(lambda f: log.warn("activity history not pruned: {e}", e=f.value))
