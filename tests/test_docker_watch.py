"""The container watcher's outcomes, with an SDK client that stands in for an engine (the real
engine's crash reporting is in tests/test_docker.py): an engine that goes away fails the model
with the engine named, not with a container state nobody could read."""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.task import deferLater
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


class SlowStart:
    """A container whose engine takes its start call until ``go`` is set (or a stop comes);
    what the engine did, in order."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.status = "created"
        self.attrs: dict[str, Any] = {"State": {}}
        self.calls: list[str] = []
        self.containers = self

    def get(self, name: str) -> SlowStart:
        return self

    def events(self, **kw: Any) -> Any:
        return self  # a stream with no event: it is closed when watching stops

    def __iter__(self) -> Any:
        return iter(())

    def close(self) -> None:
        pass

    def logs(self, **kw: Any) -> bytes:
        return b""

    def reload(self) -> None:
        pass

    def start(self) -> None:
        self.go.wait(30)
        self.status = "running"
        self.calls.append("start")

    def stop(self, timeout: int) -> None:
        self.status = "exited"
        self.calls.append("stop")
        self.go.set()  # a stop sent while the start is under way: the engine does both

    def wait(self, **kw: Any) -> None:
        pass


class CancelledStartTests(unittest.TestCase):
    @inlineCallbacks
    def test_a_start_given_up_while_the_engine_starts_the_container_is_stopped_after_it(
        self,
    ) -> Any:
        """llmswap stops while a container's start call is with its engine: the start is given
        up at once, and the stop (``stop_on_exit``) reaches the engine after the start did,
        so the container does not run on, untracked."""
        engine_at = {"base_url": "tcp://127.0.0.1:2376", "stop_on_exit": True}
        config = parse({"models": {"a": {"backend_url": "http://a:1/v1", "container_name": "a"}},
                        "docker": engine_at})  # fmt: skip
        provider = DockerClientProvider(config.docker)
        engine = SlowStart()
        provider._client = engine
        backend = DockerBackend(config.models["a"], provider, reactor)
        starting = backend.start()
        starting.cancel()
        yield self.assertFailure(starting, CancelledError)
        shut = backend.shutdown()
        # Time for a stop sent at once to reach the engine (it would end the start there);
        # the stop that waits for the start lets it end now.
        yield deferLater(reactor, 0.2, engine.go.set)
        yield shut
        self.assertEqual(engine.calls, ["start", "stop"])
        self.assertEqual(engine.status, "exited")
        self.assertFalse(backend.alive())
