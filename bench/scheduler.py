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
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fakebackend.py"
MODELS = ("alpha", "beta", "gamma")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(policy: str, args: argparse.Namespace, ledger: str, port: int) -> dict[str, Any]:
    models = {}
    for name in MODELS:
        backend = free_port()
        models[name] = {
            "cmd": [
                sys.executable,
                str(FAKE),
                "--port",
                str(backend),
                "--name",
                name,
                "--startup-delay",
                str(args.startup_delay),
                "--ledger",
                ledger,
            ],
            "backend_url": f"http://127.0.0.1:{backend}/v1",
            "startup_timeout": 60,
        }
    return {
        "listen": f"tcp:{port}:interface=127.0.0.1",
        "scheduler": policy,
        "max_wait_before_swap": args.max_wait,
        "linger": args.linger,
        "queue_size": 1000,
        "request_timeout": 3600,
        "models": models,
    }


def post(port: int, model: str, service: float) -> tuple[int, float]:
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
    workdir = tempfile.mkdtemp(prefix=f"llmswap-bench-{policy}-")
    ledger = os.path.join(workdir, "ledger")
    port = free_port()
    path = os.path.join(workdir, "llmswap.yaml")
    cfg = config(policy, args, ledger, port)
    cfg["log_dir"] = workdir
    Path(path).write_text(yaml.safe_dump(cfg))
    twistd = Path(sys.executable).with_name("twistd")
    daemon = subprocess.Popen(
        [
            str(twistd),
            "-n",
            "--pidfile=",
            "--logfile",
            os.path.join(workdir, "llmswap.log"),
            "llmswap",
            "--config",
            path,
        ],
        cwd=workdir,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                c.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit(f"llmswap did not start; see {workdir}/llmswap.log") from None
                time.sleep(0.1)
        waits: list[float] = []
        failures: list[int] = []
        lock = threading.Lock()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            model, left = rng.choice(MODELS), 0
            for _ in range(args.requests):
                if left == 0:
                    model, left = rng.choice(MODELS), rng.randint(1, 2 * args.session - 1)
                left -= 1
                status, wait = post(port, model, args.service)
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
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    loads = sum(
        1 for line in Path(ledger).read_text().splitlines() if json.loads(line)["event"] == "start"
    )
    waits.sort()
    return {
        "policy": policy,
        "requests": len(waits) + len(failures),
        "failures": len(failures),
        "loads": loads,
        "total_s": total,
        "p50_wait_s": statistics.median(waits),
        "p95_wait_s": waits[min(len(waits) - 1, int(0.95 * len(waits)))],
        "max_wait_s": waits[-1],
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
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
