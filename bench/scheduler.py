"""Benchmark: the same mixed workload under ``fifo`` and under ``swap-aware``, in one run.

Three models are real processes (tests/fakebackend.py) that take ``--startup-delay`` seconds to
become healthy, like a scaled-down 90-180 s model load.  Several clients send interleaved
requests for random models, each waiting for its answer and thinking briefly before the next.
llmswap runs as its own ``twistd`` process, as users run it.  Loads are counted from the backends'
own ledger; queue waits come from llmswap's ``x-llmswap-queue-wait`` header.  Each client works
in sessions, like a user chatting with one model for a few turns, or a workflow run, before
moving to another model; the clients' sessions interleave.

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


def fake_models(args: argparse.Namespace, ledger: str) -> dict[str, Any]:
    models = {}
    for name in MODELS:
        backend = free_port()
        models[name] = {
            "cmd": [PYTHON, str(FAKE), "--port", str(backend), "--name", name,
                    "--startup-delay", str(args.startup_delay), "--ledger", ledger],
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


def run(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    ledger = os.path.join(tempfile.mkdtemp(prefix=f"llmswap-bench-{policy}-"), "ledger")
    settings = {
        "scheduler": policy,
        "max_wait_before_swap": args.max_wait,
        "linger": args.linger,
        "queue_size": 1000,
        "request_timeout": 3600,
    }
    waits: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    with llmswap(fake_models(args, ledger), **settings) as (port, _):

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
    loads = sum(
        1 for line in Path(ledger).read_text().splitlines() if json.loads(line)["event"] == "start"
    )
    return {
        "policy": policy,
        "requests": len(waits) + len(failures),
        "failures": len(failures),
        "loads": loads,
        "total_s": total,
        "p50_wait_s": statistics.median(waits),
        "p95_wait_s": percentile(waits, 0.95),
        "max_wait_s": max(waits),
    }


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
    out = {"args": vars(args), "results": results, "ratios": ratios}
    return save(out, args.json)


if __name__ == "__main__":
    main()
