"""Prometheus metrics, served at ``GET /metrics`` by ``prometheus_client``'s Twisted resource.

Counters and histograms follow the event stream (requests ended, swaps); queue depth, in-flight
requests and model states are read from a snapshot when Prometheus scrapes, so they are never
stale, and a scrape costs the same with ten thousand waiting requests as with none.  Each daemon
has its own registry (several can run in one process, as in tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.twisted import MetricsResource

from llmswap.events import (
    EventBus,
    MemoryFreed,
    ModelState,
    ModelStateChanged,
    RequestEnded,
    Swap,
)
from llmswap.swap.snapshot import Snapshot

_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_LOADS = (0.5, 1, 2, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600)


class _State(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "llmswap_queue_depth", "Requests waiting for a model", labels=["model"]
        )
        running = GaugeMetricFamily(
            "llmswap_in_flight", "Requests being relayed to a model", labels=["model"]
        )
        state = GaugeMetricFamily(
            "llmswap_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        up = GaugeMetricFamily(
            "llmswap_host_up", "1 if the host's Docker engine answered its last call",
            labels=["host"],
        )  # fmt: skip
        placed = GaugeMetricFamily(
            "llmswap_model_host", "1 for the host each model instance runs on",
            labels=["model", "host"],
        )  # fmt: skip
        total = GaugeMetricFamily(
            "llmswap_device_memory_total_bytes", "A probed device's memory", labels=["device"]
        )
        used = GaugeMetricFamily(
            "llmswap_device_memory_used_bytes", "A probed device's memory in use, by anyone",
            labels=["device"],
        )  # fmt: skip
        busy = GaugeMetricFamily(
            "llmswap_device_utilization_ratio", "A GPU's busy share (NVML), 0 to 1",
            labels=["device"],
        )  # fmt: skip
        heat = GaugeMetricFamily(
            "llmswap_device_temperature_celsius", "A GPU's temperature (NVML)", labels=["device"]
        )
        power = GaugeMetricFamily(
            "llmswap_device_power_watts", "A GPU's power draw (NVML)", labels=["device"]
        )
        measured = GaugeMetricFamily(
            "llmswap_model_memory_measured_bytes",
            "The peak a model held on its probed device (kept across restarts)", labels=["model"],
        )  # fmt: skip
        killed = CounterMetricFamily(
            "llmswap_backend_killed",
            "Stops that ended in SIGKILL: the backend ignored SIGTERM for its stop_timeout",
            labels=["model"],
        )
        lingers = CounterMetricFamily(
            "llmswap_lingers",
            "Bets that an idle model's follow-up comes while another model's requests wait: "
            "paid (it came) or wasted",
            labels=["model", "outcome"],
        )
        snap = self._snapshot()
        for device, reading in snap.devices.items():
            total.add_metric([device], reading.total)
            used.add_metric([device], reading.used)
            for family, value in ((busy, reading.utilization), (heat, reading.temperature),
                                  (power, reading.power)):  # fmt: skip
                if value is not None:
                    family.add_metric([device], value)
        for name, model in snap.instances.items():
            if model.measured is not None:
                measured.add_metric([name], model.measured)
            depth.add_metric([name], model.waiting)
            running.add_metric([name], model.in_flight)
            for s in ModelState:
                state.add_metric([name, s.value], 1.0 if model.state is s else 0.0)
            placed.add_metric([name, model.host], 1.0)
            killed.add_metric([name], model.backend.get("killed", 0))
            for outcome in ("paid", "wasted"):
                lingers.add_metric([name, outcome], model.linger.get(outcome, 0))
        for name, host in snap.hosts.items():
            up.add_metric([name], 0.0 if host.error else 1.0)
        yield from (depth, running, state, up, placed, total, used, busy, heat, power, measured)
        yield from (killed, lingers)


class Metrics:
    def __init__(self, bus: EventBus, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmswap_requests",
            "Requests answered, by model, HTTP status and API key name",
            ["model", "status", "key"],
            registry=r,
        )
        self.pooled = Counter(
            "llmswap_pool_requests",
            "Requests that named a pool, by pool and the member that served them",
            ["pool", "model"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "llmswap_queue_wait_seconds",
            "Time a request waited for its backend (queue and swap)",
            ["model"],
            buckets=_FAST,
            registry=r,
        )
        self.duration = Histogram(
            "llmswap_request_duration_seconds",
            "Time from request to last byte relayed",
            ["model"],
            buckets=_FAST,
            registry=r,
        )
        self.ttft = Histogram(
            "llmswap_time_to_first_token_seconds",
            "Streams: time from request to the first event relayed",
            ["model"],
            buckets=_FAST,
            registry=r,
        )
        self.swaps = Counter(
            "llmswap_swaps", "Model loads, by the model evicted for it", ["from", "to"], registry=r
        )
        self.wakes = Counter(
            "llmswap_wakes", "Loads that woke a sleeping backend (counted as loads too)",
            ["model"], registry=r,
        )  # fmt: skip
        self.load = Histogram(
            "llmswap_load_seconds",
            "Time from starting (or waking) a backend to it answering healthy",
            ["model"],
            buckets=_LOADS,
            registry=r,
        )
        self.free_wait = Histogram(
            "llmswap_device_free_wait_seconds",
            "Time a start waited for a probed device to show the memory a stop gave back",
            ["device"],
            buckets=_FAST,
            registry=r,
        )
        self.restarts = Counter(
            "llmswap_model_restarts",
            "Starts of a model after it crashed or failed to load (crash backoff spaces them)",
            ["model"],
            registry=r,
        )
        self.tokens = Counter(
            "llmswap_tokens",
            "Tokens reported by backends (usage), by direction: prompt or completion",
            ["model", "direction"],
            registry=r,
        )
        # labels() takes a lock and builds a key on every call; the hot path looks children up
        # once per model and (model, status, key).
        self._per_model: dict[str, tuple[Any, ...]] = {}
        self._per_outcome: dict[tuple[str, int, str], Any] = {}
        self.registry.register(_State(snapshot))
        bus.subscribe(RequestEnded, self._answered)
        bus.subscribe(Swap, self._swapped)
        bus.subscribe(MemoryFreed, lambda e: self.free_wait.labels(e.device).observe(e.waited))
        bus.subscribe(ModelStateChanged, self._changed)

    def resource(self) -> Any:
        return MetricsResource(registry=self.registry)

    def _changed(self, e: ModelStateChanged) -> None:
        if e.old is ModelState.FAILED and e.new is ModelState.STARTING:
            self.restarts.labels(e.model).inc()

    def _swapped(self, swap: Swap) -> None:
        if swap.loaded is None or swap.load_seconds is None:
            return
        for old in swap.unloaded or ("none",):
            self.swaps.labels(old, swap.loaded).inc()
        self.load.labels(swap.loaded).observe(swap.load_seconds)
        if swap.woke:
            self.wakes.labels(swap.loaded).inc()

    def _answered(self, e: RequestEnded) -> None:
        model = e.model if e.configured else "-"  # client text must not become a label
        outcome = self._per_outcome.get((model, e.status, e.key))
        if outcome is None:
            outcome = self._per_outcome[model, e.status, e.key] = self.requests.labels(
                model, str(e.status), e.key
            )
        outcome.inc()
        if e.pool is not None:
            self.pooled.labels(e.pool, model).inc()
        children = self._per_model.get(model)
        if children is None:
            children = self._per_model[model] = (
                self.duration.labels(model),
                self.queue_wait.labels(model),
                self.ttft.labels(model),
                self.tokens.labels(model, "prompt"),
                self.tokens.labels(model, "completion"),
            )
        duration_h, wait_h, ttft_h, prompt_c, completion_c = children
        duration_h.observe(e.duration)
        if e.queue_wait is not None:
            wait_h.observe(e.queue_wait)
        if e.first_byte is not None:
            ttft_h.observe(e.first_byte)
        if e.prompt_tokens is not None and e.completion_tokens is not None:
            prompt_c.inc(e.prompt_tokens)
            completion_c.inc(e.completion_tokens)
