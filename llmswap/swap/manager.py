"""The swap manager: which models run, decided by the policy, changed one at a time.

Requests arrive as tickets (:mod:`llmswap.swap.queue`) for a model's instance (placed by
:func:`llmswap.swap.policy.place` when it may run on several hosts); after every event the manager
asks :func:`llmswap.swap.policy.decide`, per host, which tickets get a lease on a ready backend and
what to load or unload there, one change at a time in the host's
:class:`~llmswap.swap.lane.Lane` (several hosts' at once).  An instance's own life is its
:class:`~llmswap.swap.slot.Slot`'s; :mod:`llmswap.swap.eviction` puts evicted models away.

A lease is held until the last byte of the response was relayed, so a stream never overlaps a
load that needs its memory: an evicted model first drains (no new admissions, in-flight requests
finish within ``drain_timeout``), then is stopped and confirmed gone, or asleep ("stopped" must
mean "memory freed", not "signal sent"), and only then does the next model start.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from functools import partial
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmswap import errors
from llmswap.config.config import Config
from llmswap.events import Cause, EventBus, ModelState, RequestAdmitted, RequestQueued, Swap
from llmswap.interfaces import BackendHTTP, IBackend
from llmswap.memory.witness import MemoryWitness
from llmswap.swap import eviction, lane, policy, pools, snapshot
from llmswap.swap.bets import Bets
from llmswap.swap.changes import Changes
from llmswap.swap.lane import Lane
from llmswap.swap.prefetch import Prefetcher, Residency
from llmswap.swap.queue import Lease, RequestQueue, Ticket
from llmswap.swap.slot import Slot
from llmswap.swap.snapshot import PoolSnapshot, Snapshot

log = Logger()


class SwapManager(Service, Changes):
    """Owns the model slots and decides which of them run; never more than the budget allows."""

    name = "swap-manager"

    def __init__(
        self,
        config: Config,
        backends: Mapping[str, IBackend],
        http: BackendHTTP,
        clock: IReactorTime,
        bus: EventBus | None = None,
        prefetch: Prefetcher | None = None,
        memory: MemoryWitness | None = None,
    ) -> None:
        self.config = config
        self._prefetch = prefetch
        self._memory = memory
        self._http = http
        self._clock = clock
        self.bus = bus if bus is not None else EventBus()
        self._queue = RequestQueue(clock, lambda: self.config, self._dispatch)
        self._lanes = {host: Lane(host, self._dispatch) for host in config.hosts}
        self._slots = {name: self._slot(name, backend) for name, backend in backends.items()}
        self._intake: Deferred[None] | None = None
        self._dispatching = False
        self._again = False
        self._recheck: IDelayedCall | None = None
        self._on_release = self._released  # bound once: every lease shares it
        self._bets = Bets(lambda: self.config)

    def _slot(self, name: str, backend: IBackend) -> Slot:
        return Slot(self.config.instances[name], backend, self._clock, self.bus, self._crashed)

    def _on(self, host: str) -> dict[str, Slot]:
        return {n: s for n, s in self._slots.items() if s.config.host == host}

    def _lane(self, instance: str) -> Lane:
        return self._lanes[self._slots[instance].config.host]

    def _view_of(self, instance: str) -> policy.View:
        return self.view(self._slots[instance].config.host)

    def _names(self, model: str) -> tuple[str, ...]:
        """A model's instances; an instance named (``gemma@box2``: admin, console) is itself."""
        return self.config.placements.get(model) or (model,)

    # -- Service ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Reconciliation and preload run as each host's first change: nothing loads there
        # before they end.
        for each in self._lanes.values():
            each.begin(self._start_up, each.host).addErrback(_logged)
        self._intake = self._take()
        self._intake.addErrback(self._failed, "intake")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._queue.close(errors.shutting_down())
        if self._intake is not None:
            self._intake.cancel()
        if self._recheck is not None and self._recheck.active():
            self._recheck.cancel()
        for each in self._lanes.values():
            if each.change is not None:
                each.change.cancel()
        for lease in list(self._queue.leases):
            lease.release()
        ends = [e.lock.run(eviction.shut_down, self._on(e.host)) for e in self._lanes.values()]
        return gatherResults(ends, consumeErrors=True).addCallback(lambda _: None)

    # -- what the request path and the admin routes use ---------------------------------------

    def acquire(
        self, model: str, priority: int = 0, key: str = "-", client: str | None = None
    ) -> Deferred[Lease]:
        """Queue a request for ``model``; fires with a Lease once its backend may take it.

        Cancelling the Deferred (the client went away) drops the ticket before it can cause a
        swap.  Raises APIError at once when the queue is full.
        """
        if not self.running:
            raise errors.shutting_down()
        instance = self._place(model)
        held_back = self._slots[instance].held_back()
        if held_back is not None:
            raise held_back
        ticket = self._queue.enter(instance, priority, key, client)
        if self.bus.wants(RequestQueued):
            at, seq, position = ticket.enqueued, ticket.seq, ticket.position
            self.bus.publish(RequestQueued(at, seq, ticket.instance, key, priority, position))
        return ticket.waiter

    def _place(self, model: str) -> str:
        # An instance held back by crash backoff is passed over while another may serve.
        every = self._names(model)
        if len(every) == 1:  # the common case, per request: nothing to choose
            return every[0]
        names = [n for n in every if self._slots[n].held_back() is None] or list(every)
        if len(names) == 1:
            return names[0]
        return policy.place([(n, self.view(self._slots[n].config.host)) for n in names])

    def resolve(self, name: str, allowed: Callable[[str], bool]) -> tuple[str, str] | None:
        """What a request's model ``name`` means: its model and the name whose preset applies
        (a model or an alias: itself; a pool: the member chosen now).  None: no such name, or
        a pool with no member the caller may use (``allowed``)."""
        if name in self.config.pools:
            member = self.choose(name, allowed)
            if member is None:
                return None
            name = member
        model = self.config.resolve(name)
        return None if model is None else (model, name)

    def choose(self, pool: str, allowed: Callable[[str], bool]) -> str | None:
        """The member of ``pool`` (as it lists it) that serves a request now; None when the
        caller may use none (``allowed``: whether it may use a model)."""
        spec = self.config.pools[pool]
        views: dict[str, policy.View] = {}
        members = []
        for name in spec.members:
            model = self.config.resolve(name)
            if model is None or not allowed(model):
                continue
            slots = [self._slots[n] for n in self._names(model)]
            hosts = {s.config.host for s in slots}
            for host in hosts - views.keys():
                views[host] = self.view(host)
            members.append(pools.Member(
                name,
                ready=any(s.ready for s in slots),
                loading=any(s.state is ModelState.STARTING for s in slots),
                asleep=any(s.asleep for s in slots),
                fits=any(pools.fits(views[s.config.host], s.config.name) for s in slots),
                held_back=all(s.held_back() is not None for s in slots),
            ))  # fmt: skip
        chosen = pools.choose(spec.prefer, members)
        return chosen.name if chosen is not None else None

    def state(self, model: str) -> ModelState:
        """A model's state: of its instance that is loaded, if any."""
        slots = [self._slots[n] for n in self._names(model)]
        return next((s.state for s in slots if s.state.resident), slots[0].state)

    def last_load_seconds(self, model: str) -> float | None:
        return max(self._slots[n].last_load_seconds or 0 for n in self._names(model)) or None

    def load(self, model: str) -> Deferred[None]:
        """Admin: load ``model`` now (evicting what it needs room from, after draining)."""
        name = self._place(model)
        self._slots[name].restarts.reset()  # an admin's load is a fresh start
        return self._admin([name], lambda: self._load(name, Cause.ADMIN))

    def unload(self, model: str | None = None, cause: Cause = Cause.ADMIN) -> Deferred[None]:
        """Drain and stop ``model`` (on every host), or every model when None."""
        names = list(self._slots) if model is None else list(self._names(model))
        return self._admin(names, lambda: self._unload(names, cause))

    def backend_gone(self, instance: str, detail: str) -> bool:
        """A request found ``instance``'s ready backend refusing connections: it is failed,
        then stopped (its process or container may linger), and the next request starts it.
        False when a reload removed ``instance`` meanwhile: there is nothing to restart."""
        slot = self._slots.get(instance)
        if slot is None:
            return False
        if slot.ready or slot.state is ModelState.DRAINING:
            slot.set(ModelState.FAILED, detail)
            self._crashed(slot)
            self._admin([instance], slot.stop).addErrback(_logged)
        return True

    def keep_alive(self, model: str, seconds: float) -> None:
        """Keep ``model`` loaded ``seconds`` after its last request (``inf``: until evicted),
        instead of its ttl, until it is next stopped; the memory budget still evicts it."""
        for name in self._names(model):
            self._slots[name].keep_alive = seconds
        self._dispatch()

    def reconfigure(self, config: Config, fresh: Mapping[str, IBackend]) -> Deferred[Any]:
        """Apply a reloaded configuration; ``fresh`` has backends for added and changed models.

        Removed and changed models that are loaded drain first (in-flight requests finish),
        then stop; requests waiting for a removed model get 404.  Fires with what changed.
        """
        return self._admin(list(self._slots), lambda: self._reconfigure(config, fresh))

    def models(self) -> list[str]:
        return list(self.config.models)

    @property
    def backends(self) -> Mapping[str, IBackend]:
        return {name: slot.backend for name, slot in self._slots.items()}

    def files(self) -> Deferred[dict[str, Residency]]:
        """How much of each model's weight files is in the page cache (measured in a thread)."""
        return self._prefetch.residency() if self._prefetch is not None else succeed({})

    def snapshot(self, queue: int = 0) -> Snapshot:
        """What the daemon is doing now, with the ``queue`` oldest waiting requests (its cost
        does not grow with the number waiting: the counts are kept)."""
        now, running = self._clock.seconds(), bool(self.running)
        memory = self._memory
        measured, devices = (memory.measured, memory.devices) if memory is not None else ({}, {})
        taken = snapshot.take(
            self._slots, self._queue, self.config, now, running, queue, measured, devices
        )
        if not self.config.pools:
            return taken
        pools = {name: PoolSnapshot(p.members, p.prefer, self.choose(name, lambda _: True))
                 for name, p in self.config.pools.items()}  # fmt: skip
        return attrs.evolve(taken, pools=pools)

    # -- scheduling ---------------------------------------------------------------------------

    @inlineCallbacks
    def _take(self) -> Generator[Deferred[Any], Any, None]:
        while True:
            ticket: Ticket = yield self._queue.next()
            if ticket.dropped:
                continue
            try:
                self._taken(ticket)
            except Exception:  # one request's fault must not leave those behind it unseen
                log.failure("swap manager could not take a request for {m}", m=ticket.instance)
                self._queue.waiting.remove(ticket)
                ticket.reject(errors.internal())
                self._arm_recheck(self._clock.seconds())  # any round it cut short, anew

    def _taken(self, ticket: Ticket) -> None:
        """A request enters the waiting room: admitted at once, or the policy decides."""
        waiting = self._queue.waiting
        waiting.add(ticket)
        slot = self._slots[ticket.instance]
        slot.linger.arrived(ticket.enqueued, slot.last_used, slot.ready)
        if not slot.ready:  # it waits, maybe for a model lingering on its host
            host = slot.config.host
            self._bets.waits(self.view(host), ticket.instance, self._on(host), ticket.enqueued)
        alone, free = len(waiting) == 1, slot.has_free_slot()
        arrival = policy.on_arrival(alone, slot.state.resident, slot.ready, free)
        if arrival is policy.Arrival.ADMIT:
            self._admit(ticket)
        elif arrival is policy.Arrival.DECIDE:
            self._dispatch()

    def view(self, host: str) -> policy.View:
        """The picture the policy decides on for ``host``."""
        now, changing = self._clock.seconds(), self._lanes[host].changing
        counted = self._memory.counted if self._memory is not None else None
        slots = self._on(host)
        return snapshot.policy_view(slots, self._queue, self.config, now, changing, host, counted)

    def _dispatch(self) -> None:
        """Ask the policy what to do and do it; re-entrant calls become one more round."""
        if self._dispatching:
            self._again = True
            return
        self._dispatching = True
        try:
            self._again = True
            while self._again and self.running:
                self._again = False
                self._round()
        finally:
            self._dispatching = False

    def _round(self) -> None:
        """One decision per host, then the one recheck timer and this box's read-ahead."""
        decisions = {each.host: self._decide(each) for each in list(self._lanes.values())}
        rechecks = [d.recheck_at for d in decisions.values() if d.recheck_at is not None]
        self._arm_recheck(min(rechecks, default=None))
        here = [h for h in decisions if self.config.hosts[h].docker.local]
        ahead = [decisions[h].prefetch for h in here if decisions[h].prefetch]
        if not any(self._lanes[h].changing for h in here):  # a load reads its own model ahead
            self._read_ahead(ahead[0] if ahead else None)

    def _decide(self, each: Lane) -> policy.Decision:
        """Ask the policy for one host: admit, and begin a change there."""
        decision = policy.decide(self.view(each.host))
        for seq in decision.admit:
            ticket = self._queue.waiting.get(seq)
            if ticket is not None:
                self._admit(ticket)
        change = decision.change
        if isinstance(change, policy.Load):
            wanted = partial(self._queue.waiting.count, change.instance)  # nonzero: still wanted
            each.begin(self._load, change.instance, Cause.REQUEST, wanted).addErrback(_logged)
        elif isinstance(change, policy.Unload):
            log.info("model {model}: idle for its ttl, unloading", model=change.instance)
            each.begin(self._unload, [change.instance], Cause.TTL).addErrback(_logged)
        return decision

    def _read_ahead(self, model: str | None) -> None:
        if self._prefetch is not None and self._prefetch.reading != model:  # cheap when idle
            self._prefetch.want(model, [n for n, s in self._slots.items() if s.resident])

    def _admit(self, ticket: Ticket) -> None:
        self._queue.waiting.remove(ticket)
        if ticket.dropped:
            return
        now = self._clock.seconds()
        self._bets.admitted(self._slots[ticket.instance], now)
        lease = Lease.granted(ticket, self._slots[ticket.instance], now, self._on_release)
        if self.bus.wants(RequestAdmitted):
            self.bus.publish(RequestAdmitted(now, ticket.seq, ticket.instance, lease.waited))
        self._queue.admit(ticket, lease)

    def _released(self, lease: Lease) -> None:
        self._queue.returned(lease)
        lease.slot.released()
        lease.slot.answered_after = self._queue.entered
        # Idle with requests for others waiting (not its own: those it serves next).
        waiting = self._queue.waiting
        if not lease.slot.in_flight and len(waiting) and not waiting.count(lease.instance):
            host = lease.slot.config.host
            others = [n for n in waiting.models() if self._slots[n].config.host == host]
            if others:
                self._bets.idle(lease.slot, self.view(host), others, self._clock.seconds())
        # With nothing waiting, only an idle TTL can call for action.
        if len(self._queue.waiting) or any(s.ttl is not None for s in self._slots.values()):
            self._dispatch()

    def _arm_recheck(self, when: float | None) -> None:
        if self._recheck is not None and self._recheck.active():
            self._recheck.cancel()
        self._recheck = None
        if when is not None:
            delay = max(0.0, when - self._clock.seconds())
            self._recheck = self._clock.callLater(delay, self._dispatch)

    @inlineCallbacks
    def _admin(
        self, names: list[str], change: Callable[[], Deferred[Any]]
    ) -> Generator[Deferred[Any], Any, Any]:
        """Run an admin change once no other change is under way on ``names``' hosts."""
        lanes = list(dict.fromkeys(map(self._lane, names)))
        while (under_way := lane.idle(lanes)) is not None:
            yield under_way
        if not self.running:
            raise errors.shutting_down()
        return (yield lane.begin_everywhere(lanes, change, self._dispatch))

    def _crashed(self, slot: Slot) -> None:
        self.bus.publish(Swap(self._clock.seconds(), Cause.CRASH, None, (slot.name,), 0.0))
        self._dispatch()

    def _failed(self, failure: Failure, what: str) -> None:
        if not failure.check(CancelledError):
            log.failure("swap manager {what} crashed", failure, what=what)


def _logged(failure: Failure) -> None:
    """The end of a change nobody waits for: its lane logged it, its requests were answered."""
