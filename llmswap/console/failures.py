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

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmswap.config.config import Console
from llmswap.console.activity import record
from llmswap.console.history import HistoryService, history
from llmswap.events import EventBus, RequestEnded, failed

log = Logger()

SENT_BYTES = 4096
ANSWER_BYTES = 2048
OUTPUT_LINES = 40
LINE_CHARS = 500  # of each output line kept
_FLUSH_SECONDS = 1.0
_OUTPUT_SECONDS = 5.0
_SCHEMA = "CREATE TABLE IF NOT EXISTS failures (at REAL, document TEXT)"


def _text(data: bytes, limit: int) -> str:
    text = data[:limit].decode("utf-8", "replace")
    return text + f"\n[… {len(data) - limit} more bytes]" if len(data) > limit else text


class Failures(HistoryService):
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
        super().__init__(clock)
        self._console = console
        self._model_state = model_state
        self._output = output
        self._kept: deque[dict[str, Any]] = deque(maxlen=console.failures)
        self._ids = itertools.count(1)
        self._unsaved: deque[dict[str, Any]] = deque(maxlen=console.failures)
        # The failures waiting for a read of their model's output under way, and that read.
        self._reading: dict[str, tuple[deque[dict[str, Any]], Deferred[Any]]] = {}
        self._closing = False  # stopping: a failure from now on is kept without its output
        bus.subscribe(RequestEnded, self._ended)

    def recent(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Newest first."""
        return list(itertools.islice(reversed(self._kept), limit))

    def _ended(self, e: RequestEnded) -> None:
        if not failed(e.status) or self._console.failures == 0:
            return
        document = {
            **record(e), "id": next(self._ids), "method": e.method, "error": e.error,
            "request": _text(e.sent, SENT_BYTES), "answer": _text(e.answer, ANSWER_BYTES),
            "state": self._model_state(e.model) if e.configured else None, "output": None,
        }  # fmt: skip
        self._kept.append(document)
        if not e.configured:
            self._save(document)
            return
        reading = self._reading.get(e.model)
        if reading is not None:  # a flood of failures shares one read of the output
            reading[0].append(document)
            return
        lines = None if self._closing else self._output(e.model, OUTPUT_LINES)
        if lines is None:
            self._save(document)
            return
        # Bounded as the ring: those pushed out of it need no output.
        waiting = deque([document], maxlen=self._console.failures)
        self._reading[e.model] = (waiting, lines)
        lines.addTimeout(_OUTPUT_SECONDS, self._clock)

        def got(found: list[str]) -> list[str]:
            return [line[:LINE_CHARS] for line in found[-OUTPUT_LINES:]]

        def missed(f: Failure) -> list[str]:
            return [f"[llmswap: the backend's output could not be read: {f.getErrorMessage()}]"]

        def read(output: list[str]) -> None:
            del self._reading[e.model]
            for each in waiting:
                each["output"] = output
                self._save(each)

        lines.addCallbacks(got, missed).addCallback(read)
        lines.addErrback(lambda f: log.failure("a failure's output", f))

    # -- history ----------------------------------------------------------------------------

    def _save(self, document: dict[str, Any]) -> None:
        if self._db is not None:
            self._unsaved.append(document)  # bounded: a flood keeps the newest

    def _flush(self) -> Deferred[Any]:
        """Write what failed since the last flush, in one transaction; only the newest
        ``console.failures`` are kept (only they are ever read back)."""
        if self._db is None or not self._unsaved:
            return succeed(None)
        rows = [(d["at"], json.dumps(d)) for d in self._unsaved]
        self._unsaved.clear()

        def insert(cursor: sqlite3.Cursor) -> None:
            cursor.executemany("INSERT INTO failures VALUES (?, ?)", rows)
            cursor.execute(
                "DELETE FROM failures WHERE at < (SELECT MIN(at) FROM (SELECT at FROM failures "
                "ORDER BY at DESC LIMIT ?))",
                (self._console.failures,),
            )

        d: Deferred[Any] = self._db.runInteraction(insert)
        return d.addErrback(lambda f: log.warn("failed requests not kept in the history: {e}",
                                               e=f.value))  # fmt: skip

    def startService(self) -> None:
        super().startService()
        if self._console.failures:
            self.open_history(self._console.history, "failed requests")

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        # Reads of output under way end first (within their timeout): the failures waiting
        # for them are kept with it, and no timer outlives the service.  Requests the
        # shutdown answers later start none.
        self._closing = True
        yield gatherResults([read for _, read in self._reading.values()], consumeErrors=True)
        yield HistoryService.stopService(self)

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
        self.every(_FLUSH_SECONDS, self._flush)
        older = [json.loads(r[0]) for r in reversed(rows)]
        for document in older:  # ids are this run's: unique, not kept across restarts
            document["id"] = next(self._ids)
        self._kept = deque([*older, *self._kept], maxlen=self._console.failures)
