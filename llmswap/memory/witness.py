"""The memory witness: what each loaded model really holds, and a start only when there is room.

A model's real footprint is known once it runs, and a device's memory comes back some time after
its process is gone (CUDA frees a dead process's memory asynchronously).  So, for devices with a
``probe``: every few seconds the witness measures each loaded instance's process tree (in a
thread) and keeps the peak (:mod:`.footprints`, across restarts); and before a start it reads the
device until the model's need is free.  Right after a stop it waits, within the device's
``free_timeout``, until the stopped models' memory is back (:data:`BACK_MARGIN`): starting while
it is still being freed is how two models end up loading at once.  With nothing put away it
does not wait: a device whose memory other processes hold fails the load at once, with what is
free, what is needed and who holds it.

The need is the larger of the declared ``memory`` and the measured peak; the policy counts the
same figure (:meth:`MemoryWitness.counted`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmswap import errors
from llmswap.config.config import Config
from llmswap.config.model import ModelConfig
from llmswap.events import (
    EventBus,
    MemoryFreed,
    ModelState,
    ModelStateChanged,
    Subscription,
    Swap,
)
from llmswap.interfaces import IBackend
from llmswap.memory import footprints
from llmswap.memory.nvml import NvmlProbe
from llmswap.memory.probe import DeviceReading, IDeviceProbe
from llmswap.memory.ram import RamProbe

log = Logger()

MEASURE_EVERY = 2.0  # seconds between measurements of the loaded models
POLL_EVERY = 0.05  # seconds between reads of a device that is freeing memory
# A stop's memory is back when this much of it is (other processes come and go meanwhile).
BACK_MARGIN = 0.1
READ_TIMEOUT = 10.0  # seconds a probe's reading may take
MOST_READING = 2  # probe readings running at once (a measurement and a start's wait)
MiB = 2**20


class ProbeBusy(Exception):
    """Earlier readings of the probes have not returned (a hung driver)."""


@attrs.frozen
class Before:
    """A device just before a stop: its free bytes, and what each model to stop holds there."""

    free: int
    held: dict[str, int]


class MemoryWitness(Service):
    """Owns the measured footprints and the devices' probes."""

    name = "memory-witness"

    def __init__(
        self,
        config: Callable[[], Config],
        loaded: Callable[[], Sequence[tuple[ModelConfig, IBackend]]],
        reactor: Any,
        bus: EventBus | None = None,
        every: float = MEASURE_EVERY,
        probes: Mapping[str, IDeviceProbe] | None = None,
        in_thread: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        """``probes`` (by device) and ``in_thread`` stand in for the real ones in tests."""
        self._config = config
        self._loaded = loaded
        self._reactor = reactor
        self._bus = bus
        self._every = every
        self._given: dict[str, IDeviceProbe] = dict(probes or {})
        # By device and what the configuration names (a reload may name another probe).
        self._probes: dict[tuple[str, str], IDeviceProbe] = {}
        self._threads = in_thread
        self._reading = 0  # probe readings whose thread has not returned
        self._kept = footprints.Footprints()
        self._measured: dict[str, int] = {}  # by instance, for the configuration of ``_for``
        self._for: Config | None = None
        self._loop: LoopingCall | None = None
        self._measuring: Deferred[None] | None = None
        self._freeing: dict[str, float] = {}  # by device: when a process of ours last left it
        self._heard: Subscription | None = None
        self.devices: dict[str, DeviceReading] = {}  # the probed devices, as last read

    # -- Service ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._bus is not None:
            self._heard = self._bus.subscribe_all((Swap, ModelStateChanged), self._left)
        # Always: a reload may add a probe.  With none, a round is a look at the configuration.
        read = self._in_thread(footprints.read, self._directory())
        read.addCallback(self._restore).addErrback(self._failed, "reading the kept footprints")
        # The first round at once, once the kept peaks are back: /health shows the devices
        # from the daemon's first seconds, and a peak measured then is not overwritten.
        read.addCallback(self._start_measuring)

    def _start_measuring(self, _: object) -> None:
        if not self.running or (self._loop is not None and self._loop.running):
            return  # stopped before the kept footprints were read, or started again since
        self._loop = LoopingCall(self._measure)
        self._loop.clock = self._reactor
        self._loop.start(self._every, now=True).addErrback(self._failed, "measuring")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._heard is not None:
            self._heard.cancel()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        d: Deferred[None] = self._measuring or succeed(None)
        return d

    @property
    def measured(self) -> dict[str, int]:
        """Measured peaks by instance; after a reload, of what each instance runs now (a
        changed command starts over)."""
        config = self._config()
        if config is not self._for:
            self._for, self._measured = config, self._kept.current(config.instances)
        return self._measured

    # -- what the manager asks --------------------------------------------------------------

    def counted(self, model: ModelConfig) -> int | None:
        """The bytes the budget counts for ``model``: declared or measured, the larger."""
        measured = self.measured.get(model.name)
        if model.memory is None:
            return measured
        return max(model.memory, measured or 0)

    def before_stop(
        self, device: str, trees: Mapping[str, Sequence[int]]
    ) -> Deferred[Before | None]:
        """Before a stop of the models in ``trees`` (their process trees): the device's free
        bytes, and what each of them holds there now (as counted when the probe cannot say
        what a process holds); None when the device is not probed or cannot be read."""
        spec = self._config().probe(device)
        if spec is None:
            return succeed(None)
        probe = self._probe(device, spec.probe)
        instances = self._config().instances
        counted = {n: self.counted(instances[n]) or 0 if n in instances else 0 for n in trees}

        def held(name: str, pids: Sequence[int]) -> int:
            try:
                return probe.held_by(pids)
            except Exception:  # some GPUs (vGPU, MIG) do not list processes
                return counted[name]

        def read() -> Before:
            return Before(probe.reading().free, {n: held(n, p) for n, p in trees.items()})

        d = self._read(read)
        d.addErrback(lambda f: log.warn("device {d}: not read before a stop: {e}",
                                        d=device, e=f.value))  # fmt: skip
        return d

    @inlineCallbacks
    def room_for(
        self, model: ModelConfig, freed: int | None = None, before: int | None = None
    ) -> Generator[Deferred[Any], Any, None]:
        """Fires once ``model``'s device has its need free and, on a device that frees late
        (a GPU), the memory a stop just gave back (``freed`` bytes, with ``before`` free until
        then) back within a margin, as long as ``free_timeout`` allows; fails with an APIError
        when the need is not free.  At once when the device is not probed or the need not
        known."""
        spec = self._config().probe(model.device)
        need = self.counted(model)
        if spec is None or need is None:
            return
        # A stop of ours on the device lately (an unload, a crash) may still be freeing too.
        lately = self._reactor.seconds() - self._freeing.get(model.device, -spec.free_timeout)
        evicted = freed is not None or lately < spec.free_timeout
        probe = self._probe(model.device, spec.probe)
        back = 0
        if before is not None and freed and probe.frees_late:
            back = before + int(freed * (1 - BACK_MARGIN))
        started = self._reactor.seconds()
        while True:
            try:
                reading = yield self._read(probe.reading)
            except Exception as e:  # a probe that cannot read leaves the declared budget
                log.warn("device {d}: its probe failed ({e}); {m} starts by the budget alone",
                         d=model.device, e=e, m=model.name)  # fmt: skip
                return
            waited = self._reactor.seconds() - started
            out_of_time = not evicted or waited >= spec.free_timeout
            if reading.free >= need and (reading.free >= min(back, reading.total) or out_of_time):
                if waited >= POLL_EVERY:  # it had to wait for the memory to come back
                    self._waited(model, reading, waited)
                return
            if out_of_time:
                ours = [p for _, b in self._loaded() for p in b.pids()]
                try:
                    holders = yield self._read(probe.holders, ours, 3)
                except Exception:  # who holds it is a courtesy; the refusal is the answer
                    holders = []
                raise self._no_room(model, reading.free, need, holders, waited if evicted else 0)
            yield deferLater(self._reactor, POLL_EVERY, lambda: None)

    def _left(self, event: Swap | ModelStateChanged) -> None:
        """A process of ours left its device: stopped (not put to sleep), or died."""
        at = event.at
        if isinstance(event, Swap):
            gone = [n for n in event.unloaded if n not in event.slept]
            at -= event.load_seconds or 0  # published once the load that followed ended
        else:
            gone = [event.model] if event.new is ModelState.FAILED else []
        instances = self._config().instances
        for name in gone:
            if name in instances:
                self._freeing[instances[name].device] = at

    def _waited(self, model: ModelConfig, reading: DeviceReading, waited: float) -> None:
        log.info("device {d}: {mib:.0f} MiB free for {m} after {s:.2f} s",
                 d=model.device, mib=reading.free / MiB, m=model.name, s=waited)  # fmt: skip
        if self._bus is not None:
            now = self._reactor.seconds()
            self._bus.publish(MemoryFreed(now, model.device, model.name, waited))

    # -- measuring ----------------------------------------------------------------------------

    def _measure(self) -> None:
        if self._measuring is not None:
            return  # the last one is still reading
        config = self._config()
        if not config.probed():
            return
        probes = {
            d: self._probe(d, p.probe) for h in config.hosts.values() for d, p in h.probes.items()
        }
        work = []
        for model, backend in self._loaded():
            pids = backend.pids()
            if model.device in probes and pids:
                work.append((model, probes[model.device], pids))

        def read() -> tuple[dict[str, DeviceReading], list[tuple[ModelConfig, int]]]:
            devices = {d: probe.reading() for d, probe in probes.items()}
            return devices, [(m, probe.held_by(pids)) for m, probe, pids in work]

        # Set before the callbacks: a reading that fires at once must still clear it.
        self._measuring = d = self._read(read)
        d.addCallbacks(self._record, self._unread).addErrback(self._failed, "measuring")
        d.addBoth(self._done_measuring)

    def _done_measuring(self, _: object) -> None:
        self._measuring = None

    def _record(self, read: tuple[dict[str, DeviceReading], list[tuple[ModelConfig, int]]]) -> None:
        self.devices, held = read
        peaks = [(m, b) for m, b in held if b > 0 and self._kept.record(m, b)]
        for m, b in peaks:
            log.info("model {m}: holds {mib:.0f} MiB on {d}, its new peak",
                     m=m.name, mib=b / MiB, d=m.device)  # fmt: skip
            if footprints.too_low(m.memory, b):
                log.warn("model {m} declares memory {declared:.0f} MiB but holds {mib:.0f} MiB; "
                         "the budget counts what it holds", m=m.name,
                         declared=(m.memory or 0) / MiB, mib=b / MiB)  # fmt: skip
        if not peaks:
            return
        self._for = None  # read again
        write = self._in_thread(footprints.write, self._directory(), self._kept.as_json())
        write.addErrback(self._failed, "writing the footprints")

    def _restore(self, kept: footprints.Footprints) -> None:
        self._kept, self._for = kept, None

    # -- helpers ------------------------------------------------------------------------------

    def _probe(self, device: str, name: str) -> IDeviceProbe:
        """The probe ``devices.<name>.probe`` names (one of ``settings.PROBES``)."""
        if device in self._given:
            return self._given[device]
        if (device, name) not in self._probes:
            kind, _, index = name.partition(":")
            made = NvmlProbe(int(index)) if kind == "nvml" else RamProbe()
            self._probes[device, name] = made
        return self._probes[device, name]

    def _directory(self) -> Path:
        return Path(self._config().state_directory())

    def _read(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """A probe's reading, in a thread, given up after ``READ_TIMEOUT`` (a GPU off the bus
        may never answer; the lane it holds must not wait for ever).  A reading given up may
        still hold its thread: while :data:`MOST_READING` are still running, another fails at
        once, so a hung driver holds that many of the reactor's threads, never the pool."""
        if self._reading >= MOST_READING:
            return fail(ProbeBusy(f"{self._reading} probe readings still running"))
        self._reading += 1
        result: Deferred[Any] = Deferred()

        def ended(outcome: Any) -> None:
            self._reading -= 1
            if result.called:  # given up on already
                return
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        self._in_thread(f, *args).addBoth(ended)
        return result.addTimeout(READ_TIMEOUT, self._reactor)

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._threads is not None:
            return self._threads(f, *args)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def _no_room(
        self,
        model: ModelConfig,
        free: int,
        need: int,
        holders: list[tuple[int, str, int]],
        waited: float,
    ) -> errors.APIError:
        held = ", ".join(f"{errors.printable(name)} ({b / MiB:.0f} MiB)" for _, name, b in holders)
        after = f" after waiting {waited:.1f} s for it to be freed" if waited else ""
        return errors.backend_unavailable(
            f"Model '{model.name}' needs {need / MiB:.0f} MiB on device '{model.device}', which "
            f"has {free / MiB:.0f} MiB free{after}; not loaded"
            + (f". Held most by other processes: {held}" if held else "")
        )

    def _unread(self, failure: Failure) -> None:
        """A probe that failed or timed out: the next round tries again (a warning, as the
        daemon goes on by the declared figures meanwhile)."""
        log.warn("memory witness: a probe did not read: {e!r}", e=failure.value)

    def _failed(self, failure: Failure, what: str) -> None:
        log.failure("memory witness: {what} failed", failure, what=what)
