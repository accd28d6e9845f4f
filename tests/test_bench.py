"""Each benchmark runs at a tiny size, so the scripts cannot rot.  No timing is asserted."""

from __future__ import annotations

from bench import scheduler


def test_scheduler_benchmark_runs_both_policies() -> None:
    out = scheduler.main(
        [
            "--clients",
            "2",
            "--requests",
            "2",
            "--startup-delay",
            "0.1",
            "--service",
            "0.01",
            "--think",
            "0.01",
            "--max-wait",
            "1",
        ]
    )
    for policy in ("fifo", "swap-aware"):
        result = out["results"][policy]
        assert (result["requests"], result["failures"]) == (4, 0)
        assert result["loads"] >= 1
