"""Benchmark: llmswap against llama.cpp's own router, side by side on the same binary.

llama-server in router mode (``--models-dir`` with ``--models-max 1``: one process per model,
loaded on request, the least recently used evicted) is what many users compare llmswap with
first.  Both serve the bundled Gemma 3 270M GGUF as two models, ``a`` and ``b`` (``-c 2048
-n 64``, 16-token answers; llmswap's models with ``concurrency: 4``, as llama-server's four
slots), through three workloads:

- ``lone``: one user alternating a, b (8 requests, one after another);
- ``two``: two users at once, one on a (4 requests), one on b (4);
- ``four``: four users at once, on a, a, b, b (3 requests each).

Each row: requests answered and failed, the wall time, the loads and the most model processes
alive at once (both from the process table, sampled every 10 ms), the latency's p50 and p95, and
the CPU seconds the proxy itself used (the router's process or llmswap's, not their models':
on a box whose cores the model fills, what the proxy spends it takes from the model).  Rounds
alternate the systems; llmswap runs on its OpenAI route (anonymous clients, as the ``openai``
SDK's, and clients that name their user, as Open WebUI's forwarded user header does) and on its
Ollama route.

    python -m bench.router [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import free_port, get, llmswap, percentile, process, save
from llmswap.config.defaults import llama_assets

FLAGS = ["-c", "2048", "-n", "64", "--no-jinja", "--chat-template", "gemma"]
WORKLOADS = {"lone": [["a", "b"] * 4], "two": [["a"] * 4, ["b"] * 4],
             "four": [["a"] * 3, ["a"] * 3, ["b"] * 3, ["b"] * 3]}  # fmt: skip


class Processes(threading.Thread):
    """Model processes (llama-server with ``-m``, or ``--model`` as the router starts them) from
    the process table: how many started and the most alive at once."""

    def __init__(self, mark: str) -> None:
        super().__init__(daemon=True)
        self._mark = mark
        self.seen: set[int] = set()
        self.most = 0
        # A model process of the run before may still be exiting: not this run's.
        self._before = {int(e.name) for e in os.scandir("/proc") if e.name.isdigit()}
        self._quit = threading.Event()

    def run(self) -> None:
        # Only processes new since the run began are read, and a model's command line once:
        # reading every process's, every 10 ms, held the clients' GIL long enough to delay the
        # requests it is there to witness.  (Not a model yet may be one forked, not yet exec'd.)
        models: set[int] = set()
        while not self._quit.is_set():
            alive = 0
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit() or int(entry.name) in self._before:
                    continue
                pid = int(entry.name)
                try:
                    if pid not in models and self._is_model(
                        Path(f"/proc/{pid}/cmdline").read_bytes()
                    ):
                        models.add(pid)
                    if pid in models:
                        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
                        if state.split()[0] not in ("Z", "X"):
                            alive += 1
                            self.seen.add(pid)
                except OSError:  # gone: its pid may come back as another process
                    models.discard(pid)
            self.most = max(self.most, alive)
            time.sleep(0.01)

    def _is_model(self, cmdline: bytes) -> bool:
        """A model's process (llmswap's exec shim, whose arguments are the server's, counts as
        the server it becomes)."""
        argv = cmdline.split(b"\0")
        has_model = b"-m" in argv or b"--model" in argv  # the router's own has neither
        return has_model and any(self._mark.encode() in a for a in argv)

    def stop(self) -> None:
        self._quit.set()
        self.join(5)


def _ask(port: int, route: str, model: str, user: str | None) -> tuple[bool, float]:
    messages = [{"role": "user", "content": "hi"}]
    body: dict[str, Any] = {"model": model, "messages": messages}
    if user is not None:  # OpenAI's field: who asks
        body["user"] = user
    if route == "ollama":
        path = "/api/chat"
        body.update(stream=False, options={"num_predict": 16})
    else:
        path = "/v1/chat/completions"
        body["max_tokens"] = 16
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        ok = response.status == 200
    except (OSError, http.client.HTTPException):
        ok = False
    finally:
        conn.close()
    return ok, time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    """The CPU time process ``pid`` has used (its own threads, not its children's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    port: int, route: str, workload: str, names: dict[str, str], mark: str, named: bool, pid: int
) -> dict[str, Any]:
    watch = Processes(mark)
    watch.start()
    cpu = cpu_seconds(pid)
    results: list[tuple[bool, float]] = []
    lock = threading.Lock()

    def user(models: list[str], who: str | None) -> None:
        for m in models:
            outcome = _ask(port, route, names[m], who)
            with lock:
                results.append(outcome)

    started = time.monotonic()
    users = [
        threading.Thread(target=user, args=(ms, f"user{i}" if named else None))
        for i, ms in enumerate(WORKLOADS[workload])
    ]
    for u in users:
        u.start()
    for u in users:
        u.join()
    wall = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu
    watch.stop()
    times = [t for ok, t in results if ok]
    return {
        "answered": len(times),
        "failed": len(results) - len(times),
        "wall": round(wall, 2),
        "loads": len(watch.seen),
        "most_alive": watch.most,
        "p50": round(percentile(times, 0.5), 2),
        "p95": round(percentile(times, 0.95), 2),
        "cpu": round(cpu, 2),
    }


