"""Sleep mode in the swap manager, on a Clock, with in-memory backends that speak vLLM's sleep
API (:class:`llmswap.testing.MemoryHTTP`): unloading puts a model to sleep, loading wakes it,
the host-memory budget stops the least recently used sleeper, and a sleep that is not confirmed
stops the backend instead."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from llmswap import health
from llmswap.config.config import parse
from llmswap.events import Swap
from llmswap.swap.manager import SwapManager
from llmswap.testing import MemoryBackend, MemoryHTTP

SLEEPY = {"sleep": {"kind": "vllm", "memory": "8GiB"}, "memory": "20GiB", "device": "gpu"}


class SleepTests(unittest.TestCase):
    def start(self, names: str = "ab", ram: str = "64GiB", **model: Any) -> None:
        self.clock = Clock()
        self.events: list[str] = []
        self.swaps: list[Swap] = []
        models = {
            n: {"backend_url": f"http://{n}:1/v1", "cmd": "x", **SLEEPY, **model} for n in names
        }
        devices = {"gpu": {"memory": "24GiB"}, "ram": {"memory": ram}}
        config = parse({"models": models, "devices": devices, "linger": 0})
        self.backends = {n: MemoryBackend(n, self.events) for n in names}
        self.manager = SwapManager(config, self.backends, MemoryHTTP(self.backends), self.clock)
        self.manager.bus.subscribe(Swap, self.swaps.append)
        self.manager.startService()
        self.addCleanup(self.manager.stopService)

    def use(self, model: str) -> None:
        self.clock.advance(1)
        self.successResultOf(self.manager.acquire(model)).release()

    def states(self) -> dict[str, str]:
        doc = health.document(self.manager.snapshot())
        return {n: m["state"] for n, m in doc["models"].items()}

    def test_alternating_models_start_once_then_sleep_and_wake(self) -> None:
        self.start()
        for model in "abab":
            self.use(model)
        self.assertEqual(
            self.events,
            ["start a", "sleep a", "start b", "sleep b", "wake a", "sleep a", "wake b"],
        )
        self.assertEqual(self.states(), {"a": "asleep", "b": "ready"})
        last = self.swaps[-1]
        self.assertEqual(
            (last.loaded, last.unloaded, last.slept, last.woke), ("b", ("a",), ("a",), True)
        )
        self.assertEqual(self.swaps[0].woke, False)

    def test_a_sleeper_holds_no_gpu_memory_but_counts_on_the_host_memory_budget(self) -> None:
        # Room for one sleeper: the least recently used one is stopped for the next.
        self.start("abc", ram="10GiB")
        for model in "abc":
            self.use(model)
        self.assertEqual(self.states(), {"a": "stopped", "b": "asleep", "c": "ready"})
        self.assertEqual(self.events[-3:], ["stop a", "sleep b", "start c"])
        self.use("b")  # b wakes: c may sleep where b's host memory was... once b is awake
        self.assertEqual(self.states(), {"a": "stopped", "b": "ready", "c": "stopped"})
        self.assertEqual(self.events[-2:], ["stop c", "wake b"])

    def test_unloading_puts_it_to_sleep_and_unloading_a_sleeper_stops_it(self) -> None:
        self.start()
        self.use("a")
        self.successResultOf(self.manager.unload("a"))
        self.assertEqual(self.states()["a"], "asleep")
        self.successResultOf(self.manager.unload("a"))
        self.assertEqual(self.states()["a"], "stopped")
        self.assertEqual(self.events, ["start a", "sleep a", "stop a"])

    def test_an_idle_ttl_puts_it_to_sleep(self) -> None:
        self.start(ttl=30)
        self.use("a")
        self.clock.advance(30)
        self.assertEqual(self.states()["a"], "asleep")

    def test_a_sleep_that_is_never_confirmed_stops_the_backend_before_the_next_starts(self) -> None:
        self.start()
        self.use("a")
        self.backends["a"].sleepy = False  # answers /sleep but stays awake
        d = self.manager.acquire("b")
        self.assertNoResult(d)
        self.assertEqual(self.events, ["start a", "sleep a"])
        self.clock.advance(60)  # sleep.timeout
        self.successResultOf(d).release()
        self.assertEqual(self.events, ["start a", "sleep a", "stop a", "start b"])
        self.assertEqual(self.states(), {"a": "stopped", "b": "ready"})

    def test_a_sleeper_that_exits_is_failed_and_the_next_request_starts_it(self) -> None:
        self.start()
        self.use("a")
        self.use("b")
        self.backends["a"].crash()
        self.assertEqual(self.states()["a"], "failed")
        self.use("a")
        self.assertEqual(self.events[-2:], ["sleep b", "start a"])

    def test_a_reload_stops_rather_than_sleeps(self) -> None:
        self.start()
        self.use("a")
        config = parse({
            "models": {n: {"backend_url": f"http://{n}:1/v1", "cmd": "y", **SLEEPY} for n in "ab"},
            "devices": {"gpu": {"memory": "24GiB"}, "ram": {"memory": "64GiB"}},
        })  # fmt: skip
        fresh = {n: MemoryBackend(n, self.events) for n in "ab"}
        self.successResultOf(self.manager.reconfigure(config, fresh))
        self.assertEqual(self.events, ["start a", "stop a"])
