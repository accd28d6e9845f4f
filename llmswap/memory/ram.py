"""Host memory, read from ``/proc``: what the kernel could give a new process, and what a
process tree holds.

Free is ``MemAvailable`` (free pages plus the page cache and reclaimable slabs the kernel would
give back), not ``MemFree``: a model's weights read into the page cache by an earlier load or by
read-ahead are not in anyone's way.  A tree's use is the sum of its processes' PSS (proportional
set size, ``/proc/<pid>/smaps_rollup``): pages shared between processes are split between them,
so two servers mapping one GGUF are not counted twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from zope.interface import implementer

from llmswap.memory.probe import DeviceReading, IDeviceProbe

PROC = "/proc"


@implementer(IDeviceProbe)
class RamProbe:
    def __init__(self, proc: str = PROC) -> None:
        self._proc = proc

    def reading(self) -> DeviceReading:
        fields: dict[str, int] = {}
        with open(os.path.join(self._proc, "meminfo")) as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
        return DeviceReading(fields["MemTotal"], fields["MemAvailable"])

    def held_by(self, pids: Sequence[int]) -> int:
        return sum(self._pss(p) for p in self._trees(pids))

    def holders(self, exclude: Sequence[int], most: int) -> list[tuple[int, str, int]]:
        ours = self._trees([*exclude, os.getpid()])
        found = [(p, self._name(p), self._pss(p)) for p in self._pids() if p not in ours]
        return sorted((h for h in found if h[2] > 0), key=lambda h: -h[2])[:most]

    # -- /proc --------------------------------------------------------------------------------

    def _pids(self) -> Iterator[int]:
        return (int(n) for n in os.listdir(self._proc) if n.isdigit())

    def _trees(self, roots: Sequence[int]) -> set[int]:
        """``roots`` and all their descendants (a server's workers, a container's processes)."""
        children: dict[int, list[int]] = {}
        for pid in self._pids():
            parent = self._parent(pid)
            if parent is not None:
                children.setdefault(parent, []).append(pid)
        found, todo = set(), [p for p in roots if p > 0]
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, ()))
        return found

    def _parent(self, pid: int) -> int | None:
        try:
            with open(os.path.join(self._proc, str(pid), "stat")) as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return None  # gone meanwhile

    def _pss(self, pid: int) -> int:
        try:
            with open(os.path.join(self._proc, str(pid), "smaps_rollup")) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass  # gone meanwhile, or a kernel thread
        return 0

    def _name(self, pid: int) -> str:
        try:
            with open(os.path.join(self._proc, str(pid), "comm")) as f:
                return f.read().strip()
        except OSError:
            return "?"
