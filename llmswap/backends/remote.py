"""Remote models (``remote: {url, key_env}``): an always-on OpenAI-compatible endpoint.

Another llmswap, a vLLM cluster, a hosted API: llmswap neither starts nor stops it, and it holds
no memory llmswap accounts for, so it is ready from start-up and a request for it never waits
behind a local swap; it still goes through the same keys, limits, queue, metrics and activity.
Its key (from the environment) replaces whatever key the client sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from llmswap.config.model import ModelConfig
from llmswap.interfaces import IBackend


@implementer(IBackend)
class RemoteBackend:
    def __init__(self, model: ModelConfig) -> None:
        self.name = model.name
        self._url = model.backend_url

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def adopt(self) -> Deferred[bool]:
        return succeed(True)

    def shutdown(self) -> Deferred[None]:
        return succeed(None)

    def alive(self) -> bool:
        return True

    def on_exit(self, callback: Callable[[str], None]) -> None:
        """It never exits: it is not llmswap's process."""

    def pids(self) -> list[int]:
        return []  # not on this host, not llmswap's

    def describe(self) -> dict[str, Any]:
        return {"kind": "remote", "url": self._url}

    def failure_detail(self) -> str:
        return "remote endpoint"

    def output(self, lines: int) -> Deferred[list[str]]:
        return succeed([f"(a remote endpoint at {self._url}: its output is not llmswap's)"])

    def follow(self, line: Callable[[str], None]) -> Callable[[], None]:
        return lambda: None
