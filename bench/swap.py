"""Benchmark: where a swap's time goes, with real llama-server processes.

Two llama-server models (the built-in Gemma 3 270M configuration) are requested alternately
through llmswap.  Independent pollers watch, every ``--poll`` seconds, each backend's port and
``/health`` and llmswap's own ``/health``, so a swap splits into:

- stop: the old backend stopped and confirmed gone (llmswap's log line);
- process start: llmswap marks the model starting -> the new process accepts connections;
- model load: accepting connections -> its ``/health`` answers 200;
- readiness detection: its ``/health`` answered 200 -> llmswap marks it ready and forwards.

The pollers' own period bounds the precision of each cut (about ``--poll``).

    python -m bench.swap [--swaps 6]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import free_port, get, llmswap, post, save


class Poller(threading.Thread):
    """Records when each watched condition first holds after ``arm()``."""

    def __init__(self, interval: float, checks: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.checks = checks
        self.seen: dict[str, float] = {}
        self.armed = threading.Event()
        self.stop = threading.Event()

    def arm(self) -> None:
        self.seen = {}
        self.armed.set()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.armed.is_set():
                for name, check in self.checks.items():
                    if name not in self.seen and check():
                        self.seen[name] = time.monotonic()
            time.sleep(self.interval)


def accepts(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.connect()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def healthy(port: int) -> bool:
    try:
        return get(port, "/health", timeout=1)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--swaps", type=int, default=6)
    p.add_argument("--poll", type=float, default=0.002, help="s between the pollers' looks")
    p.add_argument("--json")
    args = p.parse_args(argv)
    from llmswap.defaults import llama_assets

    binary, gguf = llama_assets()
    names = ["gemma3", "gemma3-creative"]
    ports = {name: free_port() for name in names}
    extra = {"gemma3": ["-c", "4096", "--temp", "0.7"], "gemma3-creative": ["-c", "2048"]}
    models = {
        name: {
            "cmd": [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), *extra[name]],
            "backend_url": f"http://127.0.0.1:{port}/v1",
            "startup_timeout": 120,
        }
        for name, port in ports.items()
    }
    rows: list[dict[str, float]] = []
    with llmswap(models) as (proxy, proc):
        log = Path(proc.args[proc.args.index("--logfile") + 1])

        def llmswap_state(name: str, wanted: str) -> bool:
            return bool(json.loads(get(proxy, "/health")[1])["models"][name]["state"] == wanted)

        for i in range(args.swaps + 1):
            target = names[i % 2]
            port = ports[target]
            checks = {
                "starting": lambda t=target: llmswap_state(t, "starting"),
                "accepts": lambda port=port: accepts(port),
                "healthy": lambda port=port: healthy(port),
                "ready": lambda t=target: llmswap_state(t, "ready"),
            }
            poller = Poller(args.poll, checks)
            poller.start()
            poller.arm()
            body = {
                "model": target,
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "hi"}],
            }
            status, _ = post(proxy, "/v1/chat/completions", json.dumps(body).encode(), timeout=300)
            poller.stop.set()
            poller.join()
            assert status == 200, status
            seen = poller.seen
            if i == 0 or len(seen) < 4:
                continue  # the first load has nothing to stop
            rows.append(
                {
                    "process_start_ms": (seen["accepts"] - seen["starting"]) * 1e3,
                    "model_load_ms": (seen["healthy"] - seen["accepts"]) * 1e3,
                    "detection_ms": (seen["ready"] - seen["healthy"]) * 1e3,
                }
            )
            time.sleep(0.2)
        stops = [float(s) * 1e3 for s in re.findall(r"swap gemma3\S* -> \S+: stop ([\d.]+) s",
                                                   log.read_text())]  # fmt: skip
    for row, stop in zip(rows, stops, strict=False):
        row["stop_ms"] = stop
    keys = ("stop_ms", "process_start_ms", "model_load_ms", "detection_ms")
    summary = {k: statistics.median(r[k] for r in rows if k in r) for k in keys}
    print(f"Swap decomposition, real llama-server (Gemma 3 270M), {len(rows)} swaps, "
          f"pollers every {args.poll * 1e3:g} ms; medians:")  # fmt: skip
    print("| stop ms | process start ms | model load ms | readiness detection ms |")
    print("|---|---|---|---|")
    print("| " + " | ".join(f"{summary[k]:.1f}" for k in keys) + " |")
    print("max detection ms: " + f"{max(r['detection_ms'] for r in rows):.1f}")
    out = {"args": vars(args), "swaps": rows, "median": summary}
    return save(out, args.json)


if __name__ == "__main__":
    main()
