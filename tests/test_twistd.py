"""llmswap as users launch it: `twistd llmswap` in a real subprocess, signals, packaging."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from llmswap.backends import session
from tests.fakebackend import live_peers
from tests.support import fake_model, free_port, wait_answering

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def until(condition: Callable[[], object], seconds: float, why: str) -> None:
    """Wait for ``condition``; fail saying ``why`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def wait_listening(url: str, proc: subprocess.Popen[bytes]) -> None:
    wait_answering(url + "/health", proc)


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    ledger = str(tmp_path / "ledger")
    config = {
        "log_dir": str(tmp_path / "logs"),
        "models": {"alpha": fake_model("alpha", ledger), "beta": fake_model("beta", ledger)},
    }
    cfg = tmp_path / "llmswap.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "llmswap",
            "--config",
            str(cfg),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_listening(url, proc)
        yield proc, url, ledger, cfg
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_twistd_serves_swaps_survives_sighup_and_stops_cleanly_on_sigterm(daemon: Any) -> None:
    proc, url, ledger, cfg = daemon
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    first = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}]
    )
    assert first.choices[0].message.content == "Hello from alpha"
    # systemd's ExecReload: SIGHUP re-reads the file; a model added there becomes usable.
    config = yaml.safe_load(cfg.read_text())
    config["models"]["gamma"] = fake_model("gamma", ledger)
    cfg.write_text(yaml.safe_dump(config))
    proc.send_signal(signal.SIGHUP)
    until(lambda: "gamma" in [m.id for m in client.models.list().data], 20,
          "SIGHUP did not reload the configuration")  # fmt: skip
    second = client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "hi"}]
    )
    assert second.choices[0].message.content == "Hello from beta"
    assert get_json(url + "/health")["current_model"] == "beta"
    assert len(live_peers(ledger)) == 1

    proc.send_signal(signal.SIGTERM)
    # twistd re-raises the signal after a clean shutdown, so the exit status says "SIGTERM".
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "Server Shut Down." in output
    assert live_peers(ledger) == []
    assert "swap alpha -> beta: stop" in output
    assert (
        "[llmswap.access#info] POST /v1/chat/completions model=beta key=- stream=False "
        "status=200 queue_wait="
    ) in output
    assert "SIGHUP: reopening backend log files and reloading the configuration" in output
    assert "added gamma, removed none, changed none" in output
    assert "Traceback" not in output


def test_a_backend_leads_its_own_session_and_dies_with_a_killed_daemon(daemon: Any) -> None:
    proc, url, ledger, _ = daemon
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}])
    (backend,) = live_peers(ledger)
    assert os.getsid(backend) == backend  # a stop signals its whole group
    proc.kill()  # no clean-up: the kernel's PR_SET_PDEATHSIG must end it
    proc.wait()
    until(lambda: not live_peers(ledger), 20, "the backend outlived its daemon")


@pytest.mark.parametrize("tools", ["util-linux", "python shim"])
def test_a_server_whose_daemon_died_as_it_launched_is_never_run(
    tools: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Died before PR_SET_PDEATHSIG was set: the launcher finds its parent is not the daemon.
    if tools == "python shim":
        monkeypatch.setattr(session, "util_linux", lambda: None)
    else:
        assert session.util_linux() is not None, "util-linux's setsid and setpriv are missing"
    ran = tmp_path / "ran"
    launched = subprocess.run([*session.launcher(1), "touch", str(ran)], timeout=30)
    assert launched.returncode == 1 and not ran.exists()
    subprocess.run([*session.launcher(os.getpid()), "touch", str(ran)], timeout=30, check=True)
    assert ran.exists()


def test_a_forking_twistd_starts_backends_and_stops_them(tmp_path: Path) -> None:
    # Plain `twistd llmswap` makes the service, then forks: a backend must name the daemon it
    # runs under, not the process that made it, or its launcher refuses to run it.
    ledger = str(tmp_path / "ledger")
    cfg = tmp_path / "llmswap.yaml"
    cfg.write_text(yaml.safe_dump({"models": {"alpha": fake_model("alpha", ledger)}}))
    port, pidfile = free_port(), tmp_path / "twistd.pid"
    subprocess.run(
        [TWISTD, f"--pidfile={pidfile}", f"--logfile={tmp_path / 'twistd.log'}", "llmswap",
         "--config", str(cfg), "--listen", f"tcp:{port}:interface=127.0.0.1"],
        cwd=tmp_path, check=True, timeout=60,
    )  # fmt: skip
    until(pidfile.exists, 30, "the daemon never wrote its pid")
    pid = int(pidfile.read_text())
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=3, timeout=30)  # fmt: skip
        answer = client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "Hello from alpha"
        (backend,) = live_peers(ledger)
        assert os.getsid(backend) == backend
    finally:
        os.kill(pid, signal.SIGTERM)
    until(lambda: not os.path.exists(f"/proc/{pid}") and not live_peers(ledger), 60,
          "the daemon or its backend outlived SIGTERM")  # fmt: skip
    assert "Traceback" not in (tmp_path / "twistd.log").read_text()


def test_twistd_refuses_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("models:\n  m: {cmd: x, backend_url: 'http://x/v1', startup_timeot: 3}\n")
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "llmswap", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "unknown key 'models.m.startup_timeot' (did you mean 'startup_timeout'?)" in (
        result.stdout + result.stderr
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_plugin_is_found_after_a_plain_pip_install(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        timeout=600,
    )
    assert (target / "twisted" / "plugins" / "llmswap_plugin.py").exists()
    # -S: no .pth processing, so the repository's editable install is invisible; llmswap and
    # its plugin can only come from the pip-installed copy.
    env = {**os.environ, "PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}"}
    result = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "llmswap",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert "--config" in result.stdout, result.stderr
    where = subprocess.run(
        [sys.executable, "-S", "-c", "import llmswap; print(llmswap.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    assert where.stdout.startswith(str(target))


def test_systemd_unit_verifies_and_its_commands_run(tmp_path: Path) -> None:
    """deploy/llmswap.service: systemd accepts it, and the daemon it describes starts, reloads on
    its ExecReload signal and stops on its KillSignal (systemd itself does not run here)."""
    unit = (ROOT / "deploy" / "llmswap.service").read_text()
    fields = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert fields["Type"] == "simple"
    assert fields["Restart"] == "on-failure"
    assert fields["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert fields["KillSignal"] == "SIGTERM"
    argv = fields["ExecStart"].split()
    assert argv[1:5] == ["-n", "--pidfile=", "llmswap", "--config"]
    if shutil.which("systemd-analyze"):
        local = tmp_path / "llmswap.service"
        local.write_text(unit.replace(argv[0], TWISTD))
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
        )
        assert verify.returncode == 0, verify.stderr

    config = tmp_path / "llmswap.yaml"
    port = free_port()
    models = {"alpha": fake_model("alpha", str(tmp_path / "ledger"))}
    config.write_text(yaml.safe_dump({"listen": f"tcp:{port}:interface=127.0.0.1",
                                      "log_dir": str(tmp_path), "models": models}))  # fmt: skip
    out = tmp_path / "out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [TWISTD, *argv[1:5], str(config)], stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    try:
        wait_listening(f"http://127.0.0.1:{port}", proc)
        proc.send_signal(signal.SIGHUP)
        # The reload's own summary line, then the daemon still alive: ExecReload did not kill it.
        deadline = time.monotonic() + 30
        while "configuration reloaded from" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = out.read_text()
    assert "reloading the configuration" in output
    assert "added none, removed none, changed none" in output
    assert "Server Shut Down." in output


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_100_mb_upload_is_relayed_from_disk_not_memory(daemon: Any, tmp_path: Path) -> None:
    """A multipart body is kept by Twisted in a temporary file and relayed from it: llmswap's
    peak memory grows by a fraction of the body, not by the body (once, or per chunk)."""
    proc, url, _, _ = daemon
    get_json(url + "/health")
    post = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps({"model": "alpha"}).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    urllib.request.urlopen(post, timeout=30).read()  # alpha loaded, the daemon warmed up
    before = peak_rss(proc.pid)
    size = 100 * 2**20
    head = (b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nalpha\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n")  # fmt: skip
    tail = b"\r\n--b--\r\n"
    body = tmp_path / "upload"
    with open(body, "wb") as f:
        f.write(head)
        f.seek(len(head) + size - 1)
        f.write(b"\0" + tail)
    with open(body, "rb") as f:
        upload = urllib.request.Request(
            url + "/v1/audio/transcriptions", f,
            {"Content-Type": "multipart/form-data; boundary=b",
             "Content-Length": str(os.path.getsize(body))},
        )  # fmt: skip
        echo = json.load(urllib.request.urlopen(upload, timeout=120))
    assert echo["files"]["file"]["bytes"] == size
    assert echo["fields"] == {"model": "alpha"}
    grown = peak_rss(proc.pid) - before
    assert grown < size // 4, f"peak RSS grew {grown / 2**20:.0f} MiB for a 100 MiB upload"
