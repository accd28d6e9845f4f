"""The chaos run's outside witness: what the operating system says, not llmswap's bookkeeping.

Every few milliseconds it reads ``/proc`` for the run's fake backends (process models, and
Docker containers started with ``--pid host``, whose servers are this machine's processes too)
and counts those alive and holding their device memory on each host (asleep ones do not):
more than the budget is a violation.  A process read alive
may die before the next one is read, so a sample that counts too many is read again: a backend
alive at the second reading that was alive at the first was alive throughout, so two alive then
really were alive together.  Each backend is counted from its start to its exit (``starts``).

It also samples the daemon's resources (RSS, open descriptors, threads) every few seconds.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any


def _state(pid: int) -> str | None:
    """A process's state letter (R, S, T ...), None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state = stat.rsplit(")", 1)[1].split()[0]
    return None if state in ("Z", "X") else state


def _age(pid: int) -> float:
    """Seconds since the process started (0 when it cannot be read)."""
    try:
        start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return uptime - start / os.sysconf("SC_CLK_TCK")


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


SETTLED = 5.0  # seconds after which a process's argv is its own


class Witness:
    """Watches the fake backends whose argv carries ``mark`` (the run's ledger path); each
    names its host as ``--name model@host``."""

    def __init__(
        self, mark: str, budget: dict[str, int], holding: Path, every: float = 0.005
    ) -> None:
        self._mark = mark
        self._holding = holding
        self._budget = budget
        self._every = every
        self._host: dict[int, str | None] = {}  # pid -> host of a backend, None: not one
        self.starts: dict[str, int] = defaultdict(int)
        self.violations: list[dict[str, Any]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="witness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def holds(self, pid: int, host: str) -> bool:
        """Alive and holding its device memory (the fakes keep a file in ``holding/<host>``
        from their start until they are asleep or gone; a frozen one still holds it)."""
        return _state(pid) is not None and (self._holding / host / str(pid)).exists()

    def alive(self) -> dict[int, str]:
        """The run's backends alive now (asleep too), by pid: their host."""
        found = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid not in self._host:
                host = self._host_of(_argv(pid))
                if host is not None:
                    self.starts[host] += 1
                # Until it has surely exec'd, a new process may still show its parent's argv
                # (a fork of llmswap, runc's init): not known yet.
                if host is not None or _age(pid) > SETTLED:
                    self._host[pid] = host
            host = self._host.get(pid)
            if host is not None and _state(pid) is not None:
                found[pid] = host
        return found

    def name(self, pid: int) -> str:
        argv = _argv(pid)
        return argv[argv.index("--name") + 1] if "--name" in argv else str(pid)

    def _host_of(self, argv: list[str]) -> str | None:
        if self._mark not in argv or "--name" not in argv:
            return None
        name = argv[argv.index("--name") + 1]
        return name.partition("@")[2] or "local"

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples += 1
            by_host: dict[str, list[int]] = defaultdict(list)
            for pid, host in self.alive().items():
                if (self._holding / host / str(pid)).exists():
                    by_host[host].append(pid)
            for host, pids in by_host.items():
                if len(pids) > self._budget.get(host, 1):
                    again = [p for p in pids if self.holds(p, host)]
                    if len(again) > self._budget.get(host, 1):
                        names = [_argv(p)[_argv(p).index("--name") + 1] for p in again]
                        self.violations.append({"at": time.time(), "host": host, "alive": names})
            time.sleep(self._every)


class Resources:
    """The daemon's RSS, descriptors and threads, every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 2.0) -> None:
        self._pid = pid
        self._every = every
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resources", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            try:
                status = Path(f"/proc/{self._pid}/status").read_text()
                fds = len(os.listdir(f"/proc/{self._pid}/fd"))
            except OSError:
                return
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            self.samples.append({
                "t": round(time.monotonic() - started, 1),
                "rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
                "fds": fds,
                "threads": int(fields["Threads"]),
            })  # fmt: skip
            self._stop.wait(self._every)

    def flat(self, warm_up: float) -> dict[str, Any]:
        """Each figure after ``warm_up`` (a share of the run): its first and last quarters'
        medians, and their difference (what grew)."""
        after = self.samples[int(len(self.samples) * warm_up) :]
        if len(after) < 4:
            return {}
        quarter = max(1, len(after) // 4)
        out = {}
        for key in ("rss_mib", "fds", "threads"):
            first = sorted(s[key] for s in after[:quarter])[quarter // 2]
            last = sorted(s[key] for s in after[-quarter:])[quarter // 2]
            out[key] = {"first": first, "last": last, "grew": round(last - first, 1),
                        "max": max(s[key] for s in after)}  # fmt: skip
        return out
