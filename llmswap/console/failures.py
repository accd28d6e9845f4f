"""The console's failed requests: the last ``console.failures`` requests that failed or were cut,
with what it takes to find out why.

Each keeps its Activity row's figures, the request body (its first 4 KiB; never a header, so
never a key), the backend's status and first bytes of answer, llmswap's own error, the model's
state and error at that moment, and the backend's last output lines then (read once, in a
thread for a log file).  With ``console.history`` they are kept in the same SQLite file, so a
restart keeps them.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmswap.config.config import Console
from llmswap.console.activity import history, record
from llmswap.events import EventBus, RequestEnded

log = Logger()

SENT_BYTES = 4096
ANSWER_BYTES = 2048
OUTPUT_LINES = 40
_OUTPUT_SECONDS = 5.0
_SCHEMA = "CREATE TABLE IF NOT EXISTS failures (at REAL, document TEXT)"


def failed(e: RequestEnded) -> bool:
    """An error answer, a cut one (0) or a client that left (499)."""
    return e.status >= 400 or e.status == 0


def _text(data: bytes, limit: int) -> str:
    text = data[:limit].decode("utf-8", "replace")
    return text + f"\n[… {len(data) - limit} more bytes]" if len(data) > limit else text


class Failures(Service):
    """The last failed requests, newest last; each a document the console shows as it is."""

    name = "failures"

    def __init__(
        self,
        bus: EventBus,
        clock: IReactorTime,
        console: Console,
        model_state: Callable[[str], dict[str, Any] | None],
        output: Callable[[str, int], Deferred[list[str]] | None],
    ) -> None:
        self._clock = clock
        self._console = console
        self._model_state = model_state
        self._output = output
        self._kept: deque[dict[str, Any]] = deque(maxlen=console.failures)
        self._ids = itertools.count(1)
        self._db: adbapi.ConnectionPool | None = None
        self._opening: Deferred[Any] = succeed(None)
        self._writes: set[Deferred[Any]] = set()
        bus.subscribe(RequestEnded, self._ended)

    def recent(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Newest first."""
        return list(itertools.islice(reversed(self._kept), limit))

    def _ended(self, e: RequestEnded) -> None:
        if not failed(e) or self._console.failures == 0:
            return
        document = {
            **record(e), "id": next(self._ids), "method": e.method, "error": e.error,
            "request": _text(e.sent, SENT_BYTES), "answer": _text(e.answer, ANSWER_BYTES),
            "state": self._model_state(e.model) if e.configured else None, "output": None,
        }  # fmt: skip
        self._kept.append(document)
        lines = self._output(e.model, OUTPUT_LINES) if e.configured else None
        if lines is None:
            self._save(document)
            return
        lines.addTimeout(_OUTPUT_SECONDS, self._clock)

        def got(found: list[str]) -> None:
            document["output"] = found[-OUTPUT_LINES:]

        def missed(f: Failure) -> None:
            document["output"] = [f"[llmswap: the backend's output could not be read: "
                                  f"{f.getErrorMessage()}]"]  # fmt: skip

        lines.addCallbacks(got, missed).addBoth(lambda _: self._save(document))

    # -- history ----------------------------------------------------------------------------

    def _save(self, document: dict[str, Any]) -> None:
        if self._db is None:
            return
        row = (document["at"], json.dumps(document))

        def insert(cursor: sqlite3.Cursor) -> None:
            cursor.execute("INSERT INTO failures VALUES (?, ?)", row)
            # Only the newest are ever read back; the rest go now, not in an hourly prune.
            cursor.execute(
                "DELETE FROM failures WHERE at < (SELECT MIN(at) FROM (SELECT at FROM failures "
                "ORDER BY at DESC LIMIT ?))",
                (self._console.failures,),
            )

        d: Deferred[Any] = self._db.runInteraction(insert)
        d.addErrback(lambda f: log.warn("failed request not kept in the history: {e}",
                                        e=f.value))  # fmt: skip
        self._writes.add(d)
        d.addBoth(lambda _: self._writes.discard(d))

    def startService(self) -> None:
        super().startService()
        path = self._console.history
        if path and self._console.failures:
            self._opening = self._open(path)
            self._opening.addErrback(lambda f: log.failure("failures history unusable", f))

    @inlineCallbacks
    def _open(self, path: str) -> Generator[Deferred[Any], Any, None]:
        db = yield history(path, _SCHEMA)
        cutoff = self._clock.seconds() - self._console.history_days * 86400
        try:
            yield db.runOperation("DELETE FROM failures WHERE at < ?", (cutoff,))
            rows = yield db.runQuery(
                "SELECT document FROM failures ORDER BY at DESC LIMIT ?", (self._console.failures,)
            )
        except BaseException:
            db.close()
            raise
        self._db = db
        older = [json.loads(r[0]) for r in reversed(rows)]
        for document in older:  # ids are this run's: unique, not kept across restarts
            document["id"] = next(self._ids)
        self._kept = deque([*older, *self._kept], maxlen=self._console.failures)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()
        yield self._opening
        yield DeferredList(list(self._writes))  # each has its errback
        if self._db is not None:
            self._db.close()
            self._db = None