@contextlib.contextmanager
def router(binary: str, models_dir: Path) -> Iterator[tuple[int, dict[str, str], int]]:
    port = free_port()
    args = [binary, "--models-dir", str(models_dir), "--models-max", "1", "--host", "127.0.0.1",
            "--port", str(port), *FLAGS]  # fmt: skip
    with process(args, port, path="/models") as proc:
        _, listed = get(port, "/models")
        ids = [m["id"] for m in json.loads(listed)["data"]]
        yield port, {n: n for n in ("a", "b") if n in ids}, proc.pid


@contextlib.contextmanager
def swapper(binary: str, models_dir: Path) -> Iterator[tuple[int, dict[str, str], int]]:
    models = {
        n: {"cmd": [binary, "-m", str(models_dir / f"{n}.gguf"), "--alias", n, "--host",
                    "127.0.0.1", "--port", "${PORT}", *FLAGS],
            "startup_timeout": 120, "concurrency": 4}
        for n in ("a", "b")
    }  # fmt: skip
    with llmswap(models) as (port, proc):
        yield port, {"a": "a", "b": "b"}, proc.pid


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workloads", default="lone,two,four")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    binary, gguf = llama_assets()
    models_dir = Path(tempfile.mkdtemp(prefix="llmswap-router-"))
    for n in ("a", "b"):  # two models, one file: the router lists a directory's files
        os.symlink(gguf, models_dir / f"{n}.gguf")
    systems = {"llama-server router": (router, "openai", False),
               "llmswap": (swapper, "openai", False),
               "llmswap, users named": (swapper, "openai", True),
               "llmswap, Ollama route": (swapper, "ollama", False)}  # fmt: skip
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for _ in range(args.rounds):
        for system, (start, route, named) in systems.items():
            for workload in args.workloads.split(","):
                with start(binary, models_dir) as (port, names, pid):
                    row = run(port, route, workload, names, str(models_dir), named, pid)
                rows.setdefault(workload, {}).setdefault(system, []).append(row)
                print(workload, system, row, flush=True)
    summary = {
        w: {s: {"wall_median": statistics.median(r["wall"] for r in runs),
                "wall": [r["wall"] for r in runs], "loads": [r["loads"] for r in runs],
                "failed": sum(r["failed"] for r in runs),
                "most_alive": max(r["most_alive"] for r in runs),
                "p50": [r["p50"] for r in runs], "p95": [r["p95"] for r in runs],
                "cpu": [r["cpu"] for r in runs]}
            for s, runs in by.items()}
        for w, by in rows.items()
    }  # fmt: skip
    for by in summary.values():
        ref = by["llama-server router"]["wall_median"]
        for s in by.values():
            s["wall_vs_router"] = round(s["wall_median"] / ref, 2) if ref else None
    out = save({"rounds": args.rounds, "summary": summary, "runs": rows}, args.json)
    print(json.dumps(summary, indent=1))
    return out


if __name__ == "__main__":
    main()
