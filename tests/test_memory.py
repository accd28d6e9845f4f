"""Memory truth: the host-memory probe on a /proc of our own, the footprints kept across
restarts, and the swap manager that waits for a device to show the room (on a Clock, with a
device whose memory comes back some time after a stop, as CUDA's does)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from prometheus_client import generate_latest
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from llmswap import health
from llmswap.config.config import Config, parse
from llmswap.errors import APIError
from llmswap.events import EventBus
from llmswap.memory import footprints, oom
from llmswap.memory.probe import DeviceReading, IDeviceProbe
from llmswap.memory.ram import RamProbe
from llmswap.memory.witness import READ_TIMEOUT, MemoryWitness
from llmswap.metrics import Metrics
from llmswap.swap.manager import SwapManager
from llmswap.testing import MemoryBackend, MemoryHTTP
from tests.support import read_ledger, samples
from tests.test_daemon import DaemonTestCase, starts

GiB = 2**30
MiB = 2**20


def _proc(root: Path, pid: int, parent: int, name: str, pss_kib: int) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "stat").write_text(f"{pid} ({name}) S {parent} {pid} {pid} 0 -1\n")
    (d / "smaps_rollup").write_text(
        f"00400000-7fff [rollup]\nRss: {pss_kib * 2} kB\nPss: {pss_kib} kB\n"
    )
    (d / "comm").write_text(name + "\n")


def test_host_memory_is_what_the_kernel_could_give_and_a_tree_is_its_processes_pss(
    tmp_path: Path,
) -> None:
    (tmp_path / "meminfo").write_text(
        "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    600 kB\n"
    )
    _proc(tmp_path, 10, 1, "llama-server", 300)
    _proc(tmp_path, 11, 10, "worker", 50)
    _proc(tmp_path, 12, 11, "grandchild (x)", 5)  # a name with a parenthesis
    _proc(tmp_path, 20, 1, "ollama", 400)
    probe = RamProbe(str(tmp_path))
    assert probe.reading() == DeviceReading(1000 * 1024, 600 * 1024)
    assert probe.reading().used == 400 * 1024
    assert probe.held_by([10]) == 355 * 1024
    assert probe.held_by([11]) == 55 * 1024
    assert probe.held_by([99]) == 0  # gone
    assert probe.holders([10], 3) == [(20, "ollama", 400 * 1024)]


def test_out_of_memory_is_recognised_in_each_backends_words() -> None:
    for said in (
        "CUDA error: out of memory",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: "
        "cudaMalloc failed: out of memory",
        "llama_model_load: error: failed to allocate CUDA0 buffer of size 4294967296",
        "hipErrorOutOfMemory",
        "terminate called after throwing an instance of 'std::bad_alloc'",
    ):
        assert oom.ran_out(["load_tensors: loading model", said]), said
    assert not oom.ran_out(["main: model loaded", "server is listening on http://127.0.0.1"])


def _model(cmd: str = "server -c 4096") -> Any:
    return parse({"models": {"m": {"cmd": cmd, "backend_url": "http://m:1/v1"}}}).instances["m"]


def test_a_footprint_is_the_peak_of_what_runs_and_survives_a_restart(tmp_path: Path) -> None:
    kept = footprints.Footprints()
    model = _model()
    assert kept.record(model, 300 * MiB)
    assert not kept.record(model, 200 * MiB)  # not a new peak
    assert kept.record(model, 350 * MiB)
    footprints.write(tmp_path, kept.as_json())
    again = footprints.read(tmp_path)
    assert again.current({"m": model}) == {"m": 350 * MiB}
    # Another context size is another footprint: the old peak no longer holds.
    assert again.current({"m": _model("server -c 32768")}) == {}
    (tmp_path / footprints.FILE).write_text("{not json")
    assert footprints.read(tmp_path).current({"m": model}) == {}


@implementer(IDeviceProbe)
@attrs.define
class Device:
    """Host memory as a device: ``others`` hold some of it, each backend ``each`` bytes from its
    start until ``lag`` seconds after its stop."""

    clock: Clock
    total: int
    each: int
    lag: float
    backends: dict[str, LaggingBackend] = attrs.field(factory=dict)
    others: int = 0
    frees_late: bool = True  # as a GPU's: the lag above
    hung: bool = False
    holders_fail: bool = False
    held_fail: bool = False

    def reading(self) -> DeviceReading:
        now = self.clock.seconds()
        held = sum(self.each for b in self.backends.values() if b.holds(now))
        return DeviceReading(self.total, self.total - self.others - held)

    def held_by(self, pids: Sequence[int]) -> int:
        if self.held_fail:
            raise OSError("NVML: not supported")
        return sum(b.measured for b in self.backends.values() if set(b.processes) & set(pids))

    def holders(self, exclude: Sequence[int], most: int) -> list[tuple[int, str, int]]:
        if self.holders_fail:
            raise OSError("the driver lost the process list")
        return [(4242, "ollama", self.others)][:most] if self.others else []


class LaggingBackend(MemoryBackend):
    def __init__(self, name: str, log: list[str], clock: Clock, pid: int) -> None:
        super().__init__(name, log)
        self.clock = clock
        self.processes = [pid]
        self.freed_at = 0.0
        self.measured = 0
        self.started_at: list[float] = []

    def start(self) -> Deferred[None]:
        self.started_at.append(self.clock.seconds())
        return super().start()

    def stop(self) -> Deferred[None]:
        if self.running:
            self.freed_at = self.clock.seconds() + self.device_lag
        return super().stop()

    def holds(self, now: float) -> bool:
        return self.running or now < self.freed_at

    device_lag = 0.0


class WitnessedManagerTests(unittest.TestCase):
    """Models a and b on one probed host-memory device of 10 GiB."""

    def start(
        self,
        memory: str,
        lag: float = 0.0,
        others: int = 0,
        timeout: float = 5,
        budget: str = "10GiB",
        b_memory: str | None = None,
    ) -> None:
        self.clock = Clock()
        self.events: list[str] = []
        models = {n: {"backend_url": f"http://{n}:1/v1", "cmd": "x", "memory": memory,
                      "device": "ram"} for n in "ab"}  # fmt: skip
        models["b"]["memory"] = b_memory or memory
        devices = {"ram": {"memory": budget, "probe": "ram", "free_timeout": timeout}}
        self.state = Path(self.mktemp())
        config: Config = parse({"models": models, "devices": devices, "linger": 0,
                                "state_dir": str(self.state)})  # fmt: skip
        self.device = Device(self.clock, 10 * GiB, 6 * GiB, lag, others=others)
        self.threads_taken = 0
        self.backends = {}
        for pid, n in enumerate("ab", 100):
            b = LaggingBackend(n, self.events, self.clock, pid)
            b.device_lag = lag
            self.backends[n] = self.device.backends[n] = b
        bus = EventBus()
        self.memory = MemoryWitness(
            lambda: self.manager.config, self._loaded, self.clock, bus,
            probes={"ram": self.device}, in_thread=self._thread,
        )  # fmt: skip
        self.manager = SwapManager(config, self.backends, MemoryHTTP(self.backends), self.clock,
                                   bus, memory=self.memory)  # fmt: skip
        self.memory.startService()
        self.manager.startService()
        self.addCleanup(self.manager.stopService)
        self.addCleanup(self.memory.stopService)

    def _thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """A probe's call: a hung device's never returns (its thread stays taken), as a GPU's
        off the bus."""
        if self.device.hung:
            self.threads_taken += 1
            return Deferred()
        return maybeDeferred(f, *args)

    def _loaded(self) -> list[tuple[Any, Any]]:
        ready = [n for n in "ab" if self.manager.state(n).value == "ready"]
        return [(self.manager.config.instances[n], self.backends[n]) for n in ready]

    def health(self) -> dict[str, Any]:
        return health.document(self.manager.snapshot())

    def test_the_next_start_waits_until_the_evicted_models_memory_is_back(self) -> None:
        self.start("6GiB", lag=1.5)
        self.successResultOf(self.manager.acquire("a")).release()
        waiting = self.manager.acquire("b")
        self.assertEqual(self.events, ["start a", "stop a"])  # a is gone, its memory is not
        self.clock.advance(1.0)
        self.assertEqual(self.events, ["start a", "stop a"])
        self.assertNoResult(waiting)
        self.clock.advance(0.6)
        self.successResultOf(waiting).release()
        self.assertEqual(self.events, ["start a", "stop a", "start b"])
        # b started only once a's memory showed free: never both on the device.
        self.assertGreaterEqual(self.backends["b"].started_at[0], self.backends["a"].freed_at)

    def test_a_start_that_fits_beside_a_stop_still_freeing_waits_for_it_on_a_gpu(self) -> None:
        # Budget 7 GiB of 10: a (6) and b (2) do not fit together, so b evicts a; the 2 GiB b
        # needs are free while a's 6 still are not.  Both starting at once is what a GPU can't.
        self.start("6GiB", lag=1.5, budget="7GiB", b_memory="2GiB")
        self.backends["a"].measured = 6 * GiB
        self.successResultOf(self.manager.acquire("a")).release()
        waiting = self.manager.acquire("b")
        self.clock.advance(1.0)
        self.assertNoResult(waiting)
        self.assertEqual(self.events, ["start a", "stop a"])
        self.clock.pump([0.1] * 6)
        self.successResultOf(waiting).release()
        self.assertGreaterEqual(self.backends["b"].started_at[0], self.backends["a"].freed_at)

    def test_a_gpu_that_cannot_list_processes_still_waits_for_a_stops_memory(self) -> None:
        # vGPU and MIG devices may not say what a process holds: the counted figure stands in.
        self.start("6GiB", lag=1.5, budget="7GiB", b_memory="2GiB")
        self.device.held_fail = True
        self.successResultOf(self.manager.acquire("a")).release()
        waiting = self.manager.acquire("b")
        self.clock.advance(1.0)
        self.assertNoResult(waiting)
        self.clock.pump([0.1] * 6)
        self.successResultOf(waiting).release()
        self.assertGreaterEqual(self.backends["b"].started_at[0], self.backends["a"].freed_at)

    def test_host_memory_a_stop_frees_at_once_so_nothing_waits_for_it_to_come_back(self) -> None:
        # The kernel frees a process's pages as it exits (its file pages were never "used").
        self.start("6GiB", lag=1.5, budget="7GiB", b_memory="2GiB")
        self.device.frees_late = False
        self.backends["a"].measured = 6 * GiB
        self.successResultOf(self.manager.acquire("a")).release()
        self.successResultOf(self.manager.acquire("b")).release()
        self.assertEqual(self.events, ["start a", "stop a", "start b"])

    def test_after_an_unload_a_start_waits_for_the_memory_too_instead_of_failing(self) -> None:
        self.start("6GiB", lag=1.5)
        self.successResultOf(self.manager.acquire("a")).release()
        self.successResultOf(self.manager.unload("a"))  # an admin's (or a ttl's) unload
        waiting = self.manager.acquire("b")  # nothing to evict, but a's memory is not back yet
        self.clock.advance(1.0)
        self.assertNoResult(waiting)
        self.clock.pump([0.1] * 6)
        self.successResultOf(waiting).release()
        self.assertEqual(self.events, ["start a", "stop a", "start b"])
        self.assertGreaterEqual(self.backends["b"].started_at[0], self.backends["a"].freed_at)

    def test_with_nothing_to_evict_a_full_device_fails_the_load_at_once_saying_why(self) -> None:
        self.start("6GiB", others=7 * GiB)
        failed = self.failureResultOf(self.manager.acquire("a"), APIError)
        self.assertEqual(failed.value.status, 503)
        self.assertEqual(
            failed.value.message,
            "Model 'a' needs 6144 MiB on device 'ram', which has 3072 MiB free; not loaded. "
            "Held most by other processes: ollama (7168 MiB)",
        )
        self.assertEqual(self.events, [])  # nothing was started to crash

    def test_a_device_that_cannot_say_who_holds_it_still_says_what_is_missing(self) -> None:
        self.start("6GiB", others=7 * GiB)
        self.device.holders_fail = True
        failed = self.failureResultOf(self.manager.acquire("a"), APIError)
        self.assertEqual(
            failed.value.message,
            "Model 'a' needs 6144 MiB on device 'ram', which has 3072 MiB free; not loaded",
        )

    def test_a_probe_that_never_answers_is_given_up_and_the_budget_alone_decides(self) -> None:
        self.start("6GiB")
        self.device.hung = True
        waiting = self.manager.acquire("a")
        self.clock.advance(READ_TIMEOUT - 0.1)
        self.assertNoResult(waiting)
        self.assertEqual(self.events, [])
        self.clock.advance(0.1)
        self.successResultOf(waiting).release()
        self.assertEqual(self.events, ["start a"])
        # A minute of measurements later, the hung driver still holds two threads, not thirty.
        self.clock.pump([2.0] * 30)
        self.assertEqual(self.threads_taken, 2)
        self.clock.advance(READ_TIMEOUT)  # a stop waits for the measurement under way, so long

    def test_memory_that_never_comes_back_fails_the_load_after_free_timeout(self) -> None:
        self.start("6GiB", lag=60, timeout=5)
        self.successResultOf(self.manager.acquire("a")).release()
        waiting = self.manager.acquire("b")
        self.clock.advance(4.9)
        self.assertNoResult(waiting)
        self.clock.pump([0.1] * 3)
        failed = self.failureResultOf(waiting, APIError)
        self.assertIn(
            "has 4096 MiB free after waiting 5.0 s for it to be freed", failed.value.message
        )
        self.assertEqual(self.events, ["start a", "stop a"])

    def test_health_shows_the_probed_devices_from_the_start(self) -> None:
        self.start("4GiB")  # no time has passed: the first reading is taken as the daemon starts
        self.assertEqual(self.health()["devices"], {"ram": {"total": 10 * GiB, "free": 10 * GiB}})

    def test_a_measured_footprint_is_kept_shown_and_counted_when_larger(self) -> None:
        self.start("4GiB")  # a and b fit together, as declared
        self.backends["a"].measured = 7 * GiB  # but a really takes 7
        lease = self.successResultOf(self.manager.acquire("a"))
        self.clock.advance(2.0)  # the witness measures
        memory = self.health()["models"]["a"]["memory"]
        self.assertEqual(memory, {"declared": 4 * GiB, "measured": 7 * GiB, "estimated": None})
        self.assertEqual(self.health()["devices"], {"ram": {"total": 10 * GiB, "free": 4 * GiB}})
        scraped = samples(
            generate_latest(Metrics(EventBus(), self.manager.snapshot).registry).decode()
        )
        self.assertEqual(
            scraped[("llmswap_model_memory_measured_bytes", (("model", "a"),))], 7 * GiB
        )
        self.assertEqual(
            scraped[("llmswap_device_memory_used_bytes", (("device", "ram"),))], 6 * GiB
        )
        kept = json.loads((self.state / footprints.FILE).read_text())
        self.assertEqual(kept["a"]["bytes"], 7 * GiB)
        lease.release()
        self.successResultOf(self.manager.acquire("b")).release()
        # 7 + 4 > 10: a is evicted for b, which the declared figures alone would not do.
        self.assertEqual(self.events, ["start a", "stop a", "start b"])


class RealHostMemoryTests(DaemonTestCase):
    """The real probe on this machine's memory, through the daemon and a client."""

    @inlineCallbacks
    def test_a_model_larger_than_the_free_host_memory_is_refused_before_it_starts(self) -> Any:
        need = RamProbe().reading().total // MiB + 1024  # more than this machine has
        self.start(
            {"big": {**self.fake("big"), "memory": f"{need}MiB", "device": "ram"}},
            devices={"ram": {"memory": f"{need}MiB", "probe": "ram"}},
            state_dir=os.path.abspath(self.mktemp()),
        )
        response, body = yield self.post_json("/v1/chat/completions", {"model": "big"})
        self.assertEqual(response.code, 503)
        message = body["error"]["message"]
        self.assertRegex(
            message, r"^Model 'big' needs \d+ MiB on device 'ram', which has \d+ MiB free; "
        )
        free = int(message.split("which has ")[1].split(" MiB")[0])
        self.assertLess(free, need)
        self.assertEqual(starts(self.ledger), [])  # the backend was never started


