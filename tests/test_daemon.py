"""llmswap in-process on real sockets, fake backends as real processes, real OpenAI clients."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import openai
import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from llmswap.backends import session
from llmswap.backends.stopping import StopRecord
from tests.fakebackend import live_peers, live_processes
from tests.support import (
    FAKE,
    HI,
    Daemon,
    fake_model,
    free_port,
    in_thread,
    read_ledger,
    samples,
    signal_backend,
    terminate,
    wait_for,
)


def starts(ledger: str) -> list[str]:
    return [e["name"] for e in read_ledger(ledger) if e["event"] == "start"]


def overlaps(ledger: str) -> list[dict[str, Any]]:
    return [e for e in read_ledger(ledger) if e["event"] == "overlap"]


@pytest.mark.slow
class DaemonTestCase(unittest.TestCase):
    timeout = 90

    def setUp(self) -> None:
        # Clients get their own threads: in real life they are other processes, and the
        # reactor's pool is the daemon's (name resolution, Docker calls).
        self.client_threads = ThreadPool(minthreads=0, maxthreads=50, name="test-clients")
        self.client_threads.start()
        self.addCleanup(self.client_threads.stop)
        self.ledger = os.path.abspath(self.mktemp())
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))

    def start(self, models: dict[str, Any], **globals_: Any) -> Daemon:
        daemon = Daemon(models, os.path.abspath(self.mktemp()), **globals_)
        daemon.start()
        self.addCleanup(daemon.stop)
        self.daemon = daemon
        return daemon

    def fake(self, name: str, **opts: Any) -> dict[str, Any]:
        return fake_model(name, self.ledger, **opts)

    def post(self, path: str, payload: Any, raw: bytes | None = None, **kw: Any) -> Any:
        body = raw if raw is not None else json.dumps(payload).encode()
        headers = {"Content-Type": ["application/json"], **kw.pop("headers", {})}
        return self.http.post(self.daemon.url + path, data=body, headers=headers, **kw)

    @inlineCallbacks
    def post_json(self, path: str, payload: Any) -> Any:
        response = yield self.post(path, payload)
        body = yield response.json()
        return response, body

    @inlineCallbacks
    def health(self) -> Any:
        response = yield self.http.get(self.daemon.url + "/health")
        return (yield response.json())

    def in_thread(self, f: Any, *args: Any, **kw: Any) -> Any:
        return in_thread(self.client_threads, f, *args, **kw)

    def chat(self, model: str, **kw: Any) -> Any:
        # Generous: a busy shared machine may take long, and no test is about wall-clock time.
        client = self.daemon.client(timeout=120)
        return self.in_thread(client.chat.completions.create, model=model, messages=HI, **kw)

    def assert_one_at_a_time(self) -> None:
        self.assertEqual(overlaps(self.ledger), [])


class OpenAIClientTests(DaemonTestCase):
    @inlineCallbacks
    def test_chat_swaps_models_one_at_a_time(self) -> Any:
        self.start({"alpha": self.fake("alpha"), "beta": self.fake("beta")})
        first = yield self.chat("alpha")
        self.assertEqual(first.choices[0].message.content, "Hello from alpha")
        stream = yield self.chat("beta", stream=True)
        chunks = yield self.in_thread(list, stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        self.assertEqual(text, "t0 t1 t2 t3 t4 ")
        again = yield self.chat("alpha")
        self.assertEqual(again.choices[0].message.content, "Hello from alpha")
        self.assertEqual(starts(self.ledger), ["alpha", "beta", "alpha"])
        health = yield self.health()
        self.assertEqual(health["current_model"], "alpha")
        self.assertEqual(health["models"]["alpha"]["state"], "ready")
        self.assertEqual(health["models"]["beta"]["state"], "stopped")
        self.assert_one_at_a_time()

    @inlineCallbacks
    def test_completions_embeddings_and_models(self) -> Any:
        self.start({"alpha": self.fake("alpha"), "beta": self.fake("beta")})
        client = self.daemon.client()
        done = yield self.in_thread(client.completions.create, model="alpha", prompt="Say")
        self.assertEqual(done.choices[0].text, " completed by alpha")
        emb = yield self.in_thread(client.embeddings.create, model="beta", input="x")
        self.assertEqual(emb.data[0].embedding, [0.25, 0.5, 0.75])
        models = yield self.in_thread(client.models.list)
        self.assertEqual(
            [(m.id, m.owned_by) for m in models.data], [("alpha", "local"), ("beta", "local")]
        )

    @inlineCallbacks
    def test_stream_arrives_event_by_event(self) -> Any:
        self.start({"slow": self.fake("slow", token_delay=0.4, tokens=4)})
        stream = yield self.chat("slow", stream=True)

        def arrivals() -> list[tuple[float, float]]:
            return [
                (time.time(), c.to_dict()["generated_at"])
                for c in stream
                if c.choices and c.choices[0].delta.content
            ]

        events = yield self.in_thread(arrivals)
        self.assertEqual(len(events), 4)
        # Causal order, not a duration: the first event reached the client before the backend
        # generated the last one, which no buffering relay could do.
        self.assertLess(events[0][0], events[-1][1])

    @inlineCallbacks
    def test_unknown_model_lists_valid_names(self) -> Any:
        self.start({"alpha": self.fake("alpha")})
        with self.assertRaises(openai.NotFoundError) as ctx:
            yield self.chat("nope")
        self.assertEqual(ctx.exception.code, "model_not_found")
        self.assertIn("alpha", ctx.exception.message)
        self.assertEqual(starts(self.ledger), [])


class PassthroughTests(DaemonTestCase):
    @inlineCallbacks
    def test_raw_body_bytes_and_unknown_fields_reach_backend_untouched(self) -> Any:
        self.start({"alpha": self.fake("alpha")})
        raw = (
            b'{ "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],\n'
            b'  "model":"alpha", "response_format": {"type": "json_object"},'
            b' "vendor_param": 1.50, "messages": [{"role":"user","content":"h\\u00e9"}]}'
        )
        # Above 100 KB Twisted spools a body to a temporary file: it must arrive the same.
        long = json.dumps(
            {"model": "alpha", "messages": [{"role": "user", "content": "x" * 300_000}]}
        )
        for body in (raw, long.encode()):
            response = yield self.post("/v1/chat/completions", None, raw=body)
            yield response.content()
            self.assertEqual(response.code, 200)
            self.assertEqual(
                response.headers.getRawHeaders("x-body-sha256"), [hashlib.sha256(body).hexdigest()]
            )

    @inlineCallbacks
    def test_backend_status_and_body_come_back_as_sent(self) -> Any:
        self.start({"alpha": self.fake("alpha")})
        response, body = yield self.post_json(
            "/v1/chat/completions", {"model": "alpha", "fake_status": 418}
        )
        self.assertEqual(response.code, 418)
        self.assertEqual(body["error"]["code"], "teapot")
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])

    @inlineCallbacks
    def test_any_v1_post_with_model_is_forwarded(self) -> Any:
        self.start({"alpha": self.fake("alpha")})
        response, body = yield self.post_json("/v1/rerank?top=2", {"model": "alpha", "q": "x"})
        self.assertEqual(response.code, 200)
        self.assertEqual(body["path"], "/v1/rerank?top=2")

    @inlineCallbacks
    def test_unreachable_backend_is_502(self) -> Any:
        # Healthy health endpoint, but the API port is closed: the request itself cannot connect.
        health_port = free_port()
        model = self.fake("alpha", port=health_port)
        model["health_url"] = f"http://127.0.0.1:{health_port}/health"
        model["backend_url"] = f"http://127.0.0.1:{free_port()}/v1"
        self.start({"alpha": model})
        response, body = yield self.post_json("/v1/chat/completions", {"model": "alpha"})
        self.assertEqual(response.code, 502)
        self.assertEqual(body["error"]["code"], "backend_unreachable")
        self.assertIn("alpha", body["error"]["message"])


@inlineCallbacks
def broken_stream(case: DaemonTestCase, model: str) -> Any:
    """Read a stream that must end in an error: (the deltas seen, the client's error text)."""
    stream = yield case.chat(model, stream=True)
    seen: list[str] = []

    def consume() -> None:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")

    with case.assertRaises(openai.APIError) as ctx:
        yield case.in_thread(consume)
    return seen, str(ctx.exception)


def test_a_second_sigterm_comes_after_three_times_the_longest_recent_stop() -> None:
    record = StopRecord()
    assert record.grace(10) == 5  # nothing known yet: half of stop_timeout
    record.took.extend([0.05, 0.06])  # llama-server: about 50 ms
    assert record.grace(10) == 1  # at least a second
    record.took.append(2.5)  # vLLM: seconds
    assert record.grace(60) == 7.5
    assert record.grace(5) is None  # a long graceful stop is not asked again: SIGKILL at 5 s


class FailureTests(DaemonTestCase):
    @inlineCallbacks
    def test_crash_mid_stream_ends_with_error_event_and_model_restarts(self) -> Any:
        self.start({"crashy": self.fake("crashy", crash_after=2, token_delay=0.05)})
        seen, error = yield broken_stream(self, "crashy")
        self.assertEqual(seen, ["t0 ", "t1 "])
        self.assertIn("stream interrupted", error)
        yield wait_for(lambda: len(starts(self.ledger)) == 1)
        health = yield self.health()
        self.assertIn(health["models"]["crashy"]["state"], ("failed", "ready"))
        answer = yield self.chat("crashy")
        self.assertEqual(answer.choices[0].message.content, "Hello from crashy")
        self.assertEqual(starts(self.ledger), ["crashy", "crashy"])

    @inlineCallbacks
    def test_a_whole_answer_cut_by_the_backend_never_looks_complete(self) -> Any:
        # Its 200 and headers went out as they came (no length to hold it by): the
        # connection is cut, so the client raises rather than reading half a JSON object.
        self.start({"a": self.fake("a")})
        client = self.daemon.client(timeout=30)
        cut = [{"role": "user", "content": "fake cut"}]
        create = client.chat.completions.create
        with self.assertRaises(openai.APIConnectionError):
            yield self.in_thread(create, model="a", messages=cut)
        answer = yield self.chat("a")
        self.assertEqual(answer.choices[0].message.content, "Hello from a")

    @inlineCallbacks
    def test_backend_dying_while_idle_is_reported_and_restarted(self) -> Any:
        self.start({"alpha": self.fake("alpha")})
        yield self.chat("alpha")
        signal_backend(self.ledger, "alpha", signal.SIGUSR1)
        health: dict[str, Any] = {}

        @inlineCallbacks
        def failed() -> Any:
            health.update((yield self.health()))
            return health["models"]["alpha"]["state"] == "failed"

        yield wait_for(failed, timeout=10, interval=0.1)
        self.assertEqual(health["models"]["alpha"]["state"], "failed")
        self.assertIn("exited with code 7", health["models"]["alpha"]["error"])
        self.assertIsNone(health["current_model"])
        again = yield self.chat("alpha")
        self.assertEqual(again.choices[0].message.content, "Hello from alpha")
        self.assertEqual(starts(self.ledger), ["alpha", "alpha"])

    @inlineCallbacks
    def test_startup_timeout_answers_all_waiting_and_others_keep_working(self) -> Any:
        self.start(
            {
                "stuck": self.fake("stuck", never_ready=True, startup_timeout=1),
                "alpha": self.fake("alpha"),
            }
        )
        results = yield DeferredList(
            [self.post_json("/v1/chat/completions", {"model": "stuck"}) for _ in range(3)],
            consumeErrors=True,
        )
        for ok, (response, body) in results:
            self.assertTrue(ok)
            self.assertEqual(response.code, 504)
            self.assertIn("stuck", body["error"]["message"])
            self.assertIn("startup_timeout of 1 s", body["error"]["message"])
        health = yield self.health()
        self.assertEqual(health["models"]["stuck"]["state"], "failed")
        self.assertEqual(live_peers(self.ledger), [])
        answer = yield self.chat("alpha")
        self.assertEqual(answer.choices[0].message.content, "Hello from alpha")
        # All three waited on one failed start, not three.
        self.assertEqual(starts(self.ledger), ["stuck", "alpha"])

    @inlineCallbacks
    def test_backend_ignoring_sigterm_is_killed_with_its_children(self) -> Any:
        self.start(
            {
                "stubborn": self.fake(
                    "stubborn", ignore_sigterm=True, child=True, stop_timeout=0.5
                ),
                "alpha": self.fake("alpha"),
            }
        )
        response, _ = yield self.post_json("/v1/chat/completions", {"model": "stubborn"})
        pid = int(response.headers.getRawHeaders("x-backend-pid")[0])
        yield self.chat("alpha")
        live = list(live_processes())
        self.assertNotIn(pid, [p for p, _, _ in live])
        marker = self.ledger.encode()
        children = [p for p, _, argv in live if marker in argv and b"fake-child" in argv]
        self.assertEqual(children, [])
        self.assert_one_at_a_time()
        response = yield self.http.get(self.daemon.url + "/metrics")
        scraped = samples((yield response.text()))
        self.assertEqual(scraped[("llmswap_backend_killed_total", (("model", "stubborn"),))], 1)
        self.assertEqual(scraped[("llmswap_backend_killed_total", (("model", "alpha"),))], 0)

    @inlineCallbacks
    def test_a_backend_that_misses_its_sigterm_is_asked_again_not_killed(self) -> Any:
        # As llama-server whose shutdown missed its wake-up: a second SIGTERM ends it.
        lost = self.fake("lost", miss_first_sigterm=True, stop_timeout=6)
        self.start({"lost": lost, "alpha": self.fake("alpha")})
        yield self.chat("lost")
        answer = yield self.chat("alpha")
        self.assertEqual(answer.choices[0].message.content, "Hello from alpha")
        events = [(e["event"], e.get("name")) for e in read_ledger(self.ledger)]
        self.assertIn(("sigterm_missed", "lost"), events)
        self.assertIn(("sigterm", "lost"), events)  # it exited on the second, not killed
        self.assert_one_at_a_time()
        backend = self.daemon.service.manager.backends["lost"].describe()
        self.assertEqual((backend["asked_again"], backend["killed"]), (1, 0))

    @inlineCallbacks
    def test_a_models_python_path_does_not_reach_the_exec_shim(self) -> Any:
        # Where util-linux's setsid and setpriv are missing, the Python shim starts each server.
        self.patch(session, "util_linux", lambda: None)
        # A PYTHONPATH meant for the backend (vLLM's, say) holds a module the shim imports.
        shadow = self.mktemp()
        os.makedirs(shadow)
        with open(os.path.join(shadow, "ctypes.py"), "w") as f:
            f.write("raise ImportError('not the standard ctypes')\n")
        model = self.fake("shadowed")
        model["env"] = {"PYTHONPATH": shadow}
        self.start({"shadowed": model})
        answer = yield self.chat("shadowed")
        self.assertEqual(answer.choices[0].message.content, "Hello from shadowed")
        pid = self.daemon.service.manager.backends["shadowed"].describe()["pid"]
        self.assertEqual(os.getsid(pid), pid)  # the shim made it a session of its own

    @inlineCallbacks
    def test_missing_command_is_a_clear_503(self) -> Any:
        self.start(
            {"ghost": {"backend_url": "http://127.0.0.1:1/v1", "cmd": ["/nonexistent/llama"]}}
        )
        response, body = yield self.post_json("/v1/chat/completions", {"model": "ghost"})
        self.assertEqual(response.code, 503)
        self.assertIn("'/nonexistent/llama' not found", body["error"]["message"])


class QueueTests(DaemonTestCase):
    @inlineCallbacks
    def test_queue_full_is_503_with_retry_after(self) -> Any:
        self.start({"alpha": self.fake("alpha")}, queue_size=2)
        yield self.chat("alpha")  # loaded, so the next one is in flight at once
        busy = self.post_json("/v1/chat/completions", {"model": "alpha", "fake_sleep": 1.5})
        yield wait_for(lambda: self.daemon.service.health()["in_flight"] == 1)
        queued = [self.post_json("/v1/chat/completions", {"model": "alpha"}) for _ in range(2)]
        yield wait_for(lambda: self.daemon.service.health()["queue_size"] == 2)
        response, body = yield self.post_json("/v1/chat/completions", {"model": "alpha"})
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["5"])
        self.assertEqual(body["error"]["message"], "Queue full (2 requests). Try again later.")
        for d in [busy, *queued]:
            r, _ = yield d
            self.assertEqual(r.code, 200)

    @inlineCallbacks
    def test_queued_request_whose_client_left_never_causes_a_swap(self) -> Any:
        self.start({"alpha": self.fake("alpha"), "beta": self.fake("beta")})
        yield self.chat("alpha")
        busy = self.post_json("/v1/chat/completions", {"model": "alpha", "fake_sleep": 1.0})
        yield wait_for(lambda: self.daemon.service.health()["in_flight"] == 1)
        leaving = self.post("/v1/chat/completions", {"model": "beta"})
        yield wait_for(lambda: self.daemon.service.health()["queue_size"] == 1)
        leaving.cancel()  # closes the client connection while the request waits
        self.failureResultOf(leaving)
        yield wait_for(lambda: self.daemon.service.health()["queue_size"] == 0)
        r, _ = yield busy
        self.assertEqual(r.code, 200)
        after = yield self.chat("alpha")
        self.assertEqual(after.choices[0].message.content, "Hello from alpha")
        self.assertEqual(starts(self.ledger), ["alpha"])
        metrics = yield self.http.get(self.daemon.url + "/metrics")
        left = ("llmswap_requests_total", (("key", "-"), ("model", "beta"), ("status", "499")))
        self.assertEqual(samples((yield metrics.text())).get(left), 1.0)

    @inlineCallbacks
    def test_client_leaving_mid_stream_releases_the_backend_at_once(self) -> Any:
        self.start(
            {"long": self.fake("long", tokens=10000, token_delay=0.05), "beta": self.fake("beta")}
        )
        response = yield self.post(
            "/v1/chat/completions", {"model": "long", "stream": True}, unbuffered=True
        )
        got: list[bytes] = []
        collecting = treq.collect(response, got.append)
        yield wait_for(lambda: len(got) >= 2)
        response.original._transport.stopProducing()  # hang up mid-stream
        yield DeferredList([collecting], consumeErrors=True)
        # The stream would run for 500 s; beta being served proves the lease was released.
        answer = yield self.chat("beta")
        self.assertEqual(answer.choices[0].message.content, "Hello from beta")
        self.assertEqual(starts(self.ledger), ["long", "beta"])

    @inlineCallbacks
    def test_request_timeout_bounds_waiting_and_backend_silence(self) -> Any:
        self.start({"slow": self.fake("slow", startup_delay=2.5)}, request_timeout=1)
        r1, b1 = yield self.post_json("/v1/chat/completions", {"model": "slow"})
        self.assertEqual(r1.code, 504)
        self.assertEqual(b1["error"]["code"], "queue_timeout")
        self.assertIn("waited 1 s (request_timeout)", b1["error"]["message"])
        yield wait_for(lambda: self.daemon.service.health()["current_model"] == "slow")
        r2, b2 = yield self.post_json("/v1/chat/completions", {"model": "slow", "fake_sleep": 3})
        self.assertEqual(r2.code, 504)
        self.assertIn("sent no response within request_timeout", b2["error"]["message"])

    @inlineCallbacks
    def test_stream_going_silent_ends_with_error_event(self) -> Any:
        # Each event comes 3 s after the last: past request_timeout after the first one.
        self.start({"stalls": self.fake("stalls", token_delay=3, tokens=3)}, request_timeout=1)
        seen, error = yield broken_stream(self, "stalls")
        self.assertEqual(seen, ["t0 "])
        self.assertIn("stream interrupted: no data for request_timeout (1 s)", error)


