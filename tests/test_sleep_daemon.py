"""Sleep mode end to end: llmswap in-process on real sockets, fake backends as real processes
that serve vLLM's sleep API exactly and witness who holds the "GPU" (tests/fakebackend.py)."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks

from tests.fakebackend import live_peers
from tests.support import Daemon, read_ledger, samples
from tests.test_daemon import DaemonTestCase

VLLM = {"kind": "vllm", "level": 1, "memory": "8GiB"}


class SleepDaemonTests(DaemonTestCase):
    def sleepy(self, name: str, **opts: Any) -> dict[str, Any]:
        """A fake with vLLM's sleep API; its "GPU" is witnessed in a directory (processes
        coexist here, so the process-overlap watch is off)."""
        return self.fake(name, sleep_mode=True, gpu_dir=self.gpu, max_peers=99, sleep=VLLM,
                         device="gpu", memory="20GiB", startup_delay=0.3, **opts)  # fmt: skip

    def events(self, kind: str) -> list[str]:
        return [e["name"] for e in read_ledger(self.ledger) if e["event"] == kind]

    def setUp(self) -> None:
        super().setUp()
        self.gpu = os.path.abspath(self.mktemp())
        os.mkdir(self.gpu)

    def boot(self, names: str, ram: str = "64GiB") -> Daemon:
        daemon = Daemon(
            {n: self.sleepy(n) for n in names},
            os.path.abspath(self.mktemp()),
            devices={"gpu": {"memory": "24GiB"}, "ram": {"memory": ram}},
            linger=0,
        )
        daemon.start()
        self.daemon = daemon
        return daemon

    @inlineCallbacks
    def test_alternating_models_start_once_wake_on_every_switch_never_two_awake(self) -> Any:
        daemon = self.boot("ab")
        try:
            for model in "ababab":
                answer = yield self.chat(model)
                self.assertEqual(answer.choices[0].message.content, f"Hello from {model}")
            self.assertEqual(self.events("start"), ["a", "b"])
            self.assertEqual(self.events("sleep"), ["a", "b", "a", "b", "a"])
            self.assertEqual(self.events("wake"), ["a", "b", "a", "b"])
            self.assertEqual(self.events("overlap"), [])
            self.assertEqual(self.events("request_while_asleep"), [])
            health = yield self.health()
            self.assertEqual(health["models"]["a"]["state"], "asleep")
            self.assertEqual(health["models"]["b"]["state"], "ready")
            # Ollama clients see it too: its process lives, no device memory.
            response = yield self.http.get(daemon.url + "/api/ps")
            ps = {m["name"]: m for m in (yield response.json())["models"]}
            self.assertEqual((ps["a:latest"]["state"], ps["a:latest"]["size_vram"]), ("asleep", 0))
            self.assertEqual(ps["b:latest"]["state"], "ready")
            response = yield self.http.get(daemon.url + "/metrics")
            metrics = samples((yield response.text()))
            self.assertEqual(metrics[("llmswap_wakes_total", (("model", "a"),))], 2)
            self.assertEqual(metrics[("llmswap_load_seconds_count", (("model", "a"),))], 3)
        finally:
            yield daemon.stop()
        # Stopping llmswap stops the sleepers too: no process is left holding host memory.
        self.assertEqual(live_peers(self.ledger), [])
        self.assertEqual(sorted(self.events("sigterm")), ["a", "b"])

    @inlineCallbacks
    def test_the_host_memory_budget_stops_the_least_recently_used_sleeper(self) -> Any:
        daemon = self.boot("abc", ram="10GiB")  # room for one sleeper
        try:
            for model in "abc":
                yield self.chat(model)
            self.assertEqual(self.events("sigterm"), ["a"])
            health = yield self.health()
            states = {n: m["state"] for n, m in health["models"].items()}
            self.assertEqual(states, {"a": "stopped", "b": "asleep", "c": "ready"})
            self.assertEqual(self.events("overlap"), [])
        finally:
            yield daemon.stop()
