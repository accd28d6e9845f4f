"""The router API's model objects in memory: status words, and a loaded backend's ``meta``
asked once per load, shared, and given up on after its timeout (a backend that stalls never
holds ``/v1/models``, ``/models`` or the event stream)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from llmswap.config.config import parse
from llmswap.events import ModelState
from llmswap.llamacpp.listing import Meta, entry, status
from llmswap.swap.snapshot import ModelSnapshot, Snapshot

FAKE = {"cmd": "x", "backend_url": "http://127.0.0.1:1/v1"}
CONFIG = parse({"models": {"a": dict(FAKE), "b": {**FAKE, "info": {"context_length": 4096}}}})


def snapshot(state: ModelState, since: float = 1.0, error: str | None = None) -> Snapshot:
    instances = {
        n: ModelSnapshot(n, state, error, since, 0.0, None, 0, 0, None, {}) for n in ("a", "b")
    }
    return Snapshot(0.0, True, "swap-aware", 50, 0, 0, (), instances)


class Transport:
    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class Response:
    def __init__(self, body: Any, stall: bool = False) -> None:
        self.code = 200
        self._body = body
        self._stall = stall
        self.transport = Transport()

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self.transport)
        if not self._stall:
            protocol.dataReceived(json.dumps(self._body).encode())
            protocol.connectionLost(Failure(ResponseDone()))


class HTTP:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.asked: list[str] = []

    def get(self, url: str) -> Deferred[Any]:
        self.asked.append(url)
        return self.answer() if callable(self.answer) else succeed(self.answer)

    def post(self, url: str, *, data: bytes, headers: Any) -> Deferred[Any]:
        raise AssertionError("the listing only reads")


def test_status_words_and_a_failure_with_its_exit_code() -> None:
    words = {state: status(snapshot(state).instances["a"])["value"] for state in ModelState}
    assert words == {ModelState.STOPPED: "unloaded", ModelState.STARTING: "loading",
                     ModelState.READY: "loaded", ModelState.DRAINING: "loaded",
                     ModelState.STOPPING: "loaded", ModelState.ASLEEP: "sleeping",
                     ModelState.FAILED: "unloaded"}  # fmt: skip
    failed = snapshot(ModelState.FAILED, error="exited with code 3 while loading")
    assert status(failed.instances["a"]) == {
        "value": "unloaded", "args": [], "preset": "", "exit_code": 3, "failed": True
    }  # fmt: skip
    shown = entry(CONFIG, "b", failed.instances["b"], 7, None)
    assert "meta" not in shown and shown["llmswap"]["state"] == "failed"


def test_meta_is_asked_once_per_load_and_shared() -> None:
    http = HTTP(Response({"data": [{"id": "a", "meta": {"n_ctx": 2048}}]}))
    meta = Meta(http, Clock())
    ready = snapshot(ModelState.READY)
    got: list[Any] = []
    for _ in range(3):
        meta.of(CONFIG, ready, ["a"]).addCallback(got.append)
    assert got == [{"a": {"n_ctx": 2048}}] * 3
    assert len(http.asked) == 1
    meta.of(CONFIG, snapshot(ModelState.READY, since=9.0), ["a"]).addCallback(got.append)
    assert len(http.asked) == 2  # loaded again: asked again
    meta.of(CONFIG, snapshot(ModelState.STOPPED), ["a", "b"]).addCallback(got.append)
    assert got[-1] == {}  # not loaded: no meta, nothing asked
    assert len(http.asked) == 2


def test_a_backend_that_stalls_is_given_up_on() -> None:
    clock = Clock()
    stalled = Response(None, stall=True)
    answers: list[Any] = [Deferred, stalled]  # no headers; headers, no body
    for answer in answers:
        meta = Meta(HTTP(answer), clock)
        got: list[Any] = []
        meta.of(CONFIG, snapshot(ModelState.READY), ["a", "b"]).addCallback(got.append)
        meta.of(CONFIG, snapshot(ModelState.READY), ["a"]).addCallback(got.append)
        assert got == []
        clock.advance(2.5)
        # Without an answer: none for a, the configured context length for b.
        assert sorted(got, key=len) == [{}, {"b": {"n_ctx": 4096}}]
    assert stalled.transport.stopped  # the stalled body's connection is closed, not left


def test_an_answer_over_its_cap_is_cut() -> None:
    meta = Meta(HTTP(Response({"data": [{"meta": {"pad": "x" * (2 << 20)}}]})), Clock())
    got: list[Any] = []
    meta.of(CONFIG, snapshot(ModelState.READY), ["a"]).addCallback(got.append)
    assert got == [{}]