class ConcurrencyTests(DaemonTestCase):
    timeout = 180

    @inlineCallbacks
    def test_many_concurrent_requests_never_see_two_backends_alive(self) -> Any:
        names = ["m1", "m2", "m3"]
        # fifo swaps on nearly every request: the most load/stop transitions to catch an overlap.
        self.start(
            {n: self.fake(n, startup_delay=0.1, token_delay=0.01) for n in names},
            queue_size=100,
            scheduler="fifo",
        )
        seen_alive: list[int] = []

        def sample() -> None:
            # Our own look at the OS, beside each fake's own watchdog.
            seen_alive.append(len(live_peers(self.ledger)))

        sampler = LoopingCall(sample)
        sampler.start(0.005)
        rng = random.Random(1234)
        calls = []
        for i in range(40):
            model = rng.choice(names)
            if i % 4 == 0:
                calls.append(
                    self.chat(model, stream=True).addCallback(lambda s: self.in_thread(list, s))
                )
            else:
                calls.append(
                    self.post_json("/v1/chat/completions", {"model": model, "stream": False})
                )
        results = yield DeferredList(calls, consumeErrors=True)
        sampler.stop()
        failures = [r for ok, r in results if not ok]
        self.assertEqual(failures, [])
        for _, r in results:
            if isinstance(r, tuple):
                self.assertEqual(r[0].code, 200)
        self.assertEqual(overlaps(self.ledger), [])
        self.assertLessEqual(max(seen_alive), 1)
        self.assertGreater(len(starts(self.ledger)), 3)


