"""Benchmark: the same mixed workload under ``fifo`` and under ``swap-aware``, in one run.

Three models are real processes (tests/fakebackend.py) that take ``--startup-delay`` seconds to
become healthy, like a scaled-down 90-180 s model load.  Several clients send interleaved
requests for random models, each waiting for its answer and thinking briefly before the next.
llmswap runs as its own ``twistd`` process, as users run it.  Loads are counted from the backends'
own ledger; queue waits come from llmswap's ``x-llmswap-queue-wait`` header.  Each client works
in sessions, like a user chatting with one model for a few turns, or a workflow run, before
moving to another model; the clients' sessions interleave.

A second part measures the linger bound (ski rental: a model that just answered waits for a
follow-up at most as long as its own reload would take): a lone user alternating two models,
and the mixed workload, each with ``linger_bound`` on and off, side by side.

    python -m bench.scheduler            # or: make bench
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import PYTHON, ROOT, free_port, llmswap, percentile, save

FAKE = ROOT / "tests" / "fakebackend.py"
MODELS = ("alpha", "beta", "gamma")


def fake_models(load: float, ledger: str, names: tuple[str, ...] = MODELS) -> dict[str, Any]:
    models = {}
    for name in names:
        backend = free_port()
        models[name] = {
            "cmd": [PYTHON, str(FAKE), "--port", str(backend), "--name", name,
                    "--startup-delay", str(load), "--ledger", ledger],
            "backend_url": f"http://127.0.0.1:{backend}/v1",
            "startup_timeout": 60,
        }  # fmt: skip
    return models


def chat(port: int, model: str, service: float) -> tuple[int, float]:
    """One request; returns its status and llmswap's queue wait for it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "fake_sleep": service}
    )
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    wait = float(response.getheader("x-llmswap-queue-wait") or "nan")
    conn.close()
    return response.status, wait


def loads(ledger: str) -> int:
    lines = Path(ledger).read_text().splitlines()
    return sum(1 for line in lines if json.loads(line)["event"] == "start")


