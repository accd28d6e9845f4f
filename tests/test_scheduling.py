"""The scheduler's promises on real backend processes: concurrency, drain, TTL, preload, budget,
loading feedback, admin calls.  The fakes' own ledger witnesses what ran at the same time."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import DeferredList, inlineCallbacks

from tests.fakebackend import live_peers
from tests.support import read_ledger, wait_for
from tests.test_daemon import DaemonTestCase, overlaps, starts


def served(ledger: str, name: str) -> list[tuple[float, float]]:
    return [
        (e["begin"], e["end"])
        for e in read_ledger(ledger)
        if e["event"] == "served" and e["name"] == name
    ]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(b, 1) for b, _ in intervals] + [(e, -1) for _, e in intervals])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def first_start(ledger: str, name: str) -> float:
    return float(
        min(e["t"] for e in read_ledger(ledger) if e["event"] == "start" and e["name"] == name)
    )


class SchedulingTests(DaemonTestCase):
    timeout = 120

    def chat_json(self, model: str, **extra: Any) -> Any:
        return self.post_json("/v1/chat/completions", {"model": model, **extra})

    @inlineCallbacks
    def test_concurrency_two_runs_two_requests_at_once_and_no_more(self) -> Any:
        self.start({"par": self.fake("par", concurrency=2)})
        results = yield DeferredList(
            [self.chat_json("par", fake_sleep=1.0) for _ in range(4)], fireOnOneErrback=True
        )
        self.assertEqual([r[1][0].code for r in results], [200] * 4)
        self.assertEqual(most_at_once(served(self.ledger, "par")), 2)

    @inlineCallbacks
    def test_evicted_model_drains_its_requests_before_it_is_stopped(self) -> Any:
        # b's bound is short, so b evicts a while a still runs two requests.
        self.start(
            {"a": self.fake("a", concurrency=2), "b": self.fake("b", max_wait_before_swap=0.2)}
        )
        service = self.daemon.service
        long_ones = [self.chat_json("a", fake_sleep=1.5) for _ in range(2)]
        yield wait_for(lambda: service.health()["models"]["a"]["in_flight"] == 2)
        b = self.chat_json("b")
        yield wait_for(lambda: service.manager.state("a") == "draining")
        # a has a free slot no more: a request arriving now waits for b's turn.
        late = self.chat_json("a")
        for d in [*long_ones, b, late]:
            r, body = yield d
            self.assertEqual(r.code, 200, body)
        first_two = sorted(served(self.ledger, "a"))[:2]
        self.assertLess(max(end for _, end in first_two), first_start(self.ledger, "b"))
        late_begin = max(begin for begin, _ in served(self.ledger, "a"))
        b_served = served(self.ledger, "b")[0]
        self.assertGreater(late_begin, b_served[1])
        self.assertEqual(starts(self.ledger), ["a", "b", "a"])
        self.assertEqual(overlaps(self.ledger), [])

    @inlineCallbacks
    def test_drain_timeout_stops_the_model_anyway(self) -> Any:
        self.start({"a": self.fake("a", drain_timeout=0.5), "b": self.fake("b")})
        stuck = self.chat_json("a", fake_sleep=30)
        yield wait_for(lambda: self.daemon.service.health()["models"]["a"]["in_flight"] == 1)
        response, _ = yield self.chat_json("b")
        self.assertEqual(response.code, 200)
        # The stuck request was cut off with the backend, not left hanging.
        yield stuck.addErrback(lambda f: None)
        self.assertEqual(overlaps(self.ledger), [])

    @inlineCallbacks
    def test_idle_ttl_unloads_the_model(self) -> Any:
        self.start({"a": self.fake("a", ttl=0.5)})
        response, _ = yield self.chat_json("a")
        self.assertEqual(response.code, 200)
        yield wait_for(lambda: not live_peers(self.ledger), timeout=10)
        # Started once, then stopped by llmswap (SIGTERM), not by a crash or a second start.
        events = [e["event"] for e in read_ledger(self.ledger) if e["event"] != "served"]
        self.assertEqual(events, ["start", "sigterm"])
        health = yield self.health()
        self.assertEqual(health["models"]["a"]["state"], "stopped")

    @inlineCallbacks
    def test_preload_starts_a_model_before_any_request(self) -> Any:
        self.start({"a": self.fake("a"), "b": self.fake("b")}, preload=["b"])
        yield wait_for(lambda: self.daemon.service.manager.state("b") == "ready")
        self.assertEqual(starts(self.ledger), ["b"])
        self.assertEqual(len(live_peers(self.ledger)), 1)

    @inlineCallbacks
    def test_two_models_share_a_budget_and_a_third_evicts_the_least_recently_used(self) -> Any:
        # max_peers=2: a fake reports an overlap only when it sees two others alive.
        models = {n: self.fake(n, memory="4GiB", max_peers=2) for n in ("a", "b", "c")}
        self.start(models, devices={"gpu0": {"memory": "10GiB"}})
        for name in ("a", "b"):
            response, _ = yield self.chat_json(name)
            self.assertEqual(response.code, 200)
        self.assertEqual(len(live_peers(self.ledger)), 2)
        self.assertEqual(starts(self.ledger), ["a", "b"])
        response, _ = yield self.chat_json("c")
        self.assertEqual(response.code, 200)
        health = yield self.health()
        self.assertEqual(sorted(health["loaded_models"]), ["b", "c"])
        self.assertEqual(health["models"]["a"]["state"], "stopped")
        self.assertEqual(len(live_peers(self.ledger)), 2)
        self.assertEqual(overlaps(self.ledger), [])

    @inlineCallbacks
    def test_swap_aware_serves_interleaved_requests_with_one_load_per_model(self) -> Any:
        self.start({n: self.fake(n, startup_delay=0.3) for n in ("a", "b", "c")}, queue_size=20)
        service = self.daemon.service
        first = self.chat_json("a", fake_sleep=2.0)
        yield wait_for(lambda: service.health()["in_flight"] == 1)
        rest = []
        for i in range(12):  # a, b, c, a, b, c, ... in this arrival order
            rest.append(self.chat_json("abc"[i % 3]))
            yield wait_for(lambda n=i + 1: service.health()["queue_size"] == n)
        results = yield DeferredList([first, *rest], fireOnOneErrback=True)
        self.assertEqual([r[1][0].code for r in results], [200] * 13)
        self.assertEqual(sorted(starts(self.ledger)), ["a", "b", "c"])
        self.assertEqual(overlaps(self.ledger), [])

    @inlineCallbacks
    def test_waiting_stream_gets_loading_comments_then_its_events(self) -> Any:
        self.start({"slow": self.fake("slow", startup_delay=1.5)}, keepalive_interval=0.3)
        response = yield self.post("/v1/chat/completions", {"model": "slow", "stream": True})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        text = (yield response.text()).split("\n\n")
        comments = [t for t in text if t.startswith(":")]
        events = [t for t in text if t.startswith("data: ")]
        self.assertTrue(comments, text)
        self.assertRegex(comments[0], r"^: (loading|queued for) slow, \d+ s$")
        self.assertLess(text.index(comments[-1]), text.index(events[0]))
        self.assertEqual(events[-1], "data: [DONE]")
        # The official client skips the comments and reads the stream as usual.
        yield self.daemon.service.manager.unload("slow")
        chunks = yield self.chat("slow", stream=True).addCallback(lambda s: self.in_thread(list, s))
        self.assertTrue(any(c.choices and c.choices[0].delta.content for c in chunks))

    @inlineCallbacks
    def test_waiting_stream_whose_backend_answers_an_error_gets_it_as_an_event(self) -> Any:
        self.start({"slow": self.fake("slow", startup_delay=1.0)}, keepalive_interval=0.2)
        payload = {"model": "slow", "stream": True, "fake_status": 400}
        response = yield self.post("/v1/chat/completions", payload)
        self.assertEqual(response.code, 200)  # committed by the loading comments
        text = yield response.text()
        event = [t for t in text.split("\n\n") if t.startswith("data: ")]
        self.assertEqual(len(event), 1, text)
        error = json.loads(event[0][len("data: ") :])["error"]
        self.assertEqual((error["message"], error["code"]), ("fake failure", "teapot"))

    @inlineCallbacks
    def test_waiting_stream_whose_model_fails_gets_an_error_event(self) -> Any:
        self.start(
            {"bad": self.fake("bad", never_ready=True, startup_timeout=1)}, keepalive_interval=0.2
        )
        response = yield self.post("/v1/chat/completions", {"model": "bad", "stream": True})
        self.assertEqual(response.code, 200)
        text = yield response.text()
        event = [t for t in text.split("\n\n") if t.startswith("data: ")]
        error = json.loads(event[-1][len("data: ") :])["error"]
        self.assertEqual(error["code"], "model_startup_timeout")

    @inlineCallbacks
    def test_queue_position_header_and_health_queue_view(self) -> Any:
        self.start({"a": self.fake("a"), "b": self.fake("b")})
        held = self.chat_json("a", fake_sleep=1.0)
        yield wait_for(lambda: self.daemon.service.health()["in_flight"] == 1)
        later = self.post("/v1/chat/completions", {"model": "b"})
        yield wait_for(lambda: self.daemon.service.health()["queue_size"] == 1)
        health = yield self.health()
        self.assertEqual([q["model"] for q in health["queue"]], ["b"])
        self.assertEqual(health["models"]["b"]["waiting"], 1)
        first, _ = yield held
        response = yield later
        self.assertEqual(response.headers.getRawHeaders("x-llmswap-queue-position"), ["1"])
        # b waited behind a's whole request and a swap; a was admitted at once.
        wait_b = float(response.headers.getRawHeaders("x-llmswap-queue-wait")[0])
        wait_a = float(first.headers.getRawHeaders("x-llmswap-queue-wait")[0])
        self.assertGreater(wait_b, wait_a)
        yield response.text()

    @inlineCallbacks
    def test_admin_load_unload_and_unload_all(self) -> Any:
        self.start({"a": self.fake("a"), "b": self.fake("b")})
        r, body = yield self.post_json("/admin/models/a/load", {})
        self.assertEqual((r.code, body), (200, {"model": "a", "state": "ready"}))
        self.assertEqual(len(live_peers(self.ledger)), 1)
        r, body = yield self.post_json("/admin/models/b/load", {})
        self.assertEqual(body["state"], "ready")
        self.assertEqual(starts(self.ledger), ["a", "b"])
        r, body = yield self.post_json("/admin/models/b/unload", {})
        self.assertEqual((r.code, body), (200, {"model": "b", "state": "stopped"}))
        yield wait_for(lambda: not live_peers(self.ledger))
        yield self.post_json("/admin/models/a/load", {})
        r, body = yield self.post_json("/admin/unload", {})
        self.assertEqual((r.code, body), (200, {"models": {"a": "stopped", "b": "stopped"}}))
        self.assertEqual(live_peers(self.ledger), [])
        r, body = yield self.post_json("/admin/models/nope/load", {})
        self.assertEqual((r.code, body["error"]["code"]), (404, "model_not_found"))
        self.assertEqual(overlaps(self.ledger), [])

    @inlineCallbacks
    def test_priority_header_is_validated_when_enabled(self) -> Any:
        self.start({"a": self.fake("a")}, priority_header="X-Priority")
        response = yield self.post(
            "/v1/chat/completions", {"model": "a"}, headers={"X-Priority": ["high"]}
        )
        body = yield response.json()
        self.assertEqual(response.code, 400)
        self.assertEqual(body["error"]["code"], "invalid_priority")
        response = yield self.post(
            "/v1/chat/completions", {"model": "a"}, headers={"X-Priority": ["5"]}
        )
        self.assertEqual(response.code, 200)
        yield response.text()