class ShutdownTests(DaemonTestCase):
    @inlineCallbacks
    def test_stopping_the_daemon_stops_backends_and_answers_the_queue(self) -> Any:
        daemon = Daemon(
            {"alpha": self.fake("alpha"), "beta": self.fake("beta", startup_delay=30)},
            os.path.abspath(self.mktemp()),
        )
        daemon.start()
        self.daemon = daemon
        yield self.chat("alpha")
        loading = self.post_json("/v1/chat/completions", {"model": "beta"})
        yield wait_for(lambda: starts(self.ledger) == ["alpha", "beta"])
        queued = self.post_json("/v1/chat/completions", {"model": "alpha"})
        # Both wait: beta for its load to end, alpha behind it.
        yield wait_for(lambda: daemon.service.health()["queue_size"] == 2)
        yield daemon.stop()
        self.assertEqual(live_peers(self.ledger), [])
        for d in (loading, queued):
            r, body = yield d
            self.assertEqual(r.code, 503)
            self.assertIn("shutting down", body["error"]["message"])


class BackendGoneTests(DaemonTestCase):
    @inlineCallbacks
    def test_a_ready_backend_that_refuses_connections_is_restarted_and_the_request_retried(
        self,
    ) -> Any:
        """Its process lives but its port is closed (as a container whose engine died): the
        request that finds out is not the client's problem."""
        daemon = self.start({"a": self.fake("a")})
        yield self.chat("a")
        signal_backend(self.ledger, "a", signal.SIGUSR2)
        yield wait_for(lambda: "closed" in [e["event"] for e in read_ledger(self.ledger)])
        self.assertEqual(daemon.service.health()["models"]["a"]["state"], "ready")  # unnoticed
        answer = yield self.chat("a")
        self.assertEqual(answer.choices[0].message.content, "Hello from a")
        self.assertEqual(starts(self.ledger), ["a", "a"])
        self.assertEqual(len(live_peers(self.ledger)), 1)  # the deaf one was stopped
        log = yield self.http.get(daemon.url + "/metrics")
        text = yield log.text()
        self.assertIn('llmswap_requests_total{key="-",model="a",status="200"} 2.0', text)


