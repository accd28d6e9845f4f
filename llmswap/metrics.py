"""Prometheus metrics, served at ``GET /metrics`` by ``prometheus_client``'s Twisted resource.

Counters and histograms are updated as requests finish and swaps happen; queue depth, in-flight
requests and model states are read from the swap manager when Prometheus scrapes, so they are
never stale.  Each daemon has its own registry (several can run in one process, as in tests).
Token counts come from the ``usage`` object backends put at the end of a response (or in the last
event of a stream): only the response's tail is kept and parsed, once, after the last byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.twisted import MetricsResource

if TYPE_CHECKING:
    from llmswap.manager import SwapManager

_STATES = ("stopped", "starting", "ready", "draining", "stopping", "failed")
_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_LOADS = (0.5, 1, 2, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600)
_DECODER = json.JSONDecoder()


def usage_from(tail: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from the last ``"usage"`` object in ``tail``."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    start = tail.find(b"{", at)
    if start < 0:
        return None
    try:
        usage, _ = _DECODER.raw_decode(tail[start:].decode("utf-8", "replace"))
    except ValueError:
        return None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


class _ManagerState(Collector):
    def __init__(self, manager: SwapManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        health = self._manager.health()
        depth = GaugeMetricFamily(
            "llmswap_queue_depth", "Requests waiting for a model", labels=["model"]
        )
        running = GaugeMetricFamily(
            "llmswap_in_flight", "Requests being relayed to a model", labels=["model"]
        )
        state = GaugeMetricFamily(
            "llmswap_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        for name, model in health["models"].items():
            depth.add_metric([name], model["waiting"])
            running.add_metric([name], model["in_flight"])
            for s in _STATES:
                state.add_metric([name, s], 1.0 if model["state"] == s else 0.0)
        yield depth
        yield running
        yield state


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmswap_requests",
            "Requests answered, by model, HTTP status and API key name",
            ["model", "status", "key"],
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
        self.load = Histogram(
            "llmswap_load_seconds",
            "Time from starting a backend to it answering healthy",
            ["model"],
            buckets=_LOADS,
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

    def watch(self, manager: SwapManager) -> None:
        self.registry.register(_ManagerState(manager))

    def resource(self) -> Any:
        return MetricsResource(registry=self.registry)

    def swapped(self, evicted: tuple[str, ...], model: str, load_seconds: float) -> None:
        for old in evicted or ("none",):
            self.swaps.labels(old, model).inc()
        self.load.labels(model).observe(load_seconds)

    def answered(
        self,
        model: str,
        status: int,
        key: str,
        waited: float | None,
        duration: float,
        first_byte: float | None,
        tail: bytes,
    ) -> None:
        outcome = self._per_outcome.get((model, status, key))
        if outcome is None:
            outcome = self._per_outcome[model, status, key] = self.requests.labels(
                model, str(status), key
            )
        outcome.inc()
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
        duration_h.observe(duration)
        if waited is not None:
            wait_h.observe(waited)
        if first_byte is not None:
            ttft_h.observe(first_byte)
        usage = usage_from(tail) if tail else None
        if usage is not None:
            prompt_c.inc(usage[0])
            completion_c.inc(usage[1])