def run(
    policy: str, args: argparse.Namespace, linger: float | None = None, load: float | None = None,
    bound: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """The mixed workload; ``linger``, ``load`` and ``bound`` override the arguments'."""
    ledger = os.path.join(tempfile.mkdtemp(prefix=f"llmswap-bench-{policy}-"), "ledger")
    settings = {
        "scheduler": policy,
        "max_wait_before_swap": args.max_wait,
        "linger": args.linger if linger is None else linger,
        "linger_bound": bound,
        "queue_size": 1000,
        "request_timeout": 3600,
    }
    waits: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    models = fake_models(args.startup_delay if load is None else load, ledger)
    with llmswap(models, **settings) as (port, _):

        def client(seed: int) -> None:
            rng = random.Random(seed)
            model, left = rng.choice(MODELS), 0
            for _ in range(args.requests):
                if left == 0:
                    model, left = rng.choice(MODELS), rng.randint(1, 2 * args.session - 1)
                left -= 1
                status, wait = chat(port, model, args.service)
                with lock:
                    if status == 200:
                        waits.append(wait)
                    else:
                        failures.append(status)
                time.sleep(rng.uniform(0, 2 * args.think))

        started = time.monotonic()
        threads = [
            threading.Thread(target=client, args=(args.seed + i,)) for i in range(args.clients)
        ]
        for t in threads:
            t.start()
            time.sleep(0.05)  # clients arrive interleaved, not in one burst
        for t in threads:
            t.join()
        total = time.monotonic() - started
    return {
        "policy": policy,
        "requests": len(waits) + len(failures),
        "failures": len(failures),
        "loads": loads(ledger),
        "total_s": total,
        "p50_wait_s": statistics.median(waits),
        "p95_wait_s": percentile(waits, 0.95),
        "max_wait_s": max(waits),
    }


def lone(args: argparse.Namespace, bound: bool) -> dict[str, Any]:
    """One user alternating two models: every request is a switch, and no follow-up for the
    loaded model ever comes; what each switch waits is the linger left plus the load."""
    ledger = os.path.join(tempfile.mkdtemp(prefix="llmswap-bench-lone-"), "ledger")
    settings = {"linger": args.study_linger, "linger_bound": bound, "request_timeout": 3600}
    waits = []
    with llmswap(fake_models(args.study_load, ledger, MODELS[:2]), **settings) as (port, _):
        for i in range(args.switches + 1):
            status, wait = chat(port, MODELS[i % 2], args.service)
            assert status == 200, status
            if i:  # the first request has nothing to switch from
                waits.append(wait)
            time.sleep(args.think)
    return {"loads": loads(ledger), "p50_switch_wait_s": statistics.median(waits),
            "max_switch_wait_s": max(waits)}  # fmt: skip


def linger_study(args: argparse.Namespace) -> dict[str, Any]:
    """linger_bound on and off, for a lone user and for the mixed workload, in one run."""
    results: dict[str, Any] = {}
    for bound in (False, True):
        name = "bound" if bound else "unbounded"
        results[f"lone, {name}"] = lone(args, bound)
        mixed = run("swap-aware", args, args.study_linger, args.study_load, bound)
        results[f"mixed, {name}"] = mixed
    print(
        f"\nlinger bound: linger {args.study_linger:g} s, load {args.study_load:g} s, "
        f"think {args.think:g} s; lone user: {args.switches} switches between two models"
    )
    print("| workload | linger_bound | loads | p50 wait s | max wait s |")
    print("|---|---|---|---|---|")
    for key, r in results.items():
        workload, name = key.split(", ")
        p50 = r.get("p50_switch_wait_s", r.get("p50_wait_s"))
        top = r.get("max_switch_wait_s", r.get("max_wait_s"))
        print(f"| {workload} | {name == 'bound'} | {r['loads']} | {p50:.2f} | {top:.2f} |")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--requests", type=int, default=15, help="per client")
    p.add_argument("--startup-delay", type=float, default=1.5, help="s a model takes to load")
    p.add_argument("--service", type=float, default=0.3, help="s a backend takes per request")
    p.add_argument("--think", type=float, default=0.3, help="mean s a client pauses")
    p.add_argument("--session", type=int, default=3, help="mean requests per session")
    p.add_argument("--max-wait", type=float, default=10.0, help="max_wait_before_swap")
    p.add_argument("--linger", type=float, default=0.5, help="linger")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--study-linger", type=float, default=2.0, help="linger, for the bound")
    p.add_argument("--study-load", type=float, default=1.0, help="load s, for the bound")
    p.add_argument("--switches", type=int, default=8, help="the lone user's")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    results = {policy: run(policy, args) for policy in ("fifo", "swap-aware")}
    fifo, aware = results["fifo"], results["swap-aware"]
    ratios = {
        "loads fifo/swap-aware": fifo["loads"] / max(1, aware["loads"]),
        "p50 wait fifo/swap-aware": fifo["p50_wait_s"] / max(1e-9, aware["p50_wait_s"]),
        "total fifo/swap-aware": fifo["total_s"] / aware["total_s"],
    }
    print(
        f"workload: {args.clients} clients x {args.requests} requests over {len(MODELS)} models,"
        f" load {args.startup_delay:g} s, service {args.service:g} s, think ~{args.think:g} s,"
        f" sessions of ~{args.session} requests, max_wait_before_swap {args.max_wait:g} s,"
        f" linger {args.linger:g} s"
    )
    print("| policy | requests | failed | loads | total s | p50 wait s | p95 wait s | max wait s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        print(
            f"| {r['policy']} | {r['requests']} | {r['failures']} | {r['loads']} "
            f"| {r['total_s']:.1f} | {r['p50_wait_s']:.2f} | {r['p95_wait_s']:.2f} "
            f"| {r['max_wait_s']:.2f} |"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.1f}x")
    bound = args.max_wait + len(MODELS) * (args.startup_delay + args.service)
    print(
        f"swap-aware max wait {aware['max_wait_s']:.1f} s vs bound + one load per model "
        f"{bound:.1f} s"
    )
    study = linger_study(args)
    out = {"args": vars(args), "results": results, "ratios": ratios, "linger_bound": study}
    return save(out, args.json)


if __name__ == "__main__":
    main()
