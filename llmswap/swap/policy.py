"""The scheduling policy: which waiting request runs next, which model to load, which to evict.

A pure function of a snapshot (:class:`View`) to a :class:`Decision`.  It reads no clock and does
no I/O, so every rule is tested table-driven and by property tests, and the swap manager only
carries decisions out.  A load of a large model costs minutes, so the policy's job is to load
rarely without letting any request wait unboundedly:

- ``fifo`` (the original proxy): requests run strictly in arrival order; a request for another
  model swaps at once.
- ``swap-aware``: while a model is loaded its waiting requests go first (priority, then age).  The
  scheduler switches when none wait for it or run on it any more (nor finished within ``linger``
  seconds), or when a request for another model has
  waited ``max_wait_before_swap`` and the loaded model has served its batch (the requests that
  waited through its load: evicting it before would pay a load for one request, and under
  overload that degenerates into fifo's swap per request).  Overdue requests are served oldest
  first whatever their priority, which is what bounds every wait: at most the bound, plus one
  batch and one load per model.

Memory is accounted per device: a model occupies ``memory`` on its ``device`` from the moment its
load starts until it is stopped or confirmed asleep; asleep, it occupies its ``sleep_memory`` on
its ``sleep_device`` (host memory) instead.  Without declared devices every model fills the one
implicit device, i.e. exactly one model at a time.

``linger`` is bounded per model by its last load time (the ski-rental bound): waiting for a
follow-up that may never come is worth at most what the wait saves, the model's reload, so a
model that wakes in 0.3 s is not kept 2 s for a request that could have paid the 0.3 s.  And a
model lingers only while lingering has paid lately (:mod:`llmswap.swap.linger`): a lone user
switching models never sends the follow-up, and soon nobody waits for it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

import attrs

from llmswap.config.settings import FIFO, SWAP_AWARE
from llmswap.swap.linger import PAYS, UNTRIED, window


@attrs.frozen
class Waiting:
    """A request waiting for its model; ``seq`` is its arrival number."""

    seq: int
    instance: str
    enqueued: float
    priority: int = 0
    client: str | None = None  # who asks, when the request says


@attrs.frozen
class ModelView:
    name: str
    # Occupies device memory: loading, loaded, or being drained/stopped.
    resident: bool = False
    # Loaded, healthy and not being evicted: may take requests.
    ready: bool = False
    in_flight: int = 0
    concurrency: int = 1
    last_used: float = 0.0
    # When it became ready: requests enqueued before then are its batch.
    ready_since: float = 0.0
    device: str = "default"
    memory: float = 1.0
    max_wait: float = 60.0
    ttl: float | None = None
    # Asleep: off ``device``, holding ``sleep_memory`` on ``sleep_device`` (None: uncounted).
    asleep: bool = False
    sleep_device: str | None = None
    sleep_memory: float = 0.0
    # Seconds its last load (or wake) took; None: never loaded.
    load_seconds: float | None = None
    # How often its lingering paid lately (:mod:`llmswap.swap.linger`); below PAYS it does not.
    linger_payoff: float = 1.0
    # Who sent its last request, when the request said.
    last_client: str | None = None
    # Its bets lately (faded); below UNTRIED its linger rests on the prior alone.
    linger_evidence: float = 1.0
    # How long its follow-ups have taken to come, with room (None: not known yet).
    linger_wait: float | None = None
    # The last request that entered the queue before its last answer went out: those after it
    # were sent after that answer.
    answered_after: int = -1

    def footprint(self, asleep: bool) -> tuple[str, float] | None:
        """The device and memory it occupies awake, or asleep (None: nothing counted)."""
        if asleep:
            return None if self.sleep_device is None else (self.sleep_device, self.sleep_memory)
        return self.device, self.memory

    def holds(self) -> tuple[str, float] | None:
        """The device and memory it occupies now."""
        if self.asleep:
            return self.footprint(asleep=True)
        return self.footprint(asleep=False) if self.resident else None

    def lingers(self, now: float, linger: float, bounded: bool) -> float | None:
        """Until when it stays preferred after its last request; None: not lingering (nor
        when lingering has not paid lately)."""
        if self.linger_payoff < PAYS:
            return None
        until = self.last_used + window(linger, bounded, self.load_seconds, self.linger_wait)
        return until if self.ready and now < until else None


@attrs.frozen
class View:
    now: float
    instances: Mapping[str, ModelView]
    waiting: Sequence[Waiting]
    devices: Mapping[str, float] = attrs.field(factory=lambda: {"default": 1.0})
    policy: str = SWAP_AWARE
    # A load or unload is under way: no other may start until it ends.
    changing: bool = False
    # Seconds a model that just finished a request stays as busy as one that runs requests: a
    # client's follow-up request comes a moment after its answer, and must not find its model
    # evicted for a request that could well have waited.
    linger: float = 0.0
    # ``linger`` at most the model's last load time (see the module's docstring).
    linger_bound: bool = True


@attrs.frozen
class Load:
    instance: str
    evict: tuple[str, ...] = ()


@attrs.frozen
class Unload:
    instance: str


@attrs.frozen
class Decision:
    admit: tuple[int, ...] = ()
    change: Load | Unload | None = None
    # When to decide again even if nothing happens (a wait bound or an idle TTL expires).
    recheck_at: float | None = None
    # The model to load next once what blocks it is done: its weights may be read ahead.
    prefetch: str | None = None


def decide(view: View) -> Decision:
    if view.policy == FIFO:
        return _fifo(view)
    return _swap_aware(view)


class Arrival(enum.Enum):
    """What one request's arrival calls for, known without building a :class:`View`."""

    ADMIT = "admit"  # alone, for a ready instance with room: every policy admits it
    WAIT = "wait"  # its instance is loading, or busy at its concurrency: no decision changes
    DECIDE = "decide"  # anything else: ask :func:`decide`


