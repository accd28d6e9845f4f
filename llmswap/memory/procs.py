"""This machine's processes, read from ``/proc``: trees, names and proportional set sizes.

A model's server forks workers (vLLM, a container's processes): what it holds is what its whole
tree holds, on any device.  Every read tolerates a process that ends meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

PROC = "/proc"


def pids(proc: str = PROC) -> Iterator[int]:
    return (int(n) for n in os.listdir(proc) if n.isdigit())


def trees(roots: Sequence[int], proc: str = PROC) -> set[int]:
    """``roots`` and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid in pids(proc):
        parent = _parent(pid, proc)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found, todo = set(), [p for p in roots if p > 0]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def pss(pid: int, proc: str = PROC) -> int:
    """The process's proportional set size in bytes (0: gone, or a kernel thread)."""
    try:
        with open(os.path.join(proc, str(pid), "smaps_rollup")) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def name(pid: int, proc: str = PROC) -> str:
    try:
        with open(os.path.join(proc, str(pid), "comm")) as f:
            return f.read().strip()
    except OSError:
        return "?"


def _parent(pid: int, proc: str) -> int | None:
    try:
        with open(os.path.join(proc, str(pid), "stat")) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None  # gone meanwhile
