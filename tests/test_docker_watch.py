"""The container watcher's outcomes, with an SDK client that stands in for an engine (the real
engine's crash reporting is in tests/test_docker.py): an engine that goes away fails the model
with the engine named, not with a container state nobody could read."""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial import unittest

from llmswap.backends.docker import DockerBackend
from llmswap.backends.engine import DockerClientProvider
from llmswap.config.config import parse


class Container:
    status = "running"
    attrs: dict[str, Any] = {"State": {}}

    def reload(self) -> None:
        pass

    def start(self) -> None:
        pass


class Engine:
    """Answers inspects; its event stream blocks until ``vanish()``, then fails as a dead
    socket does."""

    def __init__(self) -> None:
        self.gone = threading.Event()
        self.containers = self

    def get(self, name: str) -> Container:
        return Container()

    def events(self, **kw: Any) -> Any:
        self.gone.wait(30)
        raise ConnectionResetError("Connection reset by peer")

    def vanish(self) -> None:
        self.gone.set()


class WatchTests(unittest.TestCase):
    @inlineCallbacks
    def test_an_engine_that_goes_away_fails_the_model_naming_the_engine(self) -> Any:
        config = parse({"models": {"a": {"backend_url": "http://a:1/v1", "container_name": "a"}},
                        "docker": {"base_url": "tcp://127.0.0.1:2376"}})  # fmt: skip
        provider = DockerClientProvider(config.docker)
        engine = Engine()
        provider._client = engine  # connected once
        backend = DockerBackend(config.models["a"], provider, reactor)
        exited: Deferred[str] = Deferred()
        backend.on_exit(exited.callback)
        yield backend.start()
        self.assertTrue(backend.alive())
        engine.vanish()
        reason = yield exited
        self.assertEqual(
            reason,
            "Docker engine at tcp://127.0.0.1:2376 unreachable: Connection reset by peer",
        )
        self.assertFalse(backend.alive())
        self.assertEqual(backend.failure_detail(), reason)
        self.assertEqual(backend.describe()["container_state"], "unknown")