class OutOfMemoryTests(DaemonTestCase):
    """Two models that fit their device as declared, but one runs out of memory loading beside
    the other (the fake prints CUDA's words and dies, as llama-server does)."""

    def boot(self, oom: str) -> None:
        models = {
            "a": self.fake("a", memory="4GiB", device="gpu", max_peers=2),
            "b": self.fake("b", memory="4GiB", device="gpu", max_peers=2, oom=oom),
        }
        self.start(models, devices={"gpu": {"memory": "10GiB"}}, linger=0)

    def told(self) -> list[tuple[str, str]]:
        kinds = ("start", "oom", "sigterm")
        return [(e["event"], e["name"]) for e in read_ledger(self.ledger) if e["event"] in kinds]

    @inlineCallbacks
    def test_a_load_out_of_memory_beside_another_puts_it_away_and_loads_once_more(self) -> Any:
        self.boot("beside-peers")
        yield self.chat("a")
        answer = yield self.chat("b")
        self.assertEqual(answer.choices[0].message.content, "Hello from b")
        self.assertEqual(
            self.told(),
            [("start", "a"), ("start", "b"), ("oom", "b"), ("sigterm", "a"), ("start", "b")],
        )
        health = yield self.health()
        self.assertEqual(health["models"]["a"]["state"], "stopped")

    @inlineCallbacks
    def test_out_of_memory_alone_too_is_an_error_that_says_so(self) -> Any:
        self.boot("always")
        yield self.chat("a")
        response, body = yield self.post_json("/v1/chat/completions", {"model": "b"})
        self.assertEqual(response.code, 503)
        self.assertEqual(
            body["error"]["message"],
            "Model 'b' ran out of memory while loading, and again alone on device 'gpu': it "
            "does not fit there",
        )
        self.assertEqual(self.told(), [("start", "a"), ("start", "b"), ("oom", "b"),
                                       ("sigterm", "a"), ("start", "b"), ("oom", "b")])  # fmt: skip
        health = yield self.health()  # the model is marked failed with that reason
        self.assertEqual(health["models"]["b"]["state"], "failed")
        self.assertEqual(health["models"]["b"]["error"], body["error"]["message"])
