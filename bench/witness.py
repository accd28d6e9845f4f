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


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter (R, S, T ...) and start time (clock ticks after boot); None
    when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else (fields[0], int(fields[19]))


def _age(start: int) -> float:
    """Seconds since a process that started at ``start`` (clock ticks after boot)."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start / os.sysconf("SC_CLK_TCK")


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


SETTLED = 5.0  # seconds after which a process's argv is its own


class _Looking:
    """A daemon thread that looks until it is stopped."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        raise NotImplementedError


class Witness(_Looking):
    """Watches the fake backends whose argv carries ``mark`` (the run's ledger path); each
    names its host as ``--name model@host``."""

    def __init__(
        self, mark: str, budget: dict[str, int], holding: Path, every: float = 0.005
    ) -> None:
        self._mark = mark
        self._holding = holding
        self._budget = budget
        self._every = every
        # pid -> (start time, host of a backend; None: not one)
        self._known: dict[int, tuple[int, str | None]] = {}
        self._lock = threading.Lock()  # the sampler and the fault injector both look
        self.starts: dict[str, int] = defaultdict(int)
        self.violations: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.samples = 0
        super().__init__("witness")

    def holds(self, pid: int, host: str) -> bool:
        """Alive and holding its device memory (the fakes keep a file in ``holding/<host>``
        from their start until they are asleep or gone; a frozen one still holds it)."""
        return _stat(pid) is not None and (self._holding / host / str(pid)).exists()

    def alive(self) -> dict[int, str]:
        """The run's backends alive now (asleep too), by pid: their host.

        A process is known by its pid and start time (pids are reused); one that is gone is
        forgotten, and a backend's holding file it could not remove (SIGKILL) goes with it."""
        with self._lock:
            found, seen = {}, set()
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                stat = _stat(pid)
                if stat is None:
                    continue
                seen.add(pid)
                known = self._known.get(pid)
                if known is None or known[0] != stat[1]:
                    host = self._host_of(_argv(pid))
                    if host is not None:
                        self.starts[host] += 1
                    # Until it surely exec'd, a new process may show its parent's argv (a fork
                    # of llmswap, runc's init): not known yet.
                    if host is not None or _age(stat[1]) > SETTLED:
                        self._known[pid] = (stat[1], host)
                    known = (stat[1], host)
                if known[1] is not None:
                    found[pid] = known[1]
            for pid in set(self._known) - seen:
                _, host = self._known.pop(pid)
                if host is not None:
                    (self._holding / host / str(pid)).unlink(missing_ok=True)
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
            try:
                self._sample()
            except Exception as e:  # a witness that stops looking must say so
                self.errors.append(repr(e))
            time.sleep(self._every)

    def _sample(self) -> None:
        self.samples += 1
        by_host: dict[str, list[int]] = defaultdict(list)
        for pid, host in self.alive().items():
            if (self._holding / host / str(pid)).exists():
                by_host[host].append(pid)
        for host, pids in by_host.items():
            if len(pids) > self._budget.get(host, 1):
                again = [p for p in pids if self.holds(p, host)]
                if len(again) > self._budget.get(host, 1):
                    names = [self.name(p) for p in again]
                    self.violations.append({"at": time.time(), "host": host, "alive": names})


class Resources(_Looking):
    """The daemon's RSS, descriptors and threads, every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 2.0) -> None:
        self._pid = pid
        self._every = every
        self.samples: list[dict[str, float]] = []
        super().__init__("resources")

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
