"""Each benchmark runs at a tiny size, so the scripts cannot rot.  No timing is asserted."""

from __future__ import annotations

import pytest

from bench import hosts, memory, overhead, router, scale, scheduler, streaming, swap

pytestmark = pytest.mark.slow


def test_scheduler_benchmark_runs_both_policies() -> None:
    out = scheduler.main(
        ["--clients", "2", "--requests", "2", "--startup-delay", "0.1", "--service", "0.01",
         "--think", "0.01", "--max-wait", "1", "--study-load", "0.1", "--study-linger", "0.2",
         "--switches", "2"]
    )  # fmt: skip
    for policy in ("fifo", "swap-aware"):
        result = out["results"][policy]
        assert (result["requests"], result["failures"]) == (4, 0)
        assert result["loads"] >= 1
    study = out["linger_bound"]
    assert set(study) == {"lone, unbounded", "mixed, unbounded", "lone, bound", "mixed, bound"}
    assert study["lone, bound"]["loads"] == 3  # every request of the lone user is a switch


def test_overhead_benchmark_measures_every_target() -> None:
    out = overhead.main(["--seconds", "1"])
    assert set(out["results"]) == {
        "direct",
        "llmswap",
        "llmswap, access_log: false",
        "llmswap, Ollama /api/chat",
        "llmswap, 5 consoles open",
        "floor klein+treq",
        "floor aiohttp+client",
    }
    for result in out["results"].values():
        assert result["c1"]["rps"] > 0 and result["c32"]["errors"] == 0


def test_streaming_benchmark_loses_nothing() -> None:
    out = streaming.main(["--events", "200", "--streams", "8", "--per-stream", "20"])
    for cases in out["results"].values():
        for r in cases.values():
            assert (r["complete_streams"], r["events_lost"]) == (r["streams"], 0)


def test_scale_benchmark_answers_every_waiting_request() -> None:
    out = scale.main(["--waiting", "50", "--held", "20", "--streams", "20", "--events", "5"])
    assert [q["answered_200"] for q in out["queue"].values()] == [50, 50]  # plain, streams
    assert set(out["held"]) == {"llmswap", "floor klein+treq", "floor aiohttp+client"}
    assert out["streams"]["events_lost"] == 0


def test_memory_benchmark_measures_every_layer() -> None:
    out = memory.main(["--pending", "20"])
    assert list(out["results"]) == list(memory.LAYERS)
    assert all(per > 0 for per in out["results"].values())


@pytest.mark.llama
def test_swap_benchmark_decomposes_real_swaps() -> None:
    out = swap.main(["--swaps", "1", "--rounds", "1", "--busy-tokens", "8", "--switches", "2"])
    assert len(out["swaps"]) == 1
    assert all(v >= 0 for v in out["swaps"][0].values())
    assert set(out["page_cache"]["median_ms"]) == {"evicted", "prefetched", "warm"}
    assert set(out["sleep"]) == {"sleep/wake", "stop/start"}


@pytest.mark.docker
def test_hosts_benchmark_runs_both_workloads_on_one_and_two_hosts() -> None:
    out = hosts.main(["--requests", "2", "--load", "0.2", "--think", "0.01"])
    for workload in ("alternating", "two users"):
        by_setup = out["results"][workload]
        assert [by_setup[s]["requests"] for s in ("one host", "two hosts")] == [
            2 if workload == "alternating" else 4
        ] * 2
        assert by_setup["two hosts"]["loads"] == 2  # each model loads once, on its own box


@pytest.mark.llama
def test_router_benchmark_runs_every_system_on_the_real_binary() -> None:
    out = router.main(["--rounds", "1", "--workloads", "lone"])
    lone = out["summary"]["lone"]
    assert set(lone) == {"llama-server router", "llmswap", "llmswap, users named",
                         "llmswap, Ollama route"}  # fmt: skip
    for name, system in lone.items():
        assert system["failed"] == 0 and system["most_alive"] == 1
        assert system["loads"] == [8]  # a lone user alternating: every request is a switch
        # The proxy's own process was measured (the router's may use less than a clock tick).
        assert system["cpu"][0] > 0 or name == "llama-server router"
