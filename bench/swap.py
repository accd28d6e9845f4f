"""Benchmark: where a swap's time goes, with real llama-server processes.

Two llama-server models (the built-in Gemma 3 270M configuration) are requested alternately
through llmswap.  Independent pollers watch, every ``--poll`` seconds, each backend's port and
``/health`` and llmswap's own ``/health``, so a swap splits into:

- stop: the old backend stopped and confirmed gone (llmswap's log line);
- process start: llmswap marks the model starting -> the new process accepts connections;
- model load: accepting connections -> its ``/health`` answers 200;
- readiness detection: its ``/health`` answered 200 -> llmswap marks it ready and forwards.

The pollers' own period bounds the precision of each cut (about ``--poll``).

Then, side by side in one run:

- the page cache: the same swap (a model busy answering, a request for another arrives) with the
  new model's weights evicted from the page cache, read ahead by llmswap while the busy model
  answers (``prefetch``), and already cached (warm); real llama-server, each with its own copy of
  the GGUF so that one's cache state is not another's;
- sleep: switches between two fake backends that serve vLLM's sleep API (wake instead of start)
  vs. two that are stopped and started, all with no load time of their own: what llmswap's two
  ways to unload and load cost.

    python -m bench.swap [--swaps 6] [--rounds 3] [--switches 8]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import PYTHON, ROOT, free_port, get, llmswap, post, save


class Poller(threading.Thread):
    """Records when each watched condition first holds after ``arm()``, in order: a stage is
    recorded only once the ones before it were (llmswap may see its backend healthy between
    this poller's own two checks, which would put "ready" before "healthy")."""

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
                    if name in self.seen:
                        continue
                    if not check():
                        break
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
    p.add_argument("--rounds", type=int, default=3, help="of each page-cache case")
    p.add_argument("--busy-tokens", type=int, default=64, help="the busy model's answer")
    p.add_argument("--switches", type=int, default=8, help="per sleep/stop case")
    p.add_argument("--json")
    args = p.parse_args(argv)
    out = decompose(args)
    out["page_cache"] = page_cache(args)
    out["sleep"] = sleep_vs_stop(args)
    return save(out, args.json)


def decompose(args: argparse.Namespace) -> dict[str, Any]:
    from llmswap.config.defaults import llama_assets

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
    return {"args": vars(args), "swaps": rows, "median": summary}


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: str) -> float:
    """Read a file through; returns the seconds it took."""
    started = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    return time.monotonic() - started


def last_load_ms(log: Path, model: str) -> float:
    loads = re.findall(rf"-> {re.escape(model)}: \w+ [\d.]+ s, \w+ ([\d.]+) s", log.read_text())
    return float(loads[-1]) * 1e3


def chat_body(model: str, tokens: int) -> bytes:
    messages = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
    return json.dumps({"model": model, "max_tokens": tokens, "messages": messages}).encode()


