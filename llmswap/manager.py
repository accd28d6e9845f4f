"""The swap manager: a bounded queue of requests, one worker, and a lock around every swap.

Requests enter a bounded :class:`DeferredQueue` as tickets.  One worker takes them in arrival
order, makes sure the ticket's model is the one loaded (the swap routine, run under a
:class:`DeferredLock` that also guards shutdown), and hands the request a :class:`Lease` on the
backend.  The worker takes the next ticket only after the lease is released, i.e. after the last
byte of the response was relayed: that is how a stream can never overlap the next model's load.

A swap stops every other running backend and waits until each is confirmed gone before it starts
the next one; with one GPU, "stopped" must mean "memory freed", not "signal sent".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    DeferredQueue,
    QueueOverflow,
    inlineCallbacks,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmswap import errors
from llmswap.config import Config
from llmswap.health import BackendDied, wait_healthy
from llmswap.interfaces import IBackend

log = Logger()

STOPPED = "stopped"
STARTING = "starting"
READY = "ready"
STOPPING = "stopping"
FAILED = "failed"


@attrs.define(eq=False)
class ModelStatus:
    state: str = STOPPED
    error: str | None = None
    since: float = 0.0
    last_load_seconds: float | None = None


@attrs.define(eq=False)
class Lease:
    """The right to send one request to a ready backend; release it after the last byte."""

    model: str
    backend_url: str
    waited: float
    _done: Deferred[None] = attrs.field(factory=Deferred)

    def release(self) -> None:
        if not self._done.called:
            self._done.callback(None)


@attrs.define(eq=False)
class _Ticket:
    model: str
    enqueued: float
    waiter: Deferred[Lease]
    dropped: bool = False


class SwapManager(Service):
    """Owns the backends; at most one of them runs at any moment."""

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
        self._queue: DeferredQueue[_Ticket] = DeferredQueue(size=config.queue_size, backlog=1)
        self._lock = DeferredLock()
        self._current: str | None = None
        self._in_flight: Lease | None = None
        self._serving: _Ticket | None = None
        self._status = {name: ModelStatus(since=clock.seconds()) for name in backends}
        self._worker: Deferred[None] | None = None
        for name, backend in self._backends.items():
            backend.on_exit(self._exit_handler(name))

    # -- Service ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Reconciliation holds the lock, so the worker's first swap waits for it.
        self._lock.run(self._reconcile).addErrback(
            lambda f: log.failure("start-up reconciliation failed", f)
        )
        self._worker = self._work()
        self._worker.addErrback(self._worker_crashed)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        while self._queue.pending:
            self._reject(self._queue.pending.pop(0), errors.shutting_down())
        if self._serving is not None:
            self._reject(self._serving, errors.shutting_down())
        if self._worker is not None:
            self._worker.cancel()
        if self._in_flight is not None:
            self._in_flight.release()
        d: Deferred[None] = self._lock.run(self._stop_all)
        return d

    # -- what the resource tree uses ----------------------------------------------------------

    def acquire(self, model: str) -> Deferred[Lease]:
        """Queue a request for ``model``; fires with a Lease once its backend is ready.

        Cancelling the Deferred (the client went away) drops the ticket before it can cause a
        swap.  Raises APIError at once when the queue is full.
        """
        if not self.running:
            raise errors.shutting_down()
        waiter: Deferred[Lease] = Deferred(lambda _: self._drop(ticket))
        ticket = _Ticket(model, self._clock.seconds(), waiter)
        try:
            self._queue.put(ticket)
        except QueueOverflow:
            raise errors.queue_full(self.config.queue_size) from None
        timeout = self.config.request_timeout

        def timed_out(result: Any, _timeout: float) -> Any:
            raise errors.gateway_timeout(
                f"Request for model '{model}' waited {timeout:g} s (request_timeout) for its "
                "backend and was dropped",
                code="queue_timeout",
            )

        waiter.addTimeout(timeout, self._clock, onTimeoutCancel=timed_out)
        return waiter

    def health(self) -> dict[str, Any]:
        loaded = self._current if self._current and self._state(self._current) == READY else None
        starting = [n for n, s in self._status.items() if s.state == STARTING]
        if starting:
            message = f"Loading model {starting[0]}"
        elif loaded:
            message = f"Model {loaded} is loaded"
        else:
            message = "No model loaded"
        return {
            "status": "ok" if self.running else "stopping",
            "current_model": loaded,
            "queue_size": len(self._queue.pending),
            "queue_capacity": self.config.queue_size,
            "in_flight": 1 if self._in_flight is not None else 0,
            "message": message,
            "models": {
                name: {
                    "state": st.state,
                    "error": st.error,
                    "last_load_seconds": st.last_load_seconds,
                    "waiting": sum(1 for t in self._queue.pending if t.model == name),
                    **self._backends[name].describe(),
                }
                for name, st in self._status.items()
            },
        }

    def models(self) -> list[str]:
        return list(self._backends)

    # -- the worker -------------------------------------------------------------------------

    @inlineCallbacks
    def _work(self) -> Any:
        while True:
            ticket: _Ticket = yield self._queue.get()
            if ticket.dropped:
                continue
            self._serving = ticket
            try:
                yield self._lock.run(self._ensure, ticket.model)
            except CancelledError:
                raise
            except Exception as e:
                err = self._as_api_error(ticket.model, e)
                self._reject(ticket, err)
                for other in [t for t in self._queue.pending if t.model == ticket.model]:
                    self._queue.pending.remove(other)
                    self._reject(other, err)
                continue
            finally:
                self._serving = None
            if ticket.dropped:
                continue
            lease = Lease(
                ticket.model,
                self._backend_url(ticket.model),
                self._clock.seconds() - ticket.enqueued,
            )
            self._in_flight = lease
            ticket.waiter.callback(lease)
            try:
                yield lease._done
            finally:
                self._in_flight = None

    def _worker_crashed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            log.failure("swap worker crashed", failure)

    def _backend_url(self, model: str) -> str:
        return self.config.models[model].backend_url

    @inlineCallbacks
    def _ensure(self, model: str) -> Any:
        """The swap routine (always under the lock): make ``model`` the one ready backend."""
        backend = self._backends[model]
        status = self._status[model]
        if self._current == model and status.state == READY and backend.alive():
            return None
        previous = self._current
        started = self._clock.seconds()
        for name, other in self._backends.items():
            if other.alive() or self._status[name].state in (STARTING, READY):
                yield self._stop(name)
        self._current = None
        stopped = self._clock.seconds()
        self._set(model, STARTING)
        cfg = self.config.models[model]
        try:
            yield backend.start()
            self._current = model
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
            self._current = None
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
        loaded = self._clock.seconds()
        status.last_load_seconds = round(loaded - stopped, 3)
        self._set(model, READY)
        log.info(
            "swap {previous} -> {model}: stop {stop:.2f} s, load {load:.2f} s",
            previous=previous or "(none)",
            model=model,
            stop=stopped - started,
            load=loaded - stopped,
        )
        return None

    @inlineCallbacks
    def _stop(self, name: str) -> Any:
        self._set(name, STOPPING)
        yield self._backends[name].stop()
        self._set(name, STOPPED)
        if self._current == name:
            self._current = None

    @inlineCallbacks
    def _stop_all(self) -> Any:
        for name, backend in self._backends.items():
            try:
                yield backend.shutdown()
            except Exception as e:
                log.error("model {model}: stop failed: {e}", model=name, e=e)
        self._current = None

    @inlineCallbacks
    def _reconcile(self) -> Any:
        """Restore the one-model guarantee over backends left running by an earlier daemon.

        Keep (adopt) the first running one that is healthy right now; stop all the others.
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
        keep = None
        for name in running:
            url = self.config.models[name].health_url
            if keep is None and (yield self._healthy_now(url)):
                keep = name
        for name in running:
            if name != keep:
                log.info("start-up: stopping {model}", model=name)
                yield self._stop(name)
        if keep is not None:
            self._current = keep
            self._set(keep, READY)
            log.info("start-up: adopted {model} as the loaded model", model=keep)
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

    def _state(self, model: str) -> str:
        return self._status[model].state

    def _set(self, model: str, state: str, error: str | None = None) -> None:
        st = self._status[model]
        st.state, st.error, st.since = state, error, self._clock.seconds()

    def _exit_handler(self, model: str) -> Callable[[str], None]:
        def exited(reason: str) -> None:
            """A backend died on its own: report it; the next request for it restarts it."""
            if self._current == model:
                self._current = None
            if self._state(model) != STARTING:
                self._set(model, FAILED, f"backend {self._backends[model].failure_detail()}")

        return exited

    def _as_api_error(self, model: str, e: BaseException) -> errors.APIError:
        if isinstance(e, errors.APIError):
            return e
        if isinstance(e, BackendDied):
            return errors.backend_unavailable(
                f"Model '{model}' exited while loading: {self._backends[model].failure_detail()}"
            )
        return errors.backend_unavailable(f"Model '{model}' could not be started: {e}")

    def _drop(self, ticket: _Ticket) -> None:
        ticket.dropped = True
        if ticket in self._queue.pending:
            self._queue.pending.remove(ticket)

    @staticmethod
    def _reject(ticket: _Ticket, err: errors.APIError) -> None:
        ticket.dropped = True
        if not ticket.waiter.called:
            ticket.waiter.errback(err)
