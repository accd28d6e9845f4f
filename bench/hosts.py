"""Benchmark: the same two models on one box, and on two boxes.

Two fake backends (tests/fakebackend.py) run in containers and take ``--load`` seconds to become
healthy, as a model's load does.  On one host (the local engine, no declared devices: one model
at a time) they take turns on the box; on two hosts (the second engine is its own dockerd over
TCP with TLS, tests/tools/docker-second-up.sh) each has a box.  Two workloads, each run on both
setups in one run:

- ``alternating``: one client asks a, b, a, b... (``--requests`` in all);
- ``two users``: two clients at once, each asking its own model ``--requests`` times with
  ``--think`` seconds between answers.

Reported: loads (container starts, from the backends' own ledger), total seconds, and each
request's latency (p50, max).  Needs both engines (``make docker-up``).

    python -m bench.hosts [--requests 8] [--load 1.0] [--think 0.2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

from bench.harness import free_port, llmswap, save
from tests.support import FAKE, read_ledger
from tests.test_docker import (
    IMAGE,
    SECOND,
    SECOND_TLS,
    SECOND_URL,
    docker,
    ensure_image,
    host_mounts,
)

SETUPS = ("one host", "two hosts")
WORKLOADS = ("alternating", "two users")


def chat(port: int, model: str) -> float:
    """One request; its latency in seconds."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{model}: HTTP {response.status}")
    return time.monotonic() - started


def containers(setup: str, load: float, ledger: str, prefix: str) -> dict[str, Any]:
    """Models a and b, each a created container (b on the second engine with two hosts)."""
    models = {}
    for name in ("a", "b"):
        engine = SECOND if setup == "two hosts" and name == "b" else ()
        port = free_port()
        container = f"{prefix}-{name}"
        docker(
            *engine, "create", "--name", container, "--network", "host", "--pid", "host",
            *host_mounts(os.path.dirname(ledger)), IMAGE, sys.executable, str(FAKE),
            "--port", str(port), "--name", name, "--startup-delay", str(load),
            "--ledger", ledger, "--max-peers", "99",
        )  # fmt: skip
        models[name] = {
            "container_name": container,
            "backend_url": f"http://127.0.0.1:{port}/v1",
            "startup_timeout": 60,
            "stop_timeout": 3,
        }
        if setup == "two hosts":
            models[name]["host"] = "box2" if name == "b" else "local"
    return models


def run(setup: str, workload: str, args: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="llmswap-bench-hosts-")
    ledger = os.path.join(tmp, "ledger")
    prefix = f"llmswap-bench-{uuid.uuid4().hex[:8]}"
    hosts = {"box2": {"docker": {"base_url": SECOND_URL, "tls": SECOND_TLS}}}
    extra = {"hosts": hosts} if setup == "two hosts" else {}
    latencies: list[float] = []
    try:
        with llmswap(containers(setup, args.load, ledger, prefix), **extra) as (port, _):
            started = time.monotonic()
            if workload == "alternating":
                for i in range(args.requests):
                    latencies.append(chat(port, "ab"[i % 2]))
            else:

                def user(model: str) -> None:
                    for _ in range(args.requests):
                        latencies.append(chat(port, model))
                        time.sleep(args.think)

                users = [threading.Thread(target=user, args=(m,)) for m in "ab"]
                for t in users:
                    t.start()
                for t in users:
                    t.join()
            total = time.monotonic() - started
    finally:
        for engine in ((), SECOND):
            names = docker(*engine, "ps", "-aq", "--filter", f"name={prefix}").stdout.split()
            if names:
                docker(*engine, "rm", "-f", *names, check=False)
    loads = sum(1 for e in read_ledger(ledger) if e["event"] == "start")
    return {
        "requests": len(latencies),
        "loads": loads,
        "total_s": round(total, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "max_s": round(max(latencies), 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=8, help="per workload (per user)")
    p.add_argument("--load", type=float, default=1.0, help="s a model takes to load")
    p.add_argument("--think", type=float, default=0.2, help="s a user waits between requests")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    ensure_image()
    ensure_image(*SECOND)
    results: dict[str, Any] = {}
    for workload in WORKLOADS:
        results[workload] = {setup: run(setup, workload, args) for setup in SETUPS}
    print(f"{'workload':<12} {'setup':<10} {'loads':>5} {'total s':>8} {'p50 s':>7} {'max s':>7}")
    for workload, by_setup in results.items():
        for setup, r in by_setup.items():
            print(f"{workload:<12} {setup:<10} {r['loads']:>5} {r['total_s']:>8} "
                  f"{r['p50_s']:>7} {r['max_s']:>7}")  # fmt: skip
    return save({"settings": vars(args), "results": results}, args.json)


if __name__ == "__main__":
    main()
