"""A minute of chaos from a fixed seed (``bench/chaos.py``; ``make chaos SECONDS=3600`` is the
long run): an outside witness must see nothing over budget, no request lost, cut or answered
out of its API's shape, and nothing left running after llmswap stops.  A failure names its
seed: the same seed draws the same faults."""

from __future__ import annotations

import json

import pytest

from bench import chaos

pytestmark = [pytest.mark.slow, pytest.mark.docker]

SEED = 7


def test_a_minute_of_chaos_loses_nothing_and_leaves_nothing() -> None:
    out = chaos.chaos(seconds=60, seed=SEED, clients=8, timeout=180)
    shown = json.dumps({k: v for k, v in out.items() if k != "resources_samples"}, indent=1)
    assert out["witness_errors"] == [] and out["witness_samples"] >= 600, shown
    violations = out["violations"]
    assert violations["over_budget_count"] == 0, shown
    assert violations["fake_ledger_overlaps"] == 0, shown
    assert (violations["cut"], violations["malformed"], out["lost"]) == (0, 0, 0), shown
    assert out["left_after_stop"] == [], shown
    for route in ("openai", "ollama", "anthropic"):
        assert out["requests"].get(f"{route} answered", 0) > 0, shown
    assert sum(out["faults"].values()) >= 10 and len(out["faults"]) >= 5, shown
    assert set(out["backend_starts"]) >= {"local"}, shown
    assert out["passed"], shown
