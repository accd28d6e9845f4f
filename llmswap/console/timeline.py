"""The console's history: which model was resident when, each swap's cause, queue depth, and
what each probed device held.

Model state changes and swaps come from the event stream; the queue depth and the probed
devices' use are sampled from a snapshot every few seconds.  All are kept for ``HOURS`` in
bounded deques.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llmswap.events import EventBus, ModelStateChanged, Swap
from llmswap.swap.snapshot import Snapshot

log = Logger()

HOURS = 6
SAMPLE_SECONDS = 5.0
_MAX_CHANGES = 5_000  # a swap a minute for six hours is about 1,800 state changes
_SAMPLES = int(HOURS * 3600 / SAMPLE_SECONDS)


def change(e: ModelStateChanged) -> dict[str, Any]:
    return {"at": e.at, "model": e.model, "old": e.old.value, "new": e.new.value, "error": e.error}


def swap(e: Swap) -> dict[str, Any]:
    return {
        "at": e.at, "cause": e.cause.value, "loaded": e.loaded, "unloaded": list(e.unloaded),
        "stop_seconds": e.stop_seconds, "load_seconds": e.load_seconds, "woke": e.woke,
        "slept": list(e.slept),
    }  # fmt: skip


class Timeline(Service):
    name = "timeline"

    def __init__(
        self, bus: EventBus, clock: IReactorTime, snapshot: Callable[[], Snapshot]
    ) -> None:
        self._clock = clock
        self._snapshot = snapshot
        self._changes: deque[dict[str, Any]] = deque(maxlen=_MAX_CHANGES)
        self._swaps: deque[dict[str, Any]] = deque(maxlen=_MAX_CHANGES)
        self._depth: deque[tuple[float, int]] = deque(maxlen=_SAMPLES)
        # By probed device: (when, bytes used by anyone, total bytes).
        self._memory: dict[str, deque[tuple[float, int, int]]] = {}
        self._sampler: LoopingCall | None = None
        bus.subscribe(ModelStateChanged, lambda e: self._changes.append(change(e)))
        bus.subscribe(Swap, lambda e: self._swaps.append(swap(e)))

    def startService(self) -> None:
        super().startService()
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = self._clock
        self._sampler.start(SAMPLE_SECONDS).addErrback(lambda f: log.failure("sampling", f))

    def stopService(self) -> None:
        super().stopService()
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()

    def _sample(self) -> None:
        snap = self._snapshot()
        self._depth.append((snap.at, snap.waiting))
        for device, reading in snap.devices.items():
            kept = self._memory.setdefault(device, deque(maxlen=_SAMPLES))
            kept.append((snap.at, reading.used, reading.total))

    def since(self, hours: float = HOURS) -> dict[str, Any]:
        start = self._clock.seconds() - hours * 3600
        return {
            "from": start,
            "now": self._clock.seconds(),
            "changes": [c for c in self._changes if c["at"] >= start],
            "swaps": [s for s in self._swaps if s["at"] >= start],
            "depth": [d for d in self._depth if d[0] >= start],
            "memory": {n: [m for m in kept if m[0] >= start] for n, kept in self._memory.items()},
        }
