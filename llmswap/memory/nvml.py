"""An NVIDIA GPU, read through NVML (``nvidia-ml-py``, NVIDIA's own binding: the ``nvml`` extra).

The driver tells each device's total, free and used memory, and what every compute process holds
on it, by pid: a model's use is what its server's process tree holds there.  Processes outside
this machine's pid namespace (another container's) are not seen by pid, but their memory is in
the device's used figure all the same.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from zope.interface import implementer

from llmswap.memory import procs
from llmswap.memory.probe import DeviceReading, IDeviceProbe

_started = threading.Lock()


@implementer(IDeviceProbe)
class NvmlProbe:
    """The GPU at ``index`` (NVML's order).  The driver's library is loaded by the first
    reading, in a thread like every reading."""

    frees_late = True  # CUDA frees a dead process's memory asynchronously

    def __init__(self, index: int) -> None:
        import pynvml  # the configuration checked it is there

        self._nvml: Any = pynvml
        self._index = index
        self._handle: Any = None
        self._started = False

    @property
    def _device(self) -> Any:
        with _started:  # NVML counts its users: each probe inits once, and never shuts down
            if self._handle is None:
                if not self._started:
                    self._nvml.nvmlInit()
                    self._started = True
                self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self._index)
        return self._handle

    def reading(self) -> DeviceReading:
        nvml, device = self._nvml, self._device
        memory = nvml.nvmlDeviceGetMemoryInfo(device)
        return DeviceReading(
            int(memory.total),
            int(memory.free),
            self._optional(lambda: nvml.nvmlDeviceGetUtilizationRates(device).gpu / 100),
            self._optional(
                lambda: nvml.nvmlDeviceGetTemperature(device, nvml.NVML_TEMPERATURE_GPU)
            ),
            self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(device) / 1000),
        )

    def held_by(self, pids: Sequence[int]) -> int:
        ours = procs.trees(pids)
        return sum(p.usedGpuMemory or 0 for p in self._processes() if p.pid in ours)

    def holders(self, exclude: Sequence[int], most: int) -> list[tuple[int, str, int]]:
        ours = procs.trees(exclude)
        found = [(p.pid, procs.name(p.pid), p.usedGpuMemory or 0) for p in self._processes()]
        return sorted((h for h in found if h[0] not in ours), key=lambda h: -h[2])[:most]

    def _processes(self) -> list[Any]:
        return list(self._nvml.nvmlDeviceGetComputeRunningProcesses(self._device))

    def _optional(self, read: Any) -> float | None:
        """A figure not every GPU gives (``NVML_ERROR_NOT_SUPPORTED``): None without it."""
        try:
            return float(read())
        except self._nvml.NVMLError:
            return None
