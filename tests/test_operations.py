"""Operating llmswap on real sockets and backend processes: API keys and limits with the official
client, Prometheus metrics after a known sequence, configuration reload under load."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import openai
import yaml
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.logger import ILogObserver, globalLogPublisher

from llmswap.config.config import load
from tests.fakebackend import live_peers
from tests.support import Daemon, samples, wait_for
from tests.test_daemon import DaemonTestCase, overlaps, starts

ALICE = "sk-alice-0123456789abcdefghij"
BOB = "sk-bob-0123456789abcdefghijkl"
ADMIN = "sk-admin-0123456789abcdefghij"


class AccessAndMetricsTests(DaemonTestCase):
    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            self.logged.append(json.dumps(event, default=str))

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def keyed_post(self, key: str | None, payload: Any) -> Any:
        headers = {"Authorization": [f"Bearer {key}"]} if key else {}
        return self.post("/v1/chat/completions", payload, headers=headers)

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.daemon.url + "/v1", api_key=key, max_retries=0, timeout=30
        )

    def start_with_keys(self, **extra: Any) -> None:
        self.start(
            {"a": self.fake("a"), "b": self.fake("b")},
            auth={
                "keys": [
                    {"name": "alice", "key": ALICE, "models": ["a"], "max_concurrent": 1},
                    {"name": "bob", "key_env": "LLMSWAP_TEST_BOB", "rpm": 1},
                    {"name": "ops", "key": ADMIN, "admin": True},
                ]
            },
            **extra,
        )

    @inlineCallbacks
    def test_keys_with_the_official_client_and_nothing_leaks(self) -> Any:
        os.environ["LLMSWAP_TEST_BOB"] = BOB
        self.addCleanup(os.environ.pop, "LLMSWAP_TEST_BOB")
        self.start_with_keys()
        chat = self.client(ALICE).chat.completions.create
        r = yield self.in_thread(chat, model="a", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(r.choices[0].message.content, "Hello from a")
        with self.assertRaises(openai.PermissionDeniedError):
            yield self.in_thread(chat, model="b", messages=[{"role": "user", "content": "hi"}])
        bad = self.client("sk-nobody-0123456789abcdefghij").chat.completions.create
        with self.assertRaises(openai.AuthenticationError):
            yield self.in_thread(bad, model="a", messages=[{"role": "user", "content": "hi"}])
        models = yield self.in_thread(self.client(ALICE).models.list)
        self.assertEqual([m.id for m in models.data], ["a"])
        # The backend never sees llmswap's keys; the log shows names, never keys.
        response = yield self.keyed_post(ALICE, {"model": "a"})
        self.assertEqual(response.headers.getRawHeaders("x-got-api-key"), ["no"])
        yield response.text()
        line = "POST /v1/chat/completions model=a key=alice"
        yield wait_for(lambda: line in "\n".join(self.logged))  # access lines come in batches
        text = "\n".join(self.logged)
        for secret in (ALICE, BOB, ADMIN, "sk-nobody"):
            self.assertNotIn(secret, text)

    @inlineCallbacks
    def test_access_log_can_be_turned_off_while_metrics_still_count(self) -> Any:
        self.start({"a": self.fake("a")}, access_log=False)
        response = yield self.post("/v1/chat/completions", {"model": "a"})
        self.assertEqual(response.code, 200)
        yield response.text()
        metrics = yield self.http.get(self.daemon.url + "/metrics")
        got = samples((yield metrics.text()))
        answered = ("llmswap_requests_total", (("key", "-"), ("model", "a"), ("status", "200")))
        self.assertEqual(got[answered], 1.0)
        yield self.daemon.stop()  # stopping passes on every access line still held
        # The default logs this line (test_keys_with_the_official_client_and_nothing_leaks).
        self.assertNotIn("POST /v1/chat/completions model=a", "\n".join(self.logged))
        self.assertIn("swap (none) -> a", "\n".join(self.logged))  # other lines were observed

    @inlineCallbacks
    def test_a_key_at_its_limits_gets_429_and_others_still_get_through(self) -> Any:
        os.environ["LLMSWAP_TEST_BOB"] = BOB
        self.addCleanup(os.environ.pop, "LLMSWAP_TEST_BOB")
        self.start_with_keys()
        held = self.keyed_post(ALICE, {"model": "a", "fake_sleep": 1.0})
        yield wait_for(lambda: self.daemon.service.health()["in_flight"] == 1)
        response = yield self.keyed_post(ALICE, {"model": "a"})
        body = yield response.json()
        self.assertEqual(response.code, 429)
        self.assertEqual(body["error"]["code"], "too_many_concurrent_requests")
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        # bob: one request per minute.
        first = yield self.keyed_post(BOB, {"model": "b"})
        second = yield self.keyed_post(BOB, {"model": "b"})
        self.assertEqual(second.code, 429)
        retry = int(second.headers.getRawHeaders("retry-after")[0])
        # The token refills within the minute (the exact value is checked on a Clock in
        # test_api; real time has passed here).
        self.assertTrue(1 <= retry <= 60, retry)
        self.assertEqual((yield second.json())["error"]["code"], "rate_limit_exceeded")
        self.assertEqual(first.code, 200)
        yield first.text()
        r = yield held
        self.assertEqual(r.code, 200)
        yield r.text()

    @inlineCallbacks
    def test_metrics_after_a_known_sequence(self) -> Any:
        self.start({"a": self.fake("a"), "b": self.fake("b")})
        for model in ("a", "a", "b"):
            r, _ = yield self.post_json("/v1/chat/completions", {"model": model})
            self.assertEqual(r.code, 200)
        stream = yield self.post("/v1/chat/completions", {"model": "b", "stream": True})
        yield stream.text()
        r, _ = yield self.post_json("/v1/chat/completions", {"model": "nope"})
        self.assertEqual(r.code, 404)
        response = yield self.http.get(self.daemon.url + "/metrics")
        self.assertEqual(response.code, 200)
        got = samples((yield response.text()))

        def value(name: str, **labels: str) -> float:
            return got.get((name, tuple(sorted(labels.items()))), 0.0)

        self.assertEqual(value("llmswap_requests_total", model="a", status="200", key="-"), 2)
        self.assertEqual(value("llmswap_requests_total", model="b", status="200", key="-"), 2)
        self.assertEqual(value("llmswap_requests_total", model="-", status="404", key="-"), 1)
        self.assertEqual(value("llmswap_swaps_total", **{"from": "none", "to": "a"}), 1)
        self.assertEqual(value("llmswap_swaps_total", **{"from": "a", "to": "b"}), 1)
        self.assertEqual(value("llmswap_load_seconds_count", model="b"), 1)
        self.assertEqual(value("llmswap_queue_wait_seconds_count", model="a"), 2)
        self.assertEqual(value("llmswap_time_to_first_token_seconds_count", model="b"), 1)
        # The fake reports usage of 3 prompt + 3 completion tokens per chat answer.
        self.assertEqual(value("llmswap_tokens_total", model="a", direction="prompt"), 6)
        self.assertEqual(value("llmswap_tokens_total", model="a", direction="completion"), 6)
        self.assertEqual(value("llmswap_model_state", model="b", state="ready"), 1)
        self.assertEqual(value("llmswap_model_state", model="a", state="stopped"), 1)
        self.assertEqual(value("llmswap_queue_depth", model="a"), 0)


class ReloadTests(DaemonTestCase):
    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.path = Path(self.mktemp() + ".yaml")
        self.logs = os.path.abspath(self.mktemp())

    def write(self, models: dict[str, Any], **extra: Any) -> None:
        self.path.write_text(yaml.safe_dump({"models": models, "log_dir": self.logs, **extra}))

    def serve(self, models: dict[str, Any], **extra: Any) -> None:
        """Write the configuration file and run a daemon from it (so it can reload it)."""
        self.write(models, **extra)
        self.daemon = Daemon.from_config(load(self.path), self.logs)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    @inlineCallbacks
    def test_reload_under_load_applies_changes_and_refuses_a_bad_file(self) -> Any:
        a, b = self.fake("a"), self.fake("b")
        self.serve({"a": a, "b": b})
        # Two requests for a run while the file changes under them: a is changed, b removed,
        # c added.
        running = [
            self.post_json("/v1/chat/completions", {"model": "a", "fake_sleep": 1.0})
            for _ in range(2)
        ]
        yield wait_for(lambda: self.daemon.service.health()["models"]["a"]["in_flight"])
        self.write({"a": {**a, "startup_timeout": 25}, "c": self.fake("c")})
        reloaded, body = yield self.post_json("/admin/reload", {})
        self.assertEqual(reloaded.code, 200, body)
        self.assertEqual(body["changes"], {"added": ["c"], "removed": ["b"], "changed": ["a"]})
        for d in running:  # not dropped: a drained before it was replaced
            r, answer = yield d
            self.assertEqual(r.code, 200, answer)
        r, models = yield self.post_json("/v1/chat/completions", {"model": "b"})
        self.assertEqual((r.code, models["error"]["code"]), (404, "model_not_found"))
        for model in ("a", "c"):
            r, _ = yield self.post_json("/v1/chat/completions", {"model": model})
            self.assertEqual(r.code, 200)
        self.assertEqual(starts(self.ledger), ["a", "a", "c"])

        self.path.write_text("models:\n  a: {cmd: x, backend_url: 'http://x/v1', tll: 3}\n")
        refused, body = yield self.post_json("/admin/reload", {})
        self.assertEqual(refused.code, 400)
        self.assertEqual(body["error"]["code"], "invalid_config")
        self.assertIn("unknown key 'models.a.tll' (did you mean 'ttl'?)", body["error"]["message"])
        r, _ = yield self.post_json("/v1/chat/completions", {"model": "c"})
        self.assertEqual(r.code, 200)
        self.assertEqual(len(live_peers(self.ledger)), 1)
        self.assertEqual(overlaps(self.ledger), [])

    @inlineCallbacks
    def test_concurrent_requests_during_reload_all_get_an_answer(self) -> Any:
        a = self.fake("a")
        self.serve({"a": a}, queue_size=40)
        calls = [
            self.post_json("/v1/chat/completions", {"model": "a", "fake_sleep": 0.05})
            for _ in range(20)
        ]
        self.write({"a": {**a, "stop_timeout": 3}}, queue_size=40)
        reload = self.post_json("/admin/reload", {})
        results = yield DeferredList([*calls, reload], fireOnOneErrback=True)
        codes = [r[1][0].code for r in results]
        self.assertEqual(codes, [200] * 21)
        self.assertEqual(overlaps(self.ledger), [])

    @inlineCallbacks
    def test_reload_removing_a_model_whose_request_outlives_the_drain(self) -> Any:
        a = self.fake("a", drain_timeout=0.3)
        self.serve({"a": a})
        stuck = self.post("/v1/chat/completions", {"model": "a", "fake_sleep": 30})
        service = self.daemon.service
        yield wait_for(lambda: service.health()["in_flight"] == 1)
        self.write({"c": self.fake("c")})
        r, body = yield self.post_json("/admin/reload", {})
        self.assertEqual((r.code, body["changes"]["removed"]), (200, ["a"]))
        # The request that outlived the drain was cut off with its backend, and the books
        # balance: nothing counts as in flight for the model that is gone.
        yield stuck.addCallbacks(lambda r: r.text(), lambda f: None)
        yield wait_for(lambda: service.health()["in_flight"] == 0)
        self.assertEqual(list(service.health()["models"]), ["c"])
        r, _ = yield self.post_json("/v1/chat/completions", {"model": "c"})
        self.assertEqual(r.code, 200)
        self.assertEqual(overlaps(self.ledger), [])

    @inlineCallbacks
    def test_reload_turns_access_control_on(self) -> Any:
        a = self.fake("a")
        self.serve({"a": a})
        r, _ = yield self.post_json("/v1/chat/completions", {"model": "a"})
        self.assertEqual(r.code, 200)
        self.write({"a": a}, auth={"keys": [{"name": "ops", "key": ADMIN, "admin": True}]})
        r, body = yield self.post_json("/admin/reload", {})
        self.assertEqual((r.code, body["changes"]["changed"]), (200, []))
        r, body = yield self.post_json("/v1/chat/completions", {"model": "a"})
        self.assertEqual((r.code, body["error"]["code"]), (401, "invalid_api_key"))
        # From now on even the reload needs the admin key.
        r, _ = yield self.post_json("/admin/reload", {})
        self.assertEqual(r.code, 401)
        response = yield self.post(
            "/admin/reload", {}, headers={"Authorization": [f"Bearer {ADMIN}"]}
        )
        self.assertEqual(response.code, 200)
        yield response.text()