def on_arrival(alone: bool, resident: bool, ready: bool, free_slot: bool) -> Arrival:
    """The hot path: most requests find their model loaded and idle, and need no decision."""
    if alone and ready and free_slot:
        return Arrival.ADMIT
    if resident and not (ready and free_slot):
        return Arrival.WAIT
    return Arrival.DECIDE


def plan_eviction(
    view: View, target: str, busy: frozenset[str] = frozenset(), asleep: bool = False
) -> tuple[str, ...]:
    """Which models to evict so ``target`` fits on its device (``asleep``: so it may sleep on
    its sleep device; evicting a sleeper there means stopping it for real).

    Least recently used first, idle models (not in ``busy``) before busy ones.  Config validation
    guarantees a model fits its device on its own, so a plan always exists.
    """
    need = view.instances[target].footprint(asleep)
    if need is None:
        return ()
    device, memory = need
    occupants = [
        (m, where[1])
        for m in view.instances.values()
        if m.name != target and (where := m.holds()) is not None and where[0] == device
    ]
    used = sum(held for _, held in occupants)
    evict: list[str] = []
    for m, held in sorted(occupants, key=lambda o: (o[0].name in busy, o[0].last_used, o[0].name)):
        if used + memory <= view.devices[device]:
            break
        evict.append(m.name)
        used -= held
    return tuple(evict)


def place(options: Sequence[tuple[str, View]]) -> str:
    """Where a model that may run on several hosts takes a request, given each instance and its
    host's view: where it is loaded (ready first), else where requests wait for it already,
    else where loading it evicts least (fewest busy models, then fewest models, then a host
    with no change under way); the first listed on a tie."""

    def cost(option: tuple[str, View]) -> tuple[bool, bool, bool, int, int, bool]:
        name, view = option
        m = view.instances[name]
        waited = {w.instance for w in view.waiting}
        busy = frozenset(n for n, o in view.instances.items() if o.in_flight) | waited
        evict = plan_eviction(view, name, busy)
        crowded = sum(e in busy for e in evict)
        return (not m.ready, not m.resident, name not in waited, crowded, len(evict), view.changing)

    return min(options, key=cost)[0]


def _free_slots(view: View) -> dict[str, int]:
    return {
        name: (m.concurrency - m.in_flight if m.ready else 0) for name, m in view.instances.items()
    }


