"""Devices measured by their probes, end to end: `twistd llmswap` in a real process reads an
NVIDIA GPU through nvidia-ml-py (``probe: nvml:0``) or this machine's memory (``probe: ram``),
and fake backends and the test's own processes hold it.

Each GPU test runs twice.  ``fake``: NVML is tests/fakenvml.c, built here, whose device frees a dead
process's memory 1.5 s after it is gone, as CUDA does asynchronously; the backends "allocate" on
it.  ``real`` (marker ``gpu``; skipped without an NVIDIA driver): the system's NVML and GPU 0, on
which the same backends allocate real device memory through CUDA's driver API.  The witness of
"never two at once" is the device itself: a backend that finds too little free memory dies with
CUDA's out-of-memory words, which its ledger records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from llmswap.memory.ram import RamProbe
from tests.support import (
    FAKE,
    fake_model,
    fake_nvml,
    free_port,
    read_ledger,
    samples,
    wait_answering,
)

pytestmark = pytest.mark.slow

TWISTD = str(Path(sys.executable).with_name("twistd"))
LAG = 1.5  # seconds the fake device takes to free a dead process's memory
FAKE_TOTAL = 1000  # MiB
MiB = 2**20


@attrs.frozen
class Gpu:
    env: dict[str, str]
    total: int  # MiB on the device
    free: int  # MiB free when the test began
    fake: bool


def _real_gpu() -> Gpu:
    probe = (
        "import pynvml; pynvml.nvmlInit(); m = pynvml.nvmlDeviceGetMemoryInfo("
        "pynvml.nvmlDeviceGetHandleByIndex(0)); print(m.total >> 20, m.free >> 20)"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60)
    if found.returncode != 0:
        pytest.skip("no NVIDIA GPU here: NVML did not start")
    total, free = map(int, found.stdout.split())
    return Gpu(dict(os.environ), total, free, fake=False)


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.gpu)])
def gpu(request: pytest.FixtureRequest, tmp_path: Path) -> Gpu:
    if request.param == "real":
        return _real_gpu()
    library = fake_nvml(tmp_path)
    device = tmp_path / "device"
    device.mkdir()
    (device / "total").write_text(str(FAKE_TOTAL))
    (device / "lag").write_text(str(LAG))
    env = {**os.environ, "LD_LIBRARY_PATH": str(library.parent), "FAKE_NVML_DIR": str(device)}
    return Gpu(env, FAKE_TOTAL, FAKE_TOTAL, fake=True)


@attrs.define
class Running:
    url: str
    ledger: str
    log: Path

    def chat(self, model: str) -> tuple[int, Any]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(
            self.url + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            data: bytes = r.read()
            return data

    def told(self) -> list[tuple[str, str]]:
        kinds = ("start", "oom", "sigterm")
        return [(e["event"], e["name"]) for e in read_ledger(self.ledger) if e["event"] in kinds]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Any]:
    """``run(models, gpu)``: llmswap on GPU 0 of ``gpu`` as device gpu0, or on host memory
    (``ram``) without one; ``hold(command, env)``: a process of the test's own, ready once its
    port answers."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(models: dict[str, dict[str, Any]], gpu: Gpu | None) -> Running:
        ledger = str(tmp_path / "ledger")
        device = "gpu0" if gpu else "ram"
        entries = {n: fake_model(n, ledger, device=device, **m) for n, m in models.items()}
        total = gpu.total if gpu else RamProbe().reading().total // MiB
        probe = "nvml:0" if gpu else "ram"
        config = {
            "log_dir": str(tmp_path / "logs"),
            "state_dir": str(tmp_path / "state"),
            "devices": {device: {"memory": f"{total}MiB", "probe": probe}},
            "models": entries,
        }
        (tmp_path / "llmswap.yaml").write_text(yaml.safe_dump(config))
        port, log = free_port(), tmp_path / "llmswap.log"
        listen = f"tcp:{port}:interface=127.0.0.1"
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "llmswap", "--config", "llmswap.yaml", "--listen",
                 listen], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                env=gpu.env if gpu else None,
            ))  # fmt: skip
        running = Running(f"http://127.0.0.1:{port}", ledger, log)
        wait_answering(running.url + "/health", procs[-1], log=log)
        return running

    def hold(flags: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        port = free_port()
        command = [sys.executable, FAKE, "--port", str(port), "--name", "other", *flags]
        proc = subprocess.Popen(command, env=env)
        procs.append(proc)
        wait_answering(f"http://127.0.0.1:{port}/health", proc)  # it holds the memory by then
        return proc

    yield run, hold
    for proc in reversed(procs):
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_next_start_waits_until_the_stopped_models_memory_is_back(
    gpu: Gpu, daemon: Any
) -> None:
    run, _ = daemon
    each = gpu.free * 6 // 10  # two never fit at once
    llmswap = run({n: {"vram": each, "memory": f"{each}MiB"} for n in "ab"}, gpu)
    assert llmswap.chat("a")[0] == 200
    status, answer = llmswap.chat("b")
    assert (status, answer["choices"][0]["message"]["content"]) == (200, "Hello from b")
    # b started after a was gone and its memory was back: the device never ran out.
    assert llmswap.told() == [("start", "a"), ("sigterm", "a"), ("start", "b")]
    health = json.loads(llmswap.get("/health"))
    device = health["devices"]["gpu0"]
    assert device["total"] == gpu.total * 2**20
    assert health["models"]["b"]["memory"]["declared"] == each * 2**20
    scraped = samples(llmswap.get("/metrics").decode())
    assert scraped[("llmswap_device_memory_total_bytes", (("device", "gpu0"),))] == device["total"]
    if gpu.fake:  # the fake device's lag is known: the start waited for it, and said so
        assert "MiB free for b after" in llmswap.log.read_text()
        assert scraped[("llmswap_device_free_wait_seconds_count", (("device", "gpu0"),))] == 1
        assert {k: device[k] for k in ("utilization", "temperature", "power")} == {
            "utilization": 0.37, "temperature": 41.0, "power": 75.0,
        }  # fmt: skip
        assert scraped[("llmswap_device_power_watts", (("device", "gpu0"),))] == 75.0


def test_a_device_another_process_holds_fails_the_load_at_once_naming_it(
    gpu: Gpu, daemon: Any
) -> None:
    run, hold = daemon
    each = gpu.free * 6 // 10
    llmswap = run({"a": {"vram": each, "memory": f"{each}MiB"}}, gpu)
    other = hold(["--vram", str(each)], gpu.env)
    name = Path(f"/proc/{other.pid}/comm").read_text().strip()
    status, body = llmswap.chat("a")
    assert status == 503
    message = body["error"]["message"]
    assert message.startswith(f"Model 'a' needs {each} MiB on device 'gpu0', which has ")
    assert f"MiB free; not loaded. Held most by other processes: {name} (" in message
    assert llmswap.told() == []  # nothing was started to crash


def test_a_load_out_of_memory_beside_another_model_puts_it_away_and_loads_once_more(
    gpu: Gpu, daemon: Any
) -> None:
    run, _ = daemon
    tenth = gpu.free // 10
    llmswap = run({
        "a": {"vram": 4 * tenth, "memory": f"{4 * tenth}MiB"},
        # b declares less than it takes: the budget lets it load beside a, the device does not.
        "b": {"vram": 7 * tenth, "memory": f"{3 * tenth}MiB"},
    }, gpu)  # fmt: skip
    assert llmswap.chat("a")[0] == 200
    status, answer = llmswap.chat("b")
    assert (status, answer["choices"][0]["message"]["content"]) == (200, "Hello from b")
    assert llmswap.told() == [
        ("start", "a"), ("start", "b"), ("oom", "b"), ("sigterm", "a"), ("start", "b"),
    ]  # fmt: skip
    health = json.loads(llmswap.get("/health"))
    assert (health["models"]["a"]["state"], health["models"]["b"]["state"]) == ("stopped", "ready")


def test_host_memory_another_process_holds_fails_the_load_at_once_naming_it(daemon: Any) -> None:
    """The same on a ``ram`` device: the test's own process holds 2 GiB of this machine's memory,
    and a model that would fit without it is refused before it starts."""
    run, hold = daemon
    other = hold(["--hold-ram", "2048"])
    free = RamProbe().reading().free // MiB
    need = free + 1024  # fits once the holder is gone, not while it holds its 2 GiB
    llmswap = run({"a": {"memory": f"{need}MiB"}}, None)
    status, body = llmswap.chat("a")
    assert status == 503
    message = body["error"]["message"]
    assert message.startswith(f"Model 'a' needs {need} MiB on device 'ram', which has ")
    name = Path(f"/proc/{other.pid}/comm").read_text().strip()
    assert "MiB free; not loaded. Held most by other processes: " in message
    assert f"{name} (20" in message  # the holder and its 2 GiB, among the largest
    assert llmswap.told() == []
