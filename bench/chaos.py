"""Chaos: llmswap under mixed faults for a while, judged by an outside witness.

    python -m bench.chaos [--seconds 3600] [--seed 1] [--clients 16] [--json out.json]

llmswap (``twistd llmswap``) runs fake backends (``tests/fakebackend.py``, real processes): two
process models (one ignores SIGTERM), one with vLLM's sleep mode, two Docker containers on the
local engine and, when ``tests/tools/docker-second-up.sh`` started it, one on a second engine
(another host, its own budget).  Clients (``bench/outcomes.py``) use OpenAI's, Ollama's and
Anthropic's routes.  After a quiet tenth, faults drawn from the seed come every 1-3 s: SIGKILL
of a backend (loading, serving or asleep), a crash, a freeze (SIGSTOP: it stops answering, health
too), a closed port, a reload that adds, changes or removes a model, admin and Ollama unloads,
the second engine restarted, the history database's disk full (a 1 MiB tmpfs, filled).

The witness (``bench/witness.py``) reads ``/proc``; the fakes' own ledger is a second witness.
The run passes when nothing was ever over budget, no request was lost, cut or answered out of
its API's shape, resources were flat after the warm-up, and nothing was left running after
llmswap stopped.  The same seed draws the same faults (their timing against llmswap's own is
the machine's).  The exit status is 0 when it passes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from bench.harness import PYTHON, ROOT, free_port, get, llmswap, percentile, post, save
from bench.outcomes import VIOLATIONS, Client
from bench.witness import Resources, Witness

FAKE = str(ROOT / "tests" / "fakebackend.py")
IMAGE = "llmswap-test-rootfs:latest"
SECOND = ("--host", "tcp://127.0.0.1:23761", "--tlsverify",
          "--tlscacert", "/tmp/llmswap-docker2/certs/ca.pem",
          "--tlscert", "/tmp/llmswap-docker2/certs/cert.pem",
          "--tlskey", "/tmp/llmswap-docker2/certs/key.pem")  # fmt: skip
TOOLS = ROOT / "tests" / "tools"


class Run:
    """One chaos run's backends, configuration and faults."""

    def __init__(self, seed: int, workdir: Path) -> None:
        self.random = random.Random(seed)
        self.dir = workdir
        self.ledger = str(workdir / "ledger")
        self.gpu = workdir / "gpu"
        self.gpu.mkdir()
        self.prefix = f"llmswap-chaos-{seed}-{os.getpid()}"
        self.docker = _docker_ok(())
        self.second = self.docker and _docker_ok(SECOND)
        self.history = workdir / "history"
        self.disk = _tmpfs(self.history)
        self.faults: Counter[str] = Counter()
        self.frozen: set[int] = set()
        self.variant = 0
        self.models = self._models()

    # -- the backends ---------------------------------------------------------------------

    def _fake(self, name: str, *flags: str) -> list[str]:
        holding = self.gpu / (name.partition("@")[2] or "local")  # each host's own device
        holding.mkdir(exist_ok=True)
        return [PYTHON, FAKE, "--port", str(free_port()), "--name", name, "--ledger",
                self.ledger, "--gpu-dir", str(holding), "--tokens", "8",
                "--token-delay", "0.02", *flags]  # fmt: skip

    def _process(self, name: str, *flags: str, **settings: Any) -> dict[str, Any]:
        cmd = self._fake(name, *flags)
        port = cmd[cmd.index("--port") + 1]
        return {"cmd": cmd, "backend_url": f"http://127.0.0.1:{port}/v1", "startup_timeout": 20,
                "stop_timeout": 2, **settings}  # fmt: skip

    def _container(self, name: str, box: str | None) -> dict[str, Any]:
        cmd = self._fake(f"{name}@{box}" if box else name)
        port = cmd[cmd.index("--port") + 1]
        container = f"{self.prefix}-{name}"
        read_only = {"/usr", "/lib", "/lib64", "/bin", sys.base_prefix, sys.prefix, str(ROOT)}
        mounts = [a for d in sorted(read_only) if os.path.exists(d) for a in ("-v", f"{d}:{d}:ro")]
        mounts += ["-v", f"{self.dir}:{self.dir}"]
        engine = SECOND if box else ()
        _run(["docker", *engine, "create", "--name", container, "--network", "host",
              "--pid", "host", *mounts, IMAGE, *cmd])  # fmt: skip
        entry = {"container_name": container, "backend_url": f"http://127.0.0.1:{port}/v1",
                 "startup_timeout": 30, "stop_timeout": 3}  # fmt: skip
        return {**entry, "host": box} if box else entry

    def _models(self) -> dict[str, Any]:
        models = {
            "p0": self._process("p0"),
            "p1": self._process("p1", "--ignore-sigterm"),
            "s2": self._process("s2", "--sleep-mode", sleep={"kind": "vllm", "level": 1}),
        }
        if self.docker:
            for name in ("d3", "d4"):
                _ensure_image(())
                models[name] = self._container(name, None)
        if self.second:
            _ensure_image(SECOND)
            models["b5"] = self._container("b5", "box2")
        return models

    def settings(self) -> dict[str, Any]:
        history = str(self.history / "activity.db")
        out: dict[str, Any] = {
            "request_timeout": 10,
            "queue_size": 500,
            "docker": {"stop_on_exit": True},
            "console": {"history": history},
        }
        if self.second:
            certs = "/tmp/llmswap-docker2/certs"
            tls = {"ca": f"{certs}/ca.pem", "cert": f"{certs}/cert.pem", "key": f"{certs}/key.pem"}
            docker = {"base_url": SECOND[1], "tls": tls, "timeout": 5, "stop_on_exit": True}
            out["hosts"] = {"box2": {"docker": docker, "address": "127.0.0.1"}}
        return out

    def budget(self) -> dict[str, int]:
        return {"local": 1, "box2": 1}

    # -- the faults -----------------------------------------------------------------------

    def kinds(self) -> list[tuple[str, float]]:
        kinds: list[tuple[str, float]] = [("kill", 3), ("crash", 2), ("freeze", 2),
                 ("close_port", 1), ("reload", 1), ("unload", 1), ("ollama_unload", 1)]  # fmt: skip
        if self.second:
            kinds.append(("engine_restart", 0.3))
        if self.disk:
            kinds.append(("disk_full", 0.5))
        return kinds

    def inject(self, kind: str, port: int, config: Path, witness: Witness) -> None:
        r = self.random
        alive = sorted(witness.alive())
        pick = r.random()  # drawn whatever is alive, so the schedule stays the seed's
        target = alive[int(pick * len(alive))] if alive else None
        if kind in ("kill", "crash", "freeze", "close_port"):
            if target is None:
                return
            sig = {"kill": signal.SIGKILL, "crash": signal.SIGUSR1, "freeze": signal.SIGSTOP,
                   "close_port": signal.SIGUSR2}[kind]  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, sig)
            if kind == "freeze":
                self.frozen.add(target)
                threading.Timer(r.uniform(2, 12), self._thaw, (target,)).start()
        elif kind == "reload":
            self.variant = r.randrange(3)
            config.write_text(yaml.safe_dump(self._variant(yaml.safe_load(config.read_text()))))
            post(port, "/admin/reload", b"", timeout=60)
        elif kind == "unload":
            post(port, f"/admin/models/{r.choice(list(self.models))}/unload", b"", timeout=60)
        elif kind == "ollama_unload":
            body = {"model": r.choice(list(self.models)), "keep_alive": 0}
            post(port, "/api/generate", json.dumps(body).encode(), timeout=60)
        elif kind == "engine_restart":
            _run([str(TOOLS / "docker-second-down.sh")])
            _run([str(TOOLS / "docker-second-up.sh")])
        elif kind == "disk_full":
            filler = self.history / "filler"
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
            threading.Timer(r.uniform(5, 15), lambda: filler.unlink(missing_ok=True)).start()
        self.faults[kind] += 1

    def _variant(self, config: dict[str, Any]) -> dict[str, Any]:
        """A reload's change: add a model, remove it, or change one."""
        models = config["models"]
        if self.variant == 0:
            models["x6"] = models.get("x6") or self._process("x6")
        elif self.variant == 1:
            models.pop("x6", None)
        else:
            cmd = models["p0"]["cmd"]
            cmd[cmd.index("--tokens") + 1] = "12" if cmd[cmd.index("--tokens") + 1] == "8" else "8"
        return config

    def _thaw(self, pid: int) -> None:
        self.frozen.discard(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def clean(self, witness: Witness) -> list[str]:
        """Name what is left of the run's backends, then remove it."""
        alive = witness.alive()
        left = [f"{witness.name(pid)} ({_state_name(pid)})" for pid in alive]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for engine in ((), SECOND) if self.docker else ():
            if engine and not self.second:
                continue
            names = _run(["docker", *engine, "ps", "-aq", "--filter", f"name={self.prefix}"],
                         check=False).split()  # fmt: skip
            if names:
                _run(["docker", *engine, "rm", "-f", *names], check=False)
        if self.disk:
            subprocess.run(["umount", str(self.history)], check=False, capture_output=True)
        return left


def _state_name(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].strip()
    return "gone"


def _run(args: list[str], check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=180, check=check)
    return done.stdout


def _docker_ok(engine: tuple[str, ...]) -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(["docker", *engine, "info"], capture_output=True, timeout=30)
    return done.returncode == 0


def _ensure_image(engine: tuple[str, ...]) -> None:
    if subprocess.run(["docker", *engine, "image", "inspect", IMAGE],
                      capture_output=True).returncode == 0:  # fmt: skip
        return
    empty = subprocess.run(["tar", "cf", "-", "-T", "/dev/null"], capture_output=True).stdout
    subprocess.run(["docker", *engine, "import", "-", IMAGE], input=empty, check=True,
                   capture_output=True)  # fmt: skip


def _tmpfs(directory: Path) -> bool:
    """A 1 MiB disk for the history database, to fill (root only)."""
    directory.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


def chaos(seconds: float, seed: int, clients: int, timeout: float) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="llmswap-chaos-"))
    run = Run(seed, workdir)
    witness = Witness(run.ledger, run.budget(), run.gpu)
    witness.start()
    stop = threading.Event()
    pool: list[Client] = []
    quiet = max(10.0, seconds / 10)
    resources = None
    started = chaos_end = time.monotonic()
    stuck, metrics, left = 0, b"", []
    try:
        with llmswap(run.models, **run.settings()) as (port, proc):
            config = Path(proc.args[proc.args.index("--config") + 1])
            resources = Resources(proc.pid)
            resources.start()
            names = list(run.models)
            pool = [Client(port, names, seed * 1000 + i, stop, timeout) for i in range(clients)]
            for c in pool:
                c.start()
            started = time.monotonic()
            time.sleep(quiet)
            kinds, weights = zip(*run.kinds(), strict=True)
            while time.monotonic() - started < seconds:
                kind = run.random.choices(kinds, weights)[0]
                with contextlib.suppress(OSError):
                    run.inject(kind, port, config, witness)
                time.sleep(run.random.uniform(1, 3))
            chaos_end = time.monotonic()
            for pid in list(run.frozen):
                run._thaw(pid)
            stop.set()
            for c in pool:
                c.join(timeout + 10)
            stuck = sum(c.is_alive() for c in pool)
            _, metrics = get(port, "/metrics")
            resources.stop()
        time.sleep(0.5)  # the witness's last look, after llmswap's stop
        left = run.clean(witness)
    finally:
        stop.set()
        witness.stop()
        if resources is not None:
            resources.stop()
        run.clean(witness)
    ends: Counter[tuple[str, str]] = sum((c.ends for c in pool), Counter())
    statuses: Counter[tuple[str, int]] = sum((c.statuses for c in pool), Counter())
    quiet_d = [d for c in pool for t, d in c.durations if t - started < quiet]
    chaos_d = [
        d for c in pool for t, d in c.durations if quiet <= t - started < chaos_end - started
    ]
    # The fakes' own check as they take the device (their watcher's "peers" count sleepers).
    overlaps = [e for e in _ledger(run.ledger) if e.get("event") == "overlap" and "holders" in e]
    lost = sum(n for (_, o), n in ends.items() if o == "lost") + stuck
    flat = resources.flat(0.2) if resources is not None else {}
    out = {
        "seconds": seconds,
        "seed": seed,
        "clients": clients,
        "command": f"python -m bench.chaos --seconds {seconds:g} --seed {seed} --clients {clients}",
        "requests": {f"{route} {o}": n for (route, o), n in sorted(ends.items())},
        "statuses": {f"{route} {s}": n for (route, s), n in sorted(statuses.items())},
        "faults": dict(sorted(run.faults.items())),
        "backend_starts": dict(witness.starts),
        "witness_samples": witness.samples,
        "witness_errors": witness.errors[:5],
        "violations": {
            "over_budget": witness.violations[:10],
            "over_budget_count": len(witness.violations),
            "fake_ledger_overlaps": len(overlaps),
            **{o: sum(n for (_, k), n in ends.items() if k == o) for o in VIOLATIONS},
        },
        "examples": [e for c in pool for e in c.examples][:10],
        "lost": lost,
        "left_after_stop": left,
        "resources": flat,
        "resources_samples": resources.samples if resources is not None else [],
        "latency_s": {
            "quiet": _spread(quiet_d),
            "chaos": _spread(chaos_d),
        },
        "metrics_restarts": sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.decode().splitlines()
            if line.startswith("llmswap_model_restarts_total{")
        ),
    }
    out["passed"] = passed(out)
    return out


