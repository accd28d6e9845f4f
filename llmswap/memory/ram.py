"""Host memory, read from ``/proc``: what the kernel could give a new process, and what a
process tree holds.

Free is ``MemAvailable`` (free pages plus the page cache and reclaimable slabs the kernel would
give back), not ``MemFree``: a model's weights read into the page cache by an earlier load or by
read-ahead are not in anyone's way.  A tree's use is the sum of its processes' PSS (proportional
set size, ``/proc/<pid>/smaps_rollup``): pages shared between processes are split between them,
so two servers mapping one GGUF are not counted twice.  A container's processes are measured
the same way (its cgroup's ``memory.current`` would also count the page cache its weights were
read through, which the kernel gives back).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from zope.interface import implementer

from llmswap.memory import procs
from llmswap.memory.probe import DeviceReading, IDeviceProbe


@implementer(IDeviceProbe)
class RamProbe:
    frees_late = False  # the kernel frees a process's pages as it exits

    def __init__(self, proc: str = procs.PROC) -> None:
        self._proc = proc

    def reading(self) -> DeviceReading:
        fields: dict[str, int] = {}
        with open(os.path.join(self._proc, "meminfo")) as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
        return DeviceReading(fields["MemTotal"], fields["MemAvailable"])

    def held_by(self, pids: Sequence[int]) -> int:
        return sum(procs.pss(p, self._proc) for p in procs.trees(pids, self._proc))

    def holders(self, exclude: Sequence[int], most: int) -> list[tuple[int, str, int]]:
        ours = procs.trees([*exclude, os.getpid()], self._proc)
        found = [
            (p, procs.name(p, self._proc), procs.pss(p, self._proc))
            for p in procs.pids(self._proc)
            if p not in ours
        ]
        return sorted((h for h in found if h[2] > 0), key=lambda h: -h[2])[:most]