class KeptAliveTests(DaemonTestCase):
    @inlineCallbacks
    def test_a_request_on_a_connection_the_backend_closed_is_sent_again_on_a_new_one(
        self,
    ) -> Any:
        """The backend closes each kept-alive connection as its next request arrives (a
        keep-alive timeout firing, llama-server after a stream): every request still gets
        its answer, and the backend gets each body once, whole."""
        self.start({"a": self.fake("a", drop_kept_alive=True, echo=True, log_requests=True)})
        for n in range(3):
            answer = yield self.chat("a", user=f"turn {n}")
            self.assertEqual(json.loads(answer.choices[0].message.content)["user"], f"turn {n}")
        stream = yield self.chat("a", stream=True)
        chunks = yield self.in_thread(list, stream)
        self.assertTrue("".join(c.choices[0].delta.content or "" for c in chunks))
        events = read_ledger(self.ledger)
        self.assertGreaterEqual([e["event"] for e in events].count("dropped"), 3)
        posted = [e for e in events if e["event"] == "request" and e["method"] == "POST"]
        self.assertEqual(len(posted), 4)  # each sent once more, never twice served


class RemoteModelTests(DaemonTestCase):
    @inlineCallbacks
    def test_a_remote_model_is_ready_at_once_never_waits_behind_a_swap_and_gets_its_key(
        self,
    ) -> Any:
        port = free_port()
        remote = subprocess.Popen([sys.executable, FAKE, "--port", str(port), "--name", "cluster"])
        self.addCleanup(terminate, remote)
        yield wait_for(lambda: _answers(port), timeout=20)
        os.environ["LLMSWAP_TEST_REMOTE_KEY"] = "sk-remote-0123"
        self.addCleanup(os.environ.pop, "LLMSWAP_TEST_REMOTE_KEY")
        loaded = os.path.abspath(self.mktemp())  # local is not ready until this file exists
        models = {
            "local": self.fake("local", ready_when=loaded),
            "cluster": {"remote": {"url": f"http://127.0.0.1:{port}/v1",
                                   "key_env": "LLMSWAP_TEST_REMOTE_KEY"}},
        }  # fmt: skip
        daemon = self.daemon = Daemon(models, os.path.abspath(self.mktemp()))
        daemon.start()
        self.addCleanup(lambda: daemon.service.running and daemon.stop())
        yield wait_for(lambda: daemon.service.health()["models"]["cluster"]["state"] == "ready")
        loading = self.chat("local")
        yield wait_for(lambda: daemon.service.health()["models"]["local"]["state"] == "starting")
        raw = yield self.in_thread(
            daemon.client().chat.completions.with_raw_response.create,
            model="cluster", messages=HI, extra_headers={"Authorization": "Bearer client-key"},
        )  # fmt: skip
        # Answered while the local model still loads: it did not wait behind the swap.
        self.assertEqual(daemon.service.health()["models"]["local"]["state"], "starting")
        self.assertEqual(raw.parse().choices[0].message.content, "Hello from cluster")
        self.assertEqual(raw.headers["x-got-authorization"], "Bearer sk-remote-0123")
        open(loaded, "w").close()
        yield loading
        self.assertEqual(starts(self.ledger), ["local"])  # llmswap started only its own
        health = daemon.service.health()["models"]["cluster"]
        self.assertEqual((health["state"], health["kind"]), ("ready", "remote"))
        yield daemon.stop()
        self.assertIsNone(remote.poll())  # not llmswap's to stop


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False
