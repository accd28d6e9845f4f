"""What every benchmark needs: ports, processes it starts and always stops, llmswap under twistd."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TWISTD = str(Path(sys.executable).with_name("twistd"))


# Ports handed out start here, below the kernel's ephemeral range (32768 by default).
_FIRST_PORT = 20000
_given: set[int] = set()


def free_port() -> int:
    """A port free now on 127.0.0.1, for a server about to bind it.  Picked below the
    ephemeral range: a port the kernel picks (bind to 0) is one any outgoing connection may take
    as its source before the server binds it ("Address already in use", seen in CI).  No port
    is handed out twice in one process."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    below = ephemeral - _FIRST_PORT >= 1000  # else an unusual range: the kernel's pick it is
    while True:
        port = random.randrange(_FIRST_PORT, ephemeral) if below else _kernels_pick()
        if port not in _given and _bindable(port):
            _given.add(port)
            return port


def free_ports(count: int) -> tuple[int, ...]:
    """``count`` distinct free ports."""
    return tuple(free_port() for _ in range(count))


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kernels_pick() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post(port: int, path: str, body: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_port(port: int, proc: subprocess.Popen[bytes], path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, _ = get(port, path, timeout=2)
            if status < 500:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"{proc.args!r} did not answer on port {port}")
        time.sleep(0.05)


def _unwind_on_sigterm() -> None:
    """Let SIGTERM (``timeout``, a CI cancel) unwind like an exception, so the ``finally`` below
    stops every server started: they run in sessions of their own and would outlive us."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


@contextlib.contextmanager
def process(args: list[str], port: int, path: str = "/health", **kw: Any) -> Iterator[Any]:
    """Start a server process, wait until ``path`` answers, stop it (and its group) after."""
    _unwind_on_sigterm()
    log = tempfile.NamedTemporaryFile(prefix="llmswap-bench-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw
    )
    try:
        wait_port(port, proc, path)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextlib.contextmanager
def llmswap(models: dict[str, Any], **settings: Any) -> Iterator[tuple[int, Any]]:
    """llmswap as users run it (``twistd -n llmswap --config``); yields (port, process)."""
    workdir = tempfile.mkdtemp(prefix="llmswap-bench-")
    port = free_port()
    config = {
        # A deep accept backlog: the scale benchmark opens thousands of connections at once.
        "listen": f"tcp:{port}:interface=127.0.0.1:backlog=4096",
        "log_dir": workdir,
        "models": models,
        **settings,
    }
    path = Path(workdir) / "llmswap.yaml"
    path.write_text(yaml.safe_dump(config))
    reactor = ["--reactor", os.environ["BENCH_REACTOR"]] if os.environ.get("BENCH_REACTOR") else []
    args = [TWISTD, "-n", "--pidfile=", "--logfile", f"{workdir}/llmswap.log", *reactor,
            "llmswap", "--config", str(path)]  # fmt: skip
    with process(args, port, cwd=workdir) as proc:
        yield port, proc


# The bare passthroughs of bench/floors.py, by kind, under the names the tables give them.
FLOORS = {"klein": "floor klein+treq", "aiohttp": "floor aiohttp+client"}


@contextlib.contextmanager
def floor(kind: str, backend: int) -> Iterator[tuple[int, Any]]:
    """One bare passthrough to the backend on ``backend``; yields (port, process)."""
    port = free_port()
    args = [PYTHON, "-m", "bench.floors", kind, "--port", str(port),
            "--backend", f"http://127.0.0.1:{backend}"]  # fmt: skip
    with process(args, port, path="/none", cwd=ROOT) as proc:
        yield port, proc


def fast_backend_model(port: int, **settings: Any) -> dict[str, Any]:
    return {
        "cmd": [PYTHON, "-m", "bench.backend", "--port", str(port)],
        "cwd": str(ROOT),
        "backend_url": f"http://127.0.0.1:{port}/v1",
        **settings,
    }


def rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(found.group(1)) * 1024 if found else 0


def save(out: dict[str, Any], path: str | None) -> dict[str, Any]:
    """Write a benchmark's results as JSON when asked (``--json``); return them."""
    if path:
        Path(path).write_text(json.dumps(out, indent=2))
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")
