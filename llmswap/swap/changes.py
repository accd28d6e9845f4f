"""The changes a host's lane runs, one at a time: start-up, a load, an unload, a reload.

The other half of the swap manager's job, kept apart: :class:`~llmswap.swap.manager.SwapManager`
decides (intake, the policy's rounds, admissions); these carry a decision out on the backends,
always under the lane of the host they change (the swap lock), and publish what they did.  A
mixin: it works on the manager's slots, queue and lanes, which :class:`_Manager` names.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmswap import errors
from llmswap.config.config import Config, reload_changes
from llmswap.events import Cause, EventBus, Swap
from llmswap.interfaces import BackendHTTP, IBackend
from llmswap.memory import oom
from llmswap.memory.witness import MemoryWitness
from llmswap.swap import eviction, policy
from llmswap.swap.lane import Lane
from llmswap.swap.queue import RequestQueue
from llmswap.swap.readiness import BackendDied
from llmswap.swap.reconcile import start_up, stop_strays
from llmswap.swap.slot import Slot

log = Logger()


class _Manager(Protocol):
    """What the changes use of the manager."""

    config: Config
    bus: EventBus
    _slots: dict[str, Slot]
    _queue: RequestQueue
    _lanes: dict[str, Lane]
    _clock: IReactorTime
    _http: BackendHTTP
    _memory: MemoryWitness | None

    def _on(self, host: str) -> dict[str, Slot]: ...

    def _slot(self, name: str, backend: IBackend) -> Slot: ...

    def _view_of(self, instance: str) -> policy.View: ...

    def view(self, host: str) -> policy.View: ...

    def _read_ahead(self, model: str | None) -> None: ...

    def _dispatch(self) -> None: ...

    def _load(
        self, instance: str, cause: Cause, wanted: Callable[[], int] | None = None
    ) -> Deferred[None]: ...

    def _unload(self, names: list[str], cause: Cause) -> Deferred[None]: ...

    def _start(
        self, slot: Slot, freed: int | None, before: int | None
    ) -> Deferred[tuple[str, ...]]: ...

    def _put_away(
        self, names: Sequence[str], instance: str
    ) -> Deferred[tuple[eviction.Away, int | None, int | None]]: ...


class Changes:
    """The changes; each runs under its host's lane (:mod:`llmswap.swap.lane`)."""

    def _start_up(self: _Manager, host: str) -> Deferred[None]:
        load = partial(self._load, cause=Cause.PRELOAD)
        return start_up(self.config, self._on(host), self._http, self._clock, load)

    @inlineCallbacks
    def _load(
        self: _Manager, instance: str, cause: Cause, wanted: Callable[[], int] | None = None
    ) -> Generator[Deferred[Any], Any, None]:
        """Make room for ``instance`` (drain, then stop what it evicts) and load it.

        ``wanted`` is asked once the evicted models drained: when the requests that caused the
        load went away meanwhile, nothing is stopped (a client that left never causes a swap).
        """
        slot = self._slots[instance]
        if slot.ready and slot.backend.alive():
            return None
        held_back = slot.held_back()
        if held_back is not None:  # crash backoff: its requests are told when to come back
            self._queue.reject(instance, held_back)
            return None
        self._read_ahead(instance)
        host = slot.config.host
        busy = frozenset(self._queue.waiting.models()) | {
            n for n, s in self._slots.items() if s.in_flight
        }
        evict = policy.plan_eviction(self.view(host), instance, busy)
        started = self._clock.seconds()
        yield gatherResults([self._slots[name].drain() for name in evict], consumeErrors=True)
        if wanted is not None and not wanted():
            for name in evict:
                self._slots[name].undrain()
            log.info("load of {instance} called off: no request waits for it", instance=instance)
            return None
        away, freed, before = yield self._put_away(evict, instance)
        yield eviction.clear_strays(self._on(host), instance)
        stopped = self._clock.seconds()
        try:
            crowded = yield self._start(slot, freed, before)
        except BaseException as e:
            if not isinstance(e, CancelledError):
                err = slot.as_api_error(e)
                self._queue.reject(instance, err)
                raise err from None
            raise
        loaded = self._clock.seconds()
        took, unloaded = (stopped - started, loaded - stopped), away.unloaded + crowded
        swap = Swap(loaded, cause, instance, unloaded, *took, slot.woke, away.slept)
        self.bus.publish(swap)
        log.info("{swap}", swap=swap.summary())
        return None

    @inlineCallbacks
    def _put_away(
        self: _Manager, names: Sequence[str], instance: str
    ) -> Generator[Deferred[Any], Any, tuple[eviction.Away, int | None, int | None]]:
        """Put ``names`` away for ``instance``; fires with what that did, the bytes the stopped
        ones held on its device (None: none stopped) and its free bytes before (None: not
        measured)."""
        device, before = self._slots[instance].config.device, None
        if self._memory is not None and names:
            slots = [self._slots[n] for n in names]
            trees = {s.name: s.backend.pids() for s in slots if s.config.device == device}
            before = yield self._memory.before_stop(device, trees)
        interval, http = self.config.health_interval, self._http
        away = yield eviction.put_away(self._slots, self._view_of, names, instance, http, interval)
        # What the ones stopped on its device held there (a sleeper keeps some of it).
        stopped = [n for n in away.unloaded if n not in away.slept]
        if before is None:
            return away, None, None
        gone = [n for n in stopped if n in before.held]
        return away, (sum(before.held[n] for n in gone) if gone else None), before.free

    @inlineCallbacks
    def _start(
        self: _Manager, slot: Slot, freed: int | None, before: int | None
    ) -> Generator[Deferred[Any], Any, tuple[str, ...]]:
        """Start ``slot`` once its device has room (``freed`` bytes were just stopped there,
        with ``before`` free until then).  A load that runs out of memory beside other models of
        its device puts them away and is tried once more; fires with what that put away."""
        interval, device = self.config.health_interval, slot.config.device
        if self._memory is not None:  # the device really has room (it may still be freeing)
            yield self._memory.room_for(slot.config, freed, before)
        try:
            yield slot.start(self._http, interval)
            return ()
        except BackendDied:
            if not oom.ran_out(slot.backend.describe().get("output", ())):
                raise
            beside = [n for n, s in self._on(slot.config.host).items()
                      if n != slot.name and s.resident and s.config.device == device]  # fmt: skip
            if not beside:
                raise _no_fit(slot, "alone on") from None
        log.warn("model {m}: ran out of memory loading beside {b}; putting them away, once more",
                 m=slot.name, b=", ".join(beside))  # fmt: skip
        yield gatherResults([self._slots[n].drain() for n in beside], consumeErrors=True)
        away, freed, before = yield self._put_away(beside, slot.name)
        if self._memory is not None:
            yield self._memory.room_for(slot.config, freed, before)
        try:
            yield slot.start(self._http, interval)
        except BackendDied:
            if not oom.ran_out(slot.backend.describe().get("output", ())):
                raise
            raise _no_fit(slot, "and again alone on") from None
        unloaded: tuple[str, ...] = away.unloaded
        return unloaded

    @inlineCallbacks
    def _unload(
        self: _Manager, names: list[str], cause: Cause
    ) -> Generator[Deferred[Any], Any, None]:
        """Drain, then sleep (an awake model with a sleep mode) or stop them; a reload always
        stops (the process must start again with its new settings)."""
        slots = [self._slots[n] for n in names]
        started = self._clock.seconds()
        yield gatherResults([s.drain() for s in slots if s.state.resident], consumeErrors=True)
        alive = [s.name for s in slots if s.backend.alive() and s.config.remote is None]
        sleep, interval = cause is not Cause.RELOAD, self.config.health_interval
        away = yield eviction.put_away(
            self._slots, self._view_of, alive, None, self._http, interval, sleep
        )
        if away.unloaded:
            now = self._clock.seconds()
            self.bus.publish(Swap(now, cause, None, away.unloaded, now - started, slept=away.slept))

    @inlineCallbacks
    def _reconfigure(
        self: _Manager, config: Config, fresh: Mapping[str, IBackend]
    ) -> Generator[Deferred[Any], Any, dict[str, list[str]]]:
        removed, changed, added = reload_changes(self.config, config)
        yield self._unload([*removed, *changed], Cause.RELOAD)
        for name in removed:
            self._queue.reject(name, errors.model_not_found(name, list(config.models)))
            del self._slots[name]
        self.config = config
        # Held lanes are let go by the change's end, kept or not.
        self._lanes = {h: self._lanes.get(h) or Lane(h, self._dispatch) for h in config.hosts}
        for name in changed + added:
            self._slots[name] = self._slot(name, fresh[name])
        yield stop_strays([self._slots[n] for n in changed + added])
        self._queue.retime()  # the new request_timeout applies to who waits now
        summary = {"added": added, "removed": removed, "changed": changed}
        said = ", ".join(f"{k} {', '.join(v) or 'none'}" for k, v in summary.items())
        log.info("configuration reloaded from {source}: {said}", source=config.source, said=said)
        return summary


def _no_fit(slot: Slot, how: str) -> errors.APIError:
    """A load that ran out of memory with nothing else of llmswap's on its device: the model is
    marked failed with that reason, and its requests are told."""
    err = errors.backend_unavailable(
        f"Model '{slot.name}' ran out of memory while loading, {how} device "
        f"'{slot.config.device}': it does not fit there"
    )
    slot.explain(err.message)
    return err