def _fifo(view: View) -> Decision:
    free = _free_slots(view)
    admit: list[int] = []
    change: Load | None = None
    for w in sorted(view.waiting, key=lambda w: w.seq):
        if free[w.instance] > 0:
            admit.append(w.seq)
            free[w.instance] -= 1
            continue
        if not view.instances[w.instance].resident and not view.changing:
            change = Load(w.instance, plan_eviction(view, w.instance))
        break  # strict arrival order: nobody overtakes the head
    if change is None and not view.waiting:
        return _idle_unload(view, tuple(admit), frozenset())
    head = min(view.waiting, key=lambda w: w.seq, default=None)
    later = None
    if head is not None and change is None and not view.instances[head.instance].resident:
        later = head.instance  # a change under way delays its load
    return Decision(tuple(admit), change, prefetch=later)


def _swap_aware(view: View) -> Decision:
    def overdue(w: Waiting) -> bool:
        return view.now - w.enqueued >= view.instances[w.instance].max_wait

    def urgency(w: Waiting) -> tuple[float, ...]:
        # Overdue requests by age alone (the starvation bound); the rest by priority, then age.
        if overdue(w):
            return (0, w.enqueued, w.seq)
        return (1, -w.priority, w.enqueued, w.seq)

    free = _free_slots(view)
    admit: list[int] = []
    remaining: dict[str, list[Waiting]] = {}
    for w in sorted(view.waiting, key=urgency):
        if free[w.instance] > 0:
            admit.append(w.seq)
            free[w.instance] -= 1
        else:
            remaining.setdefault(w.instance, []).append(w)
    if not remaining:
        return _idle_unload(view, tuple(admit), frozenset(w.instance for w in view.waiting))
    if view.changing:
        return Decision(tuple(admit))

    def batch_pending(name: str) -> bool:
        since = view.instances[name].ready_since
        return any(w.enqueued <= since for w in remaining.get(name, ()))

    # A model still running requests is only evicted for an overdue request: until then more
    # requests for it may arrive and be served without paying for two loads.
    # A model whose last request came from the one client that every request waiting for
    # another model comes from, each sent after that last request, has no follow-up coming:
    # that user moved on (one still sending to both keeps it).  Where nobody says who they
    # are, the same pattern (every contender sent after the last answer) is the user who left,
    # as far as anyone can tell, until the model's bets say otherwise (its linger untried).
    asked = [w for ws in remaining.values() for w in ws]

    def moved_on(m: ModelView) -> bool:
        who = m.last_client
        if who is not None:
            return all(w.client == who and w.enqueued >= m.last_used for w in asked)
        return (m.linger_evidence < UNTRIED and bool(asked)
                and all(w.client is None and w.seq > m.answered_after for w in asked))  # fmt: skip

    lingering = {
        n: until
        for n, m in view.instances.items()
        if (until := m.lingers(view.now, view.linger, view.linger_bound)) is not None
        and not moved_on(m)
    }
    busy = (
        frozenset(remaining)
        | {n for n, m in view.instances.items() if m.in_flight}
        | {w.instance for w in view.waiting if w.seq in admit}
        | set(lingering)
    )
    recheck = min(lingering.values(), default=None)
    candidates = [ws[0] for name, ws in remaining.items() if not view.instances[name].resident]
    blocked: str | None = None
    for w in sorted(candidates, key=urgency):
        evict = plan_eviction(view, w.instance, busy)
        blockers = [e for e in evict if e in busy]
        if not blockers or (overdue(w) and not any(batch_pending(e) for e in blockers)):
            return Decision(tuple(admit), Load(w.instance, evict))
        blocked = blocked or w.instance
        if not overdue(w):  # an overdue one waits for a batch to finish: releases wake us
            due = w.enqueued + view.instances[w.instance].max_wait
            recheck = due if recheck is None else min(recheck, due)
    return Decision(tuple(admit), None, recheck, blocked)


def _idle_unload(view: View, admit: tuple[int, ...], admitted: frozenset[str]) -> Decision:
    """Nothing waits: unload a model idle for its ``ttl``, or say when to look again."""
    if view.changing:
        return Decision(admit)
    recheck: float | None = None
    for m in sorted(view.instances.values(), key=lambda m: m.last_used):
        if m.ttl is None or not m.ready or m.in_flight or m.name in admitted:
            continue
        due = m.last_used + m.ttl
        if view.now >= due:
            return Decision(admit, Unload(m.name))
        recheck = due if recheck is None else min(recheck, due)
    return Decision(admit, None, recheck)