def page_cache(args: argparse.Namespace) -> dict[str, Any]:
    """One model busy answering; a request for another arrives: its load with its weights
    evicted, read ahead meanwhile, or cached."""
    from llmswap.config.defaults import llama_assets

    binary, gguf = llama_assets()
    # Beside the cached GGUF (a real disk, where eviction means something), one copy per case.
    work = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=Path(gguf).parent))
    copies = {"plain": str(work / "plain.gguf"), "prefetched": str(work / "prefetched.gguf")}
    for copy in copies.values():
        shutil.copyfile(gguf, copy)
    size = os.path.getsize(gguf)
    evict(copies["plain"])
    speed = size / read_all(copies["plain"])

    def model(path: str, prefetch: bool) -> dict[str, Any]:
        port = free_port()
        return {"cmd": [binary, "-m", path, "--host", "127.0.0.1", "--port", str(port),
                        "-c", "2048"],
                "backend_url": f"http://127.0.0.1:{port}/v1", "startup_timeout": 120,
                "prefetch": prefetch}  # fmt: skip

    models = {"busy": model(gguf, False), "plain": model(copies["plain"], False),
              "prefetched": model(copies["prefetched"], True)}  # fmt: skip
    cases = {"evicted": "plain", "prefetched": "prefetched", "warm": "plain"}
    loads: dict[str, list[float]] = {case: [] for case in cases}
    busy: list[float] = []
    try:
        with llmswap(models, linger=0) as (proxy, proc):
            log = Path(proc.args[proc.args.index("--logfile") + 1])
            for _ in range(args.rounds):
                for case, target in cases.items():
                    post(proxy, "/v1/chat/completions", chat_body("busy", 1), timeout=300)
                    if case == "warm":
                        read_all(copies[target])
                    else:
                        evict(copies[target])
                    started = time.monotonic()
                    answer = threading.Thread(
                        target=post,
                        args=(
                            proxy,
                            "/v1/chat/completions",
                            chat_body("busy", args.busy_tokens),
                            300,
                        ),
                    )
                    answer.start()  # fmt: skip
                    time.sleep(0.1)
                    status, _ = post(proxy, "/v1/chat/completions", chat_body(target, 1), 300)
                    answer.join()
                    assert status == 200, status
                    busy.append(time.monotonic() - started)
                    loads[case].append(last_load_ms(log, target))
    finally:
        shutil.rmtree(work)
    median = {case: statistics.median(v) for case, v in loads.items()}
    removed = (median["evicted"] - median["prefetched"]) / max(
        1e-9, median["evicted"] - median["warm"]
    )
    big = 20e9 / 500e6
    print(
        f"\nPage cache: {args.rounds} rounds of each case, model file {size / 2**20:.0f} MiB, "
        f"disk read {speed / 1e6:.0f} MB/s, busy model answered in "
        f"{statistics.median(busy):.2f} s (median); load ms, medians:"
    )
    print("| weights | load ms | vs warm |")
    print("|---|---|---|")
    for case, ms in median.items():
        print(f"| {case} | {ms:.0f} | {ms / median['warm']:.2f}x |")
    print(f"prefetch removed {removed:.0%} of the eviction's cost; for a 20 GB model at 500 MB/s "
          f"the read is {big:.0f} s, saved whenever the busy model answers that long")  # fmt: skip
    return {"loads_ms": loads, "median_ms": median, "disk_mb_s": speed / 1e6, "file_bytes": size,
            "removed": removed}  # fmt: skip


def sleep_vs_stop(args: argparse.Namespace) -> dict[str, Any]:
    """Switches between two fake backends: woken from sleep vs started after a stop."""
    fake = str(ROOT / "tests" / "fakebackend.py")

    def model(name: str, sleep: bool) -> dict[str, Any]:
        port = free_port()
        cmd = [PYTHON, fake, "--port", str(port), "--name", name, "--max-peers", "99"]
        entry: dict[str, Any] = {"cmd": cmd, "backend_url": f"http://127.0.0.1:{port}/v1"}
        if sleep:
            cmd += ["--sleep-mode", "--sleep-delay", "0", "--wake-delay", "0"]
            entry["sleep"] = {"kind": "vllm"}
        return entry

    pairs = {"sleep/wake": ("s1", "s2"), "stop/start": ("p1", "p2")}
    models = {n: model(n, case == "sleep/wake") for case, ns in pairs.items() for n in ns}
    results: dict[str, Any] = {}
    with llmswap(models, linger=0) as (proxy, proc):
        log = Path(proc.args[proc.args.index("--logfile") + 1])
        for case, names in pairs.items():
            switch_ms, load_ms = [], []
            for i in range(args.switches + 1):
                target = names[i % 2]
                started = time.monotonic()
                status, _ = post(proxy, "/v1/chat/completions", chat_body(target, 1))
                assert status == 200, status
                if i >= 2:  # both have started once: from here every switch wakes or starts
                    switch_ms.append((time.monotonic() - started) * 1e3)
                    load_ms.append(last_load_ms(log, target))
            results[case] = {"p50_switch_ms": statistics.median(switch_ms),
                             "p50_load_ms": statistics.median(load_ms)}  # fmt: skip
    print(
        f"\nSleep vs stop: {args.switches - 1} switches each between two fake backends "
        "(no load time of their own), medians:"
    )
    print("| unload/load | request with its switch ms | load or wake ms |")
    print("|---|---|---|")
    for case, r in results.items():
        print(f"| {case} | {r['p50_switch_ms']:.1f} | {r['p50_load_ms']:.1f} |")
    return results


if __name__ == "__main__":
    main()
