"""Benchmark: what a proxy adds to a non-streaming request, side by side in one run.

One fast backend (bench/backend.py, answers at once) is reached directly, through llmswap (also
with ``access_log: false``, on an identical backend of its own; through its Ollama route,
``/api/chat``, translated to the backend's OpenAI API and back; and with five web consoles
following it live), through the two bare floors
(Klein + treq, aiohttp) and through LiteLLM's proxy when ``--litellm`` names its executable
(installed by ``make bench`` into its own venv).  ``wrk`` drives each at
concurrency 1 (latency) and 32 (throughput); added latency is each proxy's p50 minus the direct
p50, and the ratios are what to read.

    python -m bench.overhead [--seconds 5] [--litellm .bench/litellm/bin/litellm]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.harness import (
    FLOORS,
    fast_backend_model,
    floor,
    free_port,
    llmswap,
    post,
    process,
    save,
)

BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]})
OPENAI = ("/v1/chat/completions", BODY)
OLLAMA = ("/api/chat", json.dumps({**json.loads(BODY), "stream": False}))
OLLAMA_ROW = "llmswap, Ollama /api/chat"
CONSOLES = 5
CONSOLES_ROW = f"llmswap, {CONSOLES} consoles open"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(
    port: int, connections: int, seconds: float, route: tuple[str, str] = OPENAI
) -> dict[str, float]:
    path, body = route
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(
        f"wrk.method = 'POST'\nwrk.body = '{body}'\n"
        "wrk.headers['Content-Type'] = 'application/json'\n"
    )
    script.close()
    out = subprocess.run(
        ["wrk", "-t", "1" if connections == 1 else "2", "-c", str(connections),
         "-d", f"{max(1, round(seconds))}s", "--latency", "-s", script.name,
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        result[f"p{pct}_ms"] = float(value) * _UNITS[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


@contextlib.contextmanager
def consoles(port: int, count: int) -> Iterator[list[int]]:
    """``count`` browsers' live streams (``/admin/events``) read for as long as this lasts;
    yields each one's bytes received so far (one counter per stream)."""
    received = [0] * count
    stop = threading.Event()
    connections: list[http.client.HTTPConnection] = []

    def read(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connections.append(conn)
        conn.request("GET", "/admin/events")
        response = conn.getresponse()
        try:
            while not stop.is_set():
                chunk = response.read1(65536)
                if not chunk:
                    break
                received[i] += len(chunk)
        except (OSError, ValueError, http.client.HTTPException):
            if not stop.is_set():  # cut off by the shutdown below is how it ends
                raise

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield received
    finally:
        stop.set()
        for conn in connections:  # the readers see the end of their streams and return
            if conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(10)
        for conn in connections:
            conn.close()


@contextlib.contextmanager
def litellm(executable: str, backend: int) -> Iterator[int]:
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="llmswap-bench-litellm-")) / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": "bench",
                        "litellm_params": {
                            "model": "openai/bench",
                            "api_base": f"http://127.0.0.1:{backend}/v1",
                            "api_key": "unused",
                        },
                    }
                ],
                "litellm_settings": {"telemetry": False},
                # Like llmswap without an auth section: no key checks on either side.
                "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
            }
        )
    )
    args = [executable, "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    with process(args, port, path="/health/liveliness"):
        yield port


def litellm_version(executable: str) -> str:
    """The installed LiteLLM's version: ``make bench`` installs the newest, and its overhead
    moves between releases, so a result names the one it measured."""
    python = Path(executable).with_name("python")
    return subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--litellm", help="LiteLLM's `litellm` executable (skipped when absent)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    backend = free_port()
    results: dict[str, dict[str, dict[str, float]]] = {}
    model = fast_backend_model(backend, concurrency=64)
    with contextlib.ExitStack() as stack:
        proxy, _ = stack.enter_context(llmswap({"bench": model}, queue_size=1000))
        post(proxy, "/v1/chat/completions", BODY.encode())  # loads the backend
        # The same with its one optional per-request cost off (its own, identical backend).
        quiet_model = fast_backend_model(free_port(), concurrency=64)
        quiet, _ = stack.enter_context(
            llmswap({"bench": quiet_model}, queue_size=1000, access_log=False)
        )
        post(quiet, "/v1/chat/completions", BODY.encode())
        targets = {"direct": backend, "llmswap": proxy, "llmswap, access_log: false": quiet}
        targets[OLLAMA_ROW] = proxy
        targets[CONSOLES_ROW] = proxy
        for kind, name in FLOORS.items():
            targets[name], _ = stack.enter_context(floor(kind, backend))
        if args.litellm:
            name = f"LiteLLM proxy {litellm_version(args.litellm)}"
            targets[name] = stack.enter_context(litellm(args.litellm, backend))
        for name, port in targets.items():
            route = OLLAMA if name == OLLAMA_ROW else OPENAI
            status, _ = post(port, route[0], route[1].encode())  # warm connections
            if status != 200:  # an llmswap without that route (a run of an older version)
                print(f"({name}: {route[0]} answered {status}: not measured)")
                continue
            with contextlib.ExitStack() as watching:
                if name == CONSOLES_ROW:
                    streams = watching.enter_context(consoles(port, CONSOLES))
                results[name] = {
                    "c1": wrk(port, 1, args.seconds, route),
                    "c32": wrk(port, 32, args.seconds, route),
                }
                if name == CONSOLES_ROW:  # the consoles did follow the traffic
                    assert min(streams) > 1000, f"a console received only {min(streams)} bytes"
    direct = results["direct"]["c1"]["p50_ms"]
    ours = results["llmswap"]["c1"]["p50_ms"] - direct
    print(f"Non-streaming overhead, wrk {args.seconds:g} s per cell, fast backend")
    print(
        "| target | p50 c=1 ms | added p50 ms | p99 c=1 ms | p50 c=32 ms | p99 c=32 ms "
        "| req/s c=32 | added / llmswap's |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        added = r["c1"]["p50_ms"] - direct
        ratio = "" if name == "direct" else f"{added / ours:.1f}x" if ours > 0 else ""
        print(f"| {name} | {r['c1']['p50_ms']:.3f} | {added:.3f} | {r['c1']['p99_ms']:.3f} "
              f"| {r['c32']['p50_ms']:.3f} | {r['c32']['p99_ms']:.3f} | {r['c32']['rps']:.0f} "
              f"| {ratio} |")  # fmt: skip
        if r["c1"]["errors"] or r["c32"]["errors"]:
            print(f"  ({name}: {r['c1']['errors'] + r['c32']['errors']:.0f} non-2xx responses)")
    out = {"args": vars(args), "results": results}
    return save(out, args.json)


if __name__ == "__main__":
    main()