def _spread(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": round(percentile(values, 0.5), 3),
            "p99": round(percentile(values, 0.99), 3)}  # fmt: skip


def _ledger(path: str) -> list[dict[str, Any]]:
    with contextlib.suppress(OSError), open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
    return []


def passed(out: dict[str, Any]) -> bool:
    v = out["violations"]
    clean = not (v["over_budget_count"] or v["fake_ledger_overlaps"] or out["lost"]
                 or out["left_after_stop"] or any(v[o] for o in VIOLATIONS)
                 or out["witness_errors"])  # fmt: skip
    # A witness that stopped looking sees nothing: it must have looked all along (at least
    # ten times a second, on a busy machine).
    clean = clean and out["witness_samples"] >= 10 * out["seconds"]
    if out["seconds"] >= 600 and out["resources"]:  # flat: judged on long runs only
        grew = out["resources"]
        clean = clean and grew["fds"]["grew"] <= 10 and grew["threads"]["grew"] <= 4
        clean = clean and grew["rss_mib"]["grew"] <= 0.2 * grew["rss_mib"]["first"]
    return clean


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--timeout", type=float, default=180, help="a client's wait for any byte")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out = save(chaos(args.seconds, args.seed, args.clients, args.timeout), args.json)
    shown = {k: v for k, v in out.items() if k != "resources_samples"}
    print(json.dumps(shown, indent=2))
    sys.exit(0 if out["passed"] else 1)


if __name__ == "__main__":
    main()
