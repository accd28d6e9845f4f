"""The swap manager: a bounded queue of requests, a scheduling policy, and a lock around swaps.

Requests enter a bounded :class:`DeferredQueue` as tickets; an intake loop moves them to the
waiting set, and after every event (arrival, release, load finished, a wait bound or TTL expiring)
the manager asks :func:`llmswap.scheduler.decide` what to do: which waiting tickets get a
:class:`Lease` on a ready backend, and which model to load or unload.  Loads and unloads run one
at a time under a :class:`DeferredLock` that also guards shutdown.

A lease is held until the last byte of the response was relayed, so a stream never overlaps a
load that needs its memory: an evicted model first drains (no new admissions, in-flight requests
finish within ``drain_timeout``), then is stopped and confirmed gone ("stopped" must mean "memory
freed", not "signal sent"), and only then does the next model start.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    DeferredQueue,
    TimeoutError,
    inlineCallbacks,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmswap import errors, scheduler
from llmswap.config import Config
from llmswap.health import BackendDied, wait_healthy
from llmswap.interfaces import IBackend

if TYPE_CHECKING:
    from llmswap.metrics import Metrics

log = Logger()

# /health lists this many waiting requests (the counts per model cover all of them).
_QUEUE_SHOWN = 100

STOPPED = "stopped"
STARTING = "starting"
READY = "ready"
DRAINING = "draining"
STOPPING = "stopping"
FAILED = "failed"
_RESIDENT = (STARTING, READY, DRAINING, STOPPING)


@attrs.define(eq=False)
class ModelStatus:
    state: str = STOPPED
    error: str | None = None
    since: float = 0.0
    last_load_seconds: float | None = None
    in_flight: int = 0
    last_used: float = 0.0
    idle: list[Deferred[None]] = attrs.field(factory=list)


@attrs.define(eq=False)
class Lease:
    """The right to send one request to a ready backend; release it after the last byte."""

    model: str
    backend_url: str
    waited: float
    position: int
    _on_release: Callable[[Lease, ModelStatus], None] | None = None
    # The status it counts against: a reload may replace the model's entry meanwhile.
    _status: ModelStatus | None = None

    def release(self) -> None:
        callback, self._on_release = self._on_release, None
        if callback is not None and self._status is not None:
            callback(self, self._status)


@attrs.define(eq=False)
class _Ticket:
    seq: int
    model: str
    enqueued: float
    priority: int
    position: int
    # Called when the waiter is cancelled (the client went away): the manager's one bound
    # method, so a waiting request holds no closure of its own.
    on_cancel: Callable[[_Ticket], None]
    waiter: Deferred[Lease] = attrs.field(init=False)
    dropped: bool = False

    def __attrs_post_init__(self) -> None:
        self.waiter = Deferred(self._cancelled)

    def _cancelled(self, _: Deferred[Lease]) -> None:
        self.on_cancel(self)


class _WaitingRoom:
    """Waiting tickets in arrival order, overall and per model: O(1) to add and remove.

    The policy never needs all of them: per model, the oldest few and the few of highest
    priority decide everything it does (see :meth:`sample`), so a decision costs the same with
    ten thousand waiting requests as with ten.
    """

    def __init__(self) -> None:
        self._all: dict[int, _Ticket] = {}
        self._per: dict[str, dict[int, _Ticket]] = {}
        self._priorities: dict[str, Counter[int]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[_Ticket]:
        return iter(list(self._all.values()))

    def add(self, ticket: _Ticket) -> None:
        self._all[ticket.seq] = ticket
        self._per.setdefault(ticket.model, {})[ticket.seq] = ticket
        self._priorities.setdefault(ticket.model, Counter())[ticket.priority] += 1

    def remove(self, ticket: _Ticket) -> bool:
        if self._all.pop(ticket.seq, None) is None:
            return False
        del self._per[ticket.model][ticket.seq]
        priorities = self._priorities[ticket.model]
        priorities[ticket.priority] -= 1
        if not priorities[ticket.priority]:
            del priorities[ticket.priority]
        return True

    def oldest(self) -> _Ticket | None:
        return next(iter(self._all.values()), None)

    def get(self, seq: int) -> _Ticket | None:
        return self._all.get(seq)

    def count(self, model: str) -> int:
        return len(self._per.get(model, ()))

    def take(self, model: str) -> list[_Ticket]:
        tickets = list(self._per.get(model, {}).values())
        for ticket in tickets:
            self.remove(ticket)
        return tickets

    def models(self) -> list[str]:
        return [model for model, tickets in self._per.items() if tickets]

    def sample(self, model: str, n: int) -> list[_Ticket]:
        """The ``n`` oldest and the ``n`` most urgent by priority: what the policy can use when
        the model has ``n - 1`` free slots (it admits at most that many, by age or priority,
        and looks at the best of the rest)."""
        tickets = self._per.get(model, {})
        chosen = {t.seq: t for t in itertools.islice(tickets.values(), n)}
        if len(self._priorities.get(model, ())) > 1:
            urgent = heapq.nsmallest(
                n, tickets.values(), key=lambda t: (-t.priority, t.enqueued, t.seq)
            )
            chosen.update((t.seq, t) for t in urgent)
        return list(chosen.values())


class SwapManager(Service):
    """Owns the backends and decides which of them run; never more than the budget allows."""

    name = "swap-manager"

    def __init__(
        self,
        config: Config,
        backends: Mapping[str, IBackend],
        http: Any,
        clock: IReactorTime,
    ) -> None:
        self.config = config
        self._backends = dict(backends)
        self._http = http
        self._clock = clock
        # The intake: bounded by acquire, which counts it together with the waiting room (the
        # intake loop empties it at once), so the bound follows queue_size across reloads.
        self._queue: DeferredQueue[_Ticket] = DeferredQueue(backlog=1)
        self._waiting = _WaitingRoom()
        self._lock = DeferredLock()
        self._seq = itertools.count()
        self._leases: set[Lease] = set()
        self._status = {name: ModelStatus(since=clock.seconds()) for name in backends}
        self._intake: Deferred[None] | None = None
        # The load or unload under way (the policy starts no other meanwhile).
        self._change: Deferred[None] | None = None
        self._changing = False
        self._dispatching = False
        self._again = False
        self._recheck: IDelayedCall | None = None
        self._drop_cancelled = self._drop  # bound once: every ticket shares it
        # Fires when the oldest waiting request reaches request_timeout (see _expire).
        self._expiry: IDelayedCall | None = None
        self.metrics: Metrics | None = None
        for name, backend in self._backends.items():
            backend.on_exit(self._exit_handler(name))

    # -- Service ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Reconciliation and preload run as the first change: nothing loads before they end.
        self._begin("start-up", self._start_up).addErrback(lambda _: None)
        self._intake = self._take()
        self._intake.addErrback(self._crashed, "intake")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for ticket in [*self._waiting, *self._queue.pending]:
            self._reject(ticket, errors.shutting_down())
        self._waiting = _WaitingRoom()
        self._queue.pending.clear()
        if self._intake is not None:
            self._intake.cancel()
        for timer in (self._recheck, self._expiry):
            if timer is not None and timer.active():
                timer.cancel()
        if self._change is not None:
            self._change.cancel()
        for lease in list(self._leases):
            lease.release()
        d: Deferred[None] = self._lock.run(self._stop_all)
        return d

    # -- what the resource tree uses ----------------------------------------------------------

    def acquire(self, model: str, priority: int = 0) -> Deferred[Lease]:
        """Queue a request for ``model``; fires with a Lease once its backend may take it.

        Cancelling the Deferred (the client went away) drops the ticket before it can cause a
        swap.  Raises APIError at once when the queue is full.
        """
        if not self.running:
            raise errors.shutting_down()
        waiting = len(self._waiting) + len(self._queue.pending)
        if waiting >= self.config.queue_size:
            raise errors.queue_full(self.config.queue_size)
        seq, now = next(self._seq), self._clock.seconds()
        ticket = _Ticket(seq, model, now, priority, waiting + 1, self._drop_cancelled)
        waiter = ticket.waiter
        self._queue.put(ticket)
        # Admitted at once (the common case) needs no timer; a waiting one is watched by the
        # one timer that serves every waiting request.
        if not waiter.called and self._expiry is None:
            self._expiry = self._clock.callLater(self.config.request_timeout, self._expire)
        return waiter

    def state(self, model: str) -> str:
        return self._status[model].state

    def load(self, model: str) -> Deferred[None]:
        """Admin: load ``model`` now (evicting what it needs room from, after draining)."""
        return self._admin(lambda: self._load(model))

    def unload(self, model: str | None = None) -> Deferred[None]:
        """Admin: drain and stop ``model``, or every model when None."""
        names = [model] if model is not None else list(self._backends)
        return self._admin(lambda: self._unload(*names))

    def reconfigure(self, config: Config, fresh: Mapping[str, IBackend]) -> Deferred[Any]:
        """Apply a reloaded configuration; ``fresh`` has backends for added and changed models.

        Removed and changed models that are loaded drain first (in-flight requests finish),
        then stop; requests waiting for a removed model get 404.  Fires with what changed.
        """
        return self._admin(lambda: self._reconfigure(config, fresh))

    def health(self) -> dict[str, Any]:
        now = self._clock.seconds()
        ready = [n for n, s in self._status.items() if s.state == READY]
        loaded = max(ready, key=lambda n: self._status[n].last_used) if ready else None
        starting = [n for n, s in self._status.items() if s.state == STARTING]
        if starting:
            message = f"Loading model {starting[0]}"
        elif loaded:
            message = f"Model {', '.join(ready)} loaded"
        else:
            message = "No model loaded"
        waiting = [*self._waiting, *self._queue.pending]
        return {
            "status": "ok" if self.running else "stopping",
            "current_model": loaded,
            "loaded_models": ready,
            "queue_size": len(waiting),
            "queue_capacity": self.config.queue_size,
            "in_flight": len(self._leases),
            "scheduler": self.config.scheduler,
            "message": message,
            "queue": [
                {"model": t.model, "age": round(now - t.enqueued, 3), "priority": t.priority}
                for t in sorted(waiting, key=lambda t: t.seq)[:_QUEUE_SHOWN]
            ],
            "models": {
                name: {
                    "state": st.state,
                    "error": st.error,
                    "last_load_seconds": st.last_load_seconds,
                    "waiting": self._waiting.count(name)
                    + sum(1 for t in self._queue.pending if t.model == name),
                    "in_flight": st.in_flight,
                    **self._backends[name].describe(),
                }
                for name, st in self._status.items()
            },
        }

    def models(self) -> list[str]:
        return list(self._backends)

    @property
    def backends(self) -> Mapping[str, IBackend]:
        return self._backends

    # -- scheduling ---------------------------------------------------------------------------

    @inlineCallbacks
    def _take(self) -> Any:
        while True:
            ticket: _Ticket = yield self._queue.get()
            if ticket.dropped:
                continue
            self._waiting.add(ticket)
            st = self._status[ticket.model]
            full = st.in_flight >= self.config.models[ticket.model].concurrency
            if len(self._waiting) == 1 and st.state == READY and not full:
                # The hot path: nobody else waits and the model has a free slot; every policy
                # admits it, so the full decision is skipped.
                self._admit(ticket)
            elif st.state in _RESIDENT and (full or st.state != READY):
                # Its model is loaded and busy, or loading: a new waiter for it can neither be
                # admitted nor make anything load, so there is nothing to decide.
                pass
            else:
                self._dispatch()

    def view(self) -> scheduler.View:
        """The snapshot the policy decides on."""
        models = {}
        sampled: list[_Ticket] = []
        for name, st in self._status.items():
            cfg = self.config.models[name]
            device, memory = self.config.footprint(name)
            models[name] = scheduler.ModelView(
                name=name,
                resident=st.state in _RESIDENT or self._backends[name].alive(),
                ready=st.state == READY,
                in_flight=st.in_flight,
                concurrency=cfg.concurrency,
                last_used=st.last_used,
                ready_since=st.since if st.state == READY else 0.0,
                device=device,
                memory=memory,
                max_wait=cfg.max_wait_before_swap,
                ttl=cfg.ttl,
            )
            free = cfg.concurrency - st.in_flight if st.state == READY else 0
            sampled += self._waiting.sample(name, max(0, free) + 1)
        return scheduler.View(
            now=self._clock.seconds(),
            models=models,
            waiting=[scheduler.Waiting(t.seq, t.model, t.enqueued, t.priority) for t in sampled],
            devices=self.config.capacities(),
            policy=self.config.scheduler,
            changing=self._changing,
            linger=self.config.linger,
        )

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
                decision = scheduler.decide(self.view())
                for seq in decision.admit:
                    ticket = self._waiting.get(seq)
                    if ticket is not None:
                        self._admit(ticket)
                change = decision.change
                if isinstance(change, scheduler.Load):
                    wanted = self._wanted(change.model)
                    self._begin("load", self._load, change.model, wanted).addErrback(lambda _: None)
                elif isinstance(change, scheduler.Unload):
                    log.info("model {model}: idle for its ttl, unloading", model=change.model)
                    self._begin("unload", self._unload, change.model).addErrback(lambda _: None)
                self._arm_recheck(decision.recheck_at)
        finally:
            self._dispatching = False

    def _admit(self, ticket: _Ticket) -> None:
        self._waiting.remove(ticket)
        if ticket.dropped:
            return
        st = self._status[ticket.model]
        st.in_flight += 1
        lease = Lease(
            ticket.model,
            self.config.models[ticket.model].backend_url,
            self._clock.seconds() - ticket.enqueued,
            ticket.position,
            self._released,
            st,
        )
        self._leases.add(lease)
        ticket.waiter.callback(lease)

    def _released(self, lease: Lease, st: ModelStatus) -> None:
        self._leases.discard(lease)
        st.in_flight -= 1
        st.last_used = self._clock.seconds()
        if st.in_flight == 0:
            idle, st.idle = st.idle, []
            for d in idle:
                d.callback(None)
        # With nothing waiting, only an idle TTL can call for action.
        if len(self._waiting) or any(m.ttl is not None for m in self.config.models.values()):
            self._dispatch()

    def _begin(self, what: str, change: Callable[..., Deferred[Any]], *args: Any) -> Deferred[Any]:
        """Run a load or unload under the lock; the policy starts no other until it ends.

        The returned Deferred carries the change's outcome (an admin call reports it).
        """
        self._changing = True
        d: Deferred[Any] = self._lock.run(change, *args)
        self._change = d

        def ended(result: Any) -> Any:
            self._changing = False
            self._change = None
            if isinstance(result, Failure) and not result.check(CancelledError, errors.APIError):
                log.failure("{what} failed", result, what=what)
            self._dispatch()
            return result

        d.addBoth(ended)
        return d

    def _arm_recheck(self, when: float | None) -> None:
        if self._recheck is not None and self._recheck.active():
            self._recheck.cancel()
        self._recheck = None
        if when is not None:
            delay = max(0.0, when - self._clock.seconds())
            self._recheck = self._clock.callLater(delay, self._dispatch)

    def _expire(self) -> None:
        """Answer 504 to the requests that waited ``request_timeout``, and re-arm for the next.

        Waiting tickets are kept in arrival order and share one timeout, so the oldest expires
        first: one timer serves them all, where a timer per request would cost a delayed call
        and its closures for each of thousands of waiting requests.  A reload's new
        ``request_timeout`` applies to the requests already waiting.
        """
        self._expiry = None
        timeout = self.config.request_timeout
        now = self._clock.seconds()
        expired = False
        while (ticket := self._waiting.oldest()) is not None:
            deadline = ticket.enqueued + timeout
            if deadline > now:
                self._expiry = self._clock.callLater(deadline - now, self._expire)
                break
            self._waiting.remove(ticket)
            self._reject(
                ticket,
                errors.gateway_timeout(
                    f"Request for model '{ticket.model}' waited {timeout:g} s (request_timeout) "
                    "for its backend and was dropped",
                    code="queue_timeout",
                ),
            )
            expired = True
        if expired:
            self._dispatch()

    @inlineCallbacks
    def _admin(self, change: Callable[[], Deferred[Any]]) -> Any:
        """Run an admin change as soon as no other change is under way."""
        while self._changing:
            yield self._change_ended()
        if not self.running:
            raise errors.shutting_down()
        return (yield self._begin("admin change", change))

    def _wanted(self, model: str) -> Callable[[], bool]:
        return lambda: self._waiting.count(model) > 0

    def _change_ended(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        assert self._change is not None

        def ended(result: Any) -> Any:
            d.callback(None)
            return result

        self._change.addBoth(ended)
        return d

    # -- changes (always under the lock) ------------------------------------------------------

    @inlineCallbacks
    def _start_up(self) -> Any:
        yield self._reconcile()
        for model in self.config.preload:
            try:
                yield self._load(model)
            except errors.APIError as e:
                log.error("preload of {model} failed: {e}", model=model, e=e.message)

    @inlineCallbacks
    def _load(self, model: str, wanted: Callable[[], bool] | None = None) -> Any:
        """Make room for ``model`` (drain, then stop what it evicts) and load it.

        ``wanted`` is asked once the evicted models drained: when the requests that caused the
        load went away meanwhile, nothing is stopped (a client that left never causes a swap).
        """
        st = self._status[model]
        if st.state == READY and self._backends[model].alive():
            return None
        view = self.view()
        busy = frozenset(self._waiting.models()) | {
            n for n, s in self._status.items() if s.in_flight
        }
        evict = scheduler.plan_room(view, model, busy)
        started = self._clock.seconds()
        yield self._drain(*evict)
        if wanted is not None and not wanted():
            for name in evict:
                if self._status[name].state == DRAINING:
                    self._set(name, READY)
            log.info("load of {model} called off: no request waits for it", model=model)
            return None
        for name in evict:
            yield self._stop(name)
        # Anything still running that the budget does not count (a crashed model's leftover
        # process, a container started by hand) must go before a load.
        for name, backend in self._backends.items():
            if name != model and self._status[name].state not in _RESIDENT and backend.alive():
                yield self._stop(name)
        stopped = self._clock.seconds()
        try:
            yield self._start(model)
        except BaseException as e:
            if not isinstance(e, CancelledError):
                err = self._as_api_error(model, e)
                for ticket in self._waiting.take(model):
                    self._reject(ticket, err)
                raise err from None
            raise
        loaded = self._clock.seconds()
        st.last_load_seconds = round(loaded - stopped, 3)
        if self.metrics is not None:
            self.metrics.swapped(evict, model, loaded - stopped)
        log.info(
            "swap {evicted} -> {model}: stop {stop:.2f} s, load {load:.2f} s",
            model=model,
            evicted=", ".join(evict) or "(none)",
            stop=stopped - started,
            load=loaded - stopped,
        )
        return None

    @inlineCallbacks
    def _reconfigure(self, config: Config, fresh: Mapping[str, IBackend]) -> Any:
        old = self.config.models
        removed = [n for n in old if n not in config.models]
        changed = [n for n in old if n in config.models and config.models[n] != old[n]]
        added = [n for n in config.models if n not in old]
        yield self._unload(*removed, *changed)
        for name in removed:
            err = errors.model_not_found(name, list(config.models))
            for ticket in self._waiting.take(name):
                self._reject(ticket, err)
            del self._backends[name], self._status[name]
        for name in changed + added:
            self._backends[name] = fresh[name]
            fresh[name].on_exit(self._exit_handler(name))
            self._status[name] = ModelStatus(since=self._clock.seconds())
        self.config = config
        if self._expiry is not None:  # the new request_timeout applies to who waits now
            self._expiry.cancel()
            self._expire()
        summary = {"added": added, "removed": removed, "changed": changed}
        log.info(
            "configuration reloaded from {source}: added {added}, removed {removed}, "
            "changed {changed}",
            source=config.source,
            **{k: ", ".join(v) or "none" for k, v in summary.items()},
        )
        return summary

    @inlineCallbacks
    def _unload(self, *names: str) -> Any:
        yield self._drain(*(n for n in names if self._status[n].state in _RESIDENT))
        for name in names:
            if self._backends[name].alive():
                yield self._stop(name)

    @inlineCallbacks
    def _drain(self, *names: str) -> Any:
        """No new admissions for ``names``; wait (bounded) until their requests finished."""
        for name in names:
            if self._status[name].state == READY:
                self._set(name, DRAINING)
        for name in names:
            st = self._status[name]
            if st.in_flight:
                idle: Deferred[None] = Deferred()
                st.idle.append(idle)
                timeout = self.config.models[name].drain_timeout
                idle.addTimeout(timeout, self._clock)
                try:
                    yield idle
                except TimeoutError:
                    log.warn(
                        "model {model}: {n} request(s) still running after drain_timeout "
                        "({t:g} s); stopping it anyway",
                        model=name,
                        n=st.in_flight,
                        t=timeout,
                    )

    @inlineCallbacks
    def _start(self, model: str) -> Any:
        backend = self._backends[model]
        cfg = self.config.models[model]
        self._set(model, STARTING)
        try:
            yield backend.start()
            yield wait_healthy(
                self._clock,
                self._http,
                model,
                cfg.health_url,
                cfg.startup_timeout,
                self.config.health_interval,
                backend.alive,
            )
        except BaseException as e:
            if backend.alive():
                self._set(model, STOPPING)
                yield backend.stop()
            if isinstance(e, CancelledError):  # shutting down, not the backend's fault
                self._set(model, STOPPED)
                raise
            detail = self._as_api_error(model, e).message
            self._set(model, FAILED, detail)
            log.error("model {model}: failed to start: {detail}", model=model, detail=detail)
            raise
        self._status[model].last_used = self._clock.seconds()
        self._set(model, READY)

    @inlineCallbacks
    def _stop(self, name: str) -> Any:
        self._set(name, STOPPING)
        yield self._backends[name].stop()
        self._set(name, STOPPED)

    @inlineCallbacks
    def _stop_all(self) -> Any:
        for name, backend in self._backends.items():
            try:
                yield backend.shutdown()
            except Exception as e:
                log.error("model {model}: stop failed: {e}", model=name, e=e)

    @inlineCallbacks
    def _reconcile(self) -> Any:
        """Restore the memory budget over backends left running by an earlier daemon.

        Adopt running backends that answer healthy right now while they fit the budget (without
        declared devices: the first one); stop all the others.
        """
        running: list[str] = []
        for name, backend in self._backends.items():
            try:
                if (yield backend.adopt()):
                    running.append(name)
            except Exception as e:
                log.error("model {model}: cannot inspect at start-up: {e}", model=name, e=e)
        if not running:
            return None
        log.info("start-up: found running: {names}", names=", ".join(running))
        free = self.config.capacities()
        adopted = []
        for name in running:
            device, memory = self.config.footprint(name)
            url = self.config.models[name].health_url
            if memory <= free[device] and (yield self._healthy_now(url)):
                free[device] -= memory
                adopted.append(name)
            else:
                log.info("start-up: stopping {model}", model=name)
                yield self._stop(name)
        # Reported loaded only once the others are gone.
        for name in adopted:
            self._status[name].last_used = self._clock.seconds()
            self._set(name, READY)
            log.info("start-up: adopted {model} as loaded", model=name)
        return None

    @inlineCallbacks
    def _healthy_now(self, url: str) -> Any:
        try:
            d = self._http.get(url)
            d.addTimeout(5, self._clock)
            response = yield d
            yield response.collect(lambda _: None)
        except Exception:
            return False
        return 200 <= response.code < 300

    # -- bookkeeping --------------------------------------------------------------------------

    def _set(self, model: str, state: str, error: str | None = None) -> None:
        st = self._status[model]
        st.state, st.error, st.since = state, error, self._clock.seconds()

    def _exit_handler(self, model: str) -> Callable[[str], None]:
        def exited(reason: str) -> None:
            """A backend died on its own: report it; the next request for it restarts it."""
            if self._status[model].state in (READY, DRAINING):
                self._set(model, FAILED, f"backend {self._backends[model].failure_detail()}")
                self._dispatch()

        return exited

    def _as_api_error(self, model: str, e: BaseException) -> errors.APIError:
        if isinstance(e, errors.APIError):
            return e
        if isinstance(e, BackendDied):
            return errors.backend_unavailable(
                f"Model '{model}' exited while loading: {self._backends[model].failure_detail()}"
            )
        return errors.backend_unavailable(f"Model '{model}' could not be started: {e}")

    def _crashed(self, failure: Failure, what: str) -> None:
        if not failure.check(CancelledError):
            log.failure("swap manager {what} crashed", failure, what=what)

    def _drop(self, ticket: _Ticket) -> None:
        ticket.dropped = True
        if self._waiting.remove(ticket):
            return
        if ticket in self._queue.pending:
            self._queue.pending.remove(ticket)

    @staticmethod
    def _reject(ticket: _Ticket, err: errors.APIError) -> None:
        ticket.dropped = True
        if not ticket.waiter.called:
            ticket.waiter.errback(err)
