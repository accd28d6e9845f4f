"""In-memory fakes for testing code built on llmswap, as ``treq.testing`` is for treq.

:class:`MemoryBackend` is an :class:`~llmswap.interfaces.IBackend` that starts and stops at
once and records what it was asked; :class:`MemoryHTTP` answers the swap manager's health polls
from those backends.  With a ``twisted.internet.task.Clock`` they drive a real
:class:`~llmswap.swap.manager.SwapManager` through swaps, timeouts and crashes in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from llmswap.interfaces import IBackend


@implementer(IBackend)
class MemoryBackend:
    """A backend that is up the moment it is started; ``log`` records "start NAME"/"stop NAME".

    Set ``healthy = False`` to make it never answer its health URL; :meth:`crash` makes it exit
    by itself.  ``asleep`` is its sleep mode's state (see :class:`MemoryHTTP`); set
    ``sleepy = False`` to make it ignore sleep requests.
    """

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.running = False
        self.healthy = True
        self.asleep = False
        self.sleepy = True
        self.log = log
        # Process ids it reports while it runs (a test's own process, to be measured).
        self.processes: list[int] = []
        self.printed: list[str] = []  # what print() made the server "print"
        self._followers: list[Callable[[str], None]] = []
        self._exit: Callable[[str], None] | None = None

    def start(self) -> Deferred[None]:
        self.log.append(f"start {self.name}")
        self.running = True
        return succeed(None)

    def stop(self) -> Deferred[None]:
        if self.running:
            self.log.append(f"stop {self.name}")
        self.running = self.asleep = False
        return succeed(None)

    def adopt(self) -> Deferred[bool]:
        return succeed(self.running)

    def shutdown(self) -> Deferred[None]:
        return self.stop()

    def alive(self) -> bool:
        return self.running

    def on_exit(self, callback: Callable[[str], None]) -> None:
        self._exit = callback

    def crash(self, reason: str = "exited with code 9") -> None:
        self.running = False
        assert self._exit is not None, "crash() before the manager watched this backend"
        self._exit(reason)

    def pids(self) -> list[int]:
        return list(self.processes) if self.running else []

    def describe(self) -> dict[str, Any]:
        return {"kind": "memory", "running": self.running}

    def failure_detail(self) -> str:
        return "exited with code 9"

    def print(self, text: str) -> None:
        self.printed.append(text)
        for line in list(self._followers):
            line(text)

    def output(self, lines: int) -> Deferred[list[str]]:
        return succeed(self.printed[-lines:])

    def follow(self, line: Callable[[str], None]) -> Callable[[], None]:
        self._followers.append(line)
        return lambda: self._followers.remove(line)


class _Response:
    def __init__(self, code: int, body: bytes = b"") -> None:
        self.code = code
        self.body = body

    def collect(self, _: Any) -> Deferred[None]:
        return succeed(None)

    def content(self) -> Deferred[bytes]:
        return succeed(self.body)


class MemoryHTTP:
    """Answers GETs of ``http://NAME:PORT/...`` from backend NAME's state: 200 when it runs and
    is healthy, 503 otherwise (as llama-server while loading).  Its vLLM sleep API: POST
    ``/sleep`` and ``/wake_up`` (logged as "sleep NAME"/"wake NAME"), GET ``/is_sleeping``."""

    def __init__(self, backends: Mapping[str, MemoryBackend]) -> None:
        self.backends = backends

    def _backend(self, url: str) -> MemoryBackend:
        return self.backends[url.split("/")[2].split(":")[0]]

    def get(self, url: str) -> Deferred[_Response]:
        b = self._backend(url)
        if url.endswith("/is_sleeping") and b.running:
            return succeed(_Response(200, json.dumps({"is_sleeping": b.asleep}).encode()))
        return succeed(_Response(200 if b.running and b.healthy else 503))

    def post(self, url: str, data: bytes, headers: Any) -> Deferred[_Response]:
        b = self._backend(url)
        path = url.split("/", 3)[3].split("?")[0]
        if not b.running or path not in ("sleep", "wake_up"):
            return succeed(_Response(404))
        b.log.append(f"{path.removesuffix('_up')} {b.name}")
        if b.sleepy:
            b.asleep = path == "sleep"
        return succeed(_Response(200))
