"""One model's backend life: start (or wake), wait until healthy, serve, drain, stop (or
sleep), crash.

A :class:`Slot` owns its model's state (as llama-swap's ``Process`` does) and is the only code
that changes it, through the transition table of :mod:`llmswap.swap.state`; every change is
published as a :class:`~llmswap.events.ModelStateChanged`.  Which slots run, and when, is the
manager's business: a slot never decides to start or stop by itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmswap import errors
from llmswap.config.model import ModelConfig
from llmswap.events import EventBus, ModelState, ModelStateChanged
from llmswap.interfaces import BackendHTTP, IBackend
from llmswap.swap import sleep
from llmswap.swap.linger import LingerRecord
from llmswap.swap.readiness import BackendDied, Readiness
from llmswap.swap.restarts import Restarts
from llmswap.swap.state import check

log = Logger()


class Slot:
    """The backend of one model, its state and the requests running on it."""

    def __init__(
        self,
        config: ModelConfig,
        backend: IBackend,
        clock: IReactorTime,
        bus: EventBus,
        on_crash: Callable[[Slot], None],
    ) -> None:
        self.config = config
        self.name = config.name
        self.backend = backend
        self._clock = clock
        self._bus = bus
        self._on_crash = on_crash
        self.state = ModelState.STOPPED
        self.error: str | None = None
        self.since = clock.seconds()
        self.last_load_seconds: float | None = None
        self.woke = False  # the last load woke the backend rather than started it
        self.in_flight = 0
        self.last_used = 0.0
        # An Ollama client's keep_alive: replaces the ttl until the backend is next stopped.
        self.keep_alive: float | None = None
        self._idle: list[Deferred[None]] = []
        self.restarts = Restarts()
        self.readiness = Readiness()
        self.linger = LingerRecord()
        self.last_client: str | None = None  # who asked last, when the request said
        self.answered_after = -1  # the queue's last request when its last answer went out
        self.served = 0  # requests finished since it last became ready
        backend.on_exit(self._exited)

    def set(self, state: ModelState, error: str | None = None) -> None:
        """Move to ``state``; raises IllegalTransition for a change the table forbids."""
        old = self.state
        check(self.name, old, state)
        self.state, self.error, self.since = state, error, self._clock.seconds()
        if self._bus.wants(ModelStateChanged):
            self._bus.publish(ModelStateChanged(self.since, self.name, old, state, error))

    def explain(self, error: str) -> None:
        """A failed model's reason, once the cause is known (a load out of memory)."""
        if self.state is ModelState.FAILED:
            self.error = error

    @property
    def resident(self) -> bool:
        """Holds (or may hold) device memory: what the budget must count."""
        if self.state is ModelState.ASLEEP:
            return False
        return self.state.resident or self.backend.alive()

    @property
    def asleep(self) -> bool:
        return self.state is ModelState.ASLEEP

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    @property
    def ttl(self) -> float | None:
        """Idle seconds before it is unloaded; None: never."""
        if self.config.remote is not None:  # always on: not llmswap's to unload
            return None
        if self.keep_alive is None:
            return self.config.ttl
        return None if math.isinf(self.keep_alive) else self.keep_alive

    def has_free_slot(self) -> bool:
        return self.in_flight < self.config.concurrency

    # -- requests -------------------------------------------------------------------------

    def leased(self) -> None:
        self.in_flight += 1

    def released(self) -> None:
        self.in_flight -= 1
        self.served += 1
        self.last_used = self._clock.seconds()
        if self.in_flight == 0:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    # -- life -----------------------------------------------------------------------------

    @inlineCallbacks
    def start(
        self, http: BackendHTTP, health_interval: float
    ) -> Generator[Deferred[Any], Any, None]:
        """Launch (or wake) the backend and wait until it answers healthy; READY, or FAILED
        and raise."""
        cfg = self.config
        self.woke = self.state is ModelState.ASLEEP and self.backend.alive()
        self.set(ModelState.STARTING)
        started = self._clock.seconds()
        try:
            if self.woke:
                yield self._wake(http, health_interval)
            else:
                yield self.backend.start()
            if cfg.remote is None:  # a remote endpoint is up whenever it answers
                timeout = cfg.startup_timeout
                yield self.readiness.wait(self._clock, http, self.name, cfg.health_url, timeout,
                                          health_interval, self.backend.alive,
                                          self.backend.follow)  # fmt: skip
        except BaseException as e:
            if self.backend.alive():
                self.set(ModelState.STOPPING)
                yield self.backend.stop()
            if isinstance(e, CancelledError):  # shutting down, not the backend's fault
                self.set(ModelState.STOPPED)
                raise
            detail = self.as_api_error(e).message
            self.restarts.failed(self._clock.seconds(), crashed=False)
            self.set(ModelState.FAILED, detail)
            lines = "\n".join(self.backend.describe().get("output", ()))
            output = f"; last output:\n{lines}" if lines else ""  # the operator's log only
            log.error("model {model}: failed to start: {detail}{output}", model=self.name,
                      detail=detail, output=output)  # fmt: skip
            raise
        now = self._clock.seconds()
        self.last_load_seconds = round(now - started, 3)
        self.last_used = now
        self.restarts.ready(now)
        self.served = 0
        self.set(ModelState.READY)

    @inlineCallbacks
    def _wake(self, http: BackendHTTP, interval: float) -> Generator[Deferred[Any], Any, None]:
        assert self.config.sleep is not None
        try:
            yield sleep.wake(self._clock, http, self.config.sleep, self.config.startup_timeout,
                             interval)  # fmt: skip
        except sleep.SleepFailed as e:
            log.warn("model {model}: wake failed ({e}); restarting it", model=self.name, e=e)
            self.woke = False
            yield self.backend.stop()
            yield self.backend.start()

    def adopted(self, asleep: bool = False) -> None:
        self.last_used = self._clock.seconds()
        self.served = 0
        self.set(ModelState.ASLEEP if asleep else ModelState.READY)

    @inlineCallbacks
    def drain(self) -> Generator[Deferred[Any], Any, None]:
        """No new admissions; wait (at most ``drain_timeout``) until running requests finish."""
        if self.state is ModelState.READY:
            self.set(ModelState.DRAINING)
        if not self.in_flight:
            return None
        idle: Deferred[None] = Deferred()
        self._idle.append(idle)
        timeout = self.config.drain_timeout
        idle.addTimeout(timeout, self._clock)
        try:
            yield idle
        except TimeoutError:
            log.warn(
                "model {model}: {n} request(s) still running after drain_timeout ({t:g} s); "
                "stopping it anyway",
                model=self.name,
                n=self.in_flight,
                t=timeout,
            )
        return None

    def undrain(self) -> None:
        """The eviction was called off: take requests again."""
        if self.state is ModelState.DRAINING:
            self.set(ModelState.READY)

    @inlineCallbacks
    def stop(self) -> Generator[Deferred[Any], Any, None]:
        """Stop the backend; fires once it is confirmed gone."""
        self.restarts.stopped(self._clock.seconds())
        self.set(ModelState.STOPPING)
        yield self.backend.stop()
        self.keep_alive = None
        self.set(ModelState.STOPPED)

    @inlineCallbacks
    def put_to_sleep(
        self, http: BackendHTTP, interval: float
    ) -> Generator[Deferred[Any], Any, bool]:
        """Release its device memory, keeping the process; fires once the backend confirmed
        it.  A sleep that fails or is not confirmed in time stops the backend instead: either
        way its device memory is free when this fires.  True when it sleeps."""
        assert self.config.sleep is not None
        self.restarts.stopped(self._clock.seconds())
        self.set(ModelState.STOPPING)
        self.keep_alive = None
        try:
            yield sleep.put_to_sleep(self._clock, http, self.config.sleep, interval)
        except sleep.SleepFailed as e:
            log.warn("model {model}: sleep failed ({e}); stopping it", model=self.name, e=e)
            yield self.backend.stop()
            self.set(ModelState.STOPPED)
            return False
        if not self.backend.alive():  # it exited meanwhile; _exited saw STOPPING
            self.set(ModelState.STOPPED)
            return False
        self.set(ModelState.ASLEEP)
        return True

    def _exited(self, reason: str) -> None:
        """The backend died on its own: report it; the next request for it restarts it."""
        self.readiness.exited()  # a load waiting for it learns at once
        if self.state in (ModelState.READY, ModelState.DRAINING, ModelState.ASLEEP):
            self.restarts.failed(self._clock.seconds(), crashed=True)
            self.set(ModelState.FAILED, f"backend {self.backend.failure_detail()}")
            self._on_crash(self)

    def held_back(self) -> errors.APIError | None:
        """The answer to a request while this failed model's restart waits (crash backoff),
        or None when it may start now."""
        if self.state is not ModelState.FAILED:
            return None
        wait = self.restarts.wait(self._clock.seconds())
        if not wait:
            return None
        n, last = self.restarts.failures, self.error or "unknown"
        if self.restarts.given_up:
            what = f"failed {n} times in a row and is held back (last: {last}); next try in"
        else:
            what = f"failed {n} times in a row (last: {last}); it starts again in"
        return errors.backend_unavailable(
            f"Model '{self.name}' {what} {math.ceil(wait)} s", retry_after=math.ceil(wait)
        )

    def as_api_error(self, e: BaseException) -> errors.APIError:
        if isinstance(e, errors.APIError):
            return e
        if isinstance(e, BackendDied):
            return errors.backend_unavailable(
                f"Model '{self.name}' exited while loading: {self.backend.failure_detail()}"
            )
        return errors.backend_unavailable(f"Model '{self.name}' could not be started: {e}")
