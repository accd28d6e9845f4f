"""Benchmark: llmswap's CPU time per relayed request, for two source trees side by side.

Latency and throughput on a shared machine move with the other core's load; the daemon's own CPU
seconds (``/proc/<pid>/stat``) over a ``wrk -c 32`` run, divided by the requests it served, move
far less, so this is the measure for a change on the request path.  Each round runs every tree
once, in turn, as ``twistd llmswap`` with ``PYTHONPATH`` set to the tree (both trees under the
same directory: where the code runs from shows in the figures), without keys and with an
``auth`` section (a key checked on every request).

    git worktree add /tmp/ab/before <commit>; git worktree add /tmp/ab/after HEAD
    python -m bench.cpu /tmp/ab/before /tmp/ab/after [--rounds 6] [--seconds 4]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import fast_backend_model, free_port, llmswap, save
from bench.overhead import BODY

KEY = "sk-bench-0123456789abcdefghijklmnop"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests_served(port: int, seconds: float, key: str | None) -> int:
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(f"wrk.method = 'POST'\nwrk.body = '{BODY}'\n"
                 "wrk.headers['Content-Type'] = 'application/json'\n"
                 + (f"wrk.headers['Authorization'] = 'Bearer {key}'\n" if key else ""))  # fmt: skip
    script.close()
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", "32", "-d", f"{max(1, round(seconds))}s", "-s", script.name,
         f"http://127.0.0.1:{port}/v1/chat/completions"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "Non-2xx" not in out, out
    return int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]


def one(tree: str, seconds: float, keyed: bool) -> float:
    """CPU µs per request of ``tree``'s daemon."""
    os.environ["PYTHONPATH"] = tree
    settings: dict[str, Any] = {"auth": {"keys": [{"name": "bench", "key": KEY}]}} if keyed else {}
    key = KEY if keyed else None
    with llmswap({"bench": fast_backend_model(free_port())}, **settings) as (port, proc):
        requests_served(port, 1, key)  # warm-up: the first load
        before = cpu_seconds(proc.pid)
        served = requests_served(port, seconds, key)
        return (cpu_seconds(proc.pid) - before) / served * 1e6


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("trees", nargs="+")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for keyed in (False, True):
            for tree in args.trees:
                row = f"{tree} {'keyed' if keyed else 'open'}"
                results.setdefault(row, []).append(one(tree, args.seconds, keyed))
                print(f"{row}: {results[row][-1]:.0f} µs", flush=True)
    for row, values in results.items():
        print(f"{row}: median {statistics.median(values):.0f} µs per request "
              f"({', '.join(f'{v:.0f}' for v in values)})")  # fmt: skip
    return save({"cpu_us_per_request": results}, args.json)


if __name__ == "__main__":
    main()
