"""A device's memory as measured: the contract every probe keeps, and which probe a device names.

A probe reads the device (blocking: ``/proc`` files, a driver library), so callers run it in a
thread; it returns values and writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from zope.interface import Attribute, Interface


@attrs.frozen
class DeviceReading:
    """One look at a device, in bytes; a GPU's busy share (0 to 1), temperature (degrees
    Celsius) and power draw (watts) where its driver tells them."""

    total: int
    free: int
    utilization: float | None = None
    temperature: float | None = None
    power: float | None = None

    @property
    def used(self) -> int:
        return self.total - self.free


class IDeviceProbe(Interface):
    """Measures one device.  Its calls block: run them in a thread."""

    frees_late = Attribute(
        "Whether a dead process's memory comes back some time after it is gone (CUDA's "
        "does): then a start after a stop waits until the probe shows it back"
    )

    def reading() -> DeviceReading:
        """The device's total and free memory now."""

    def held_by(pids: Sequence[int]) -> int:
        """Bytes the process trees rooted at ``pids`` hold on this device (0: none alive)."""

    def holders(exclude: Sequence[int], most: int) -> list[tuple[int, str, int]]:
        """The ``most`` processes holding the most of this device, outside the trees rooted at
        ``exclude``: (pid, name, bytes), largest first."""
