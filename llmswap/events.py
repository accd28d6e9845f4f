"""One stream of typed events: what happened to requests and models, for whoever listens.

The swap manager and the request path publish; metrics, the access log (and the web console)
subscribe.  Nothing holds a reference back to a publisher, so the parts stay independent.

Cost: a listener subscribes to the kinds it wants; a publisher asks :meth:`EventBus.wants`
before it builds an event on the hot path, so a kind nobody listens to costs one dict lookup.
Listeners run synchronously and must be quick (counting, appending to a bounded buffer); one
that serves slow readers bounds what it keeps for them, as the console's live streams do
(:mod:`llmswap.console.live`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attrs
from twisted.logger import Logger

log = Logger()


class ModelState(enum.StrEnum):
    """The states a model is reported in (``/health``, metrics, the console); the swap
    manager's table of legal transitions between them is :mod:`llmswap.swap.state`."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    # Its process lives with its device memory released (a backend's sleep mode): it wakes
    # much faster than it starts, and holds only host memory meanwhile.
    ASLEEP = "asleep"
    FAILED = "failed"

    @property
    def resident(self) -> bool:
        """Whether a model in this state may hold device memory (the budget counts it)."""
        return self in _RESIDENT


_RESIDENT = frozenset(
    {ModelState.STARTING, ModelState.READY, ModelState.DRAINING, ModelState.STOPPING}
)


class Cause(enum.StrEnum):
    """Why a model was loaded or unloaded."""

    REQUEST = "request"  # a waiting request needed it
    PRELOAD = "preload"  # listed in ``preload``, or adopted at start-up
    TTL = "ttl"  # idle for its ttl
    ADMIN = "admin"  # an admin route
    KEEP_ALIVE = "keep_alive"  # an Ollama request's keep_alive: 0
    RELOAD = "reload"  # removed or changed by a configuration reload
    EVICTION = "eviction"  # made room for another model
    CRASH = "crash"  # its backend exited by itself


@attrs.frozen
class RequestQueued:
    """A request entered the queue (it may be admitted in the same turn)."""

    at: float
    seq: int
    model: str
    key: str
    priority: int
    position: int


@attrs.frozen
class RequestAdmitted:
    """A request got its backend after waiting ``waited`` seconds."""

    at: float
    seq: int
    model: str
    waited: float


@attrs.frozen
class RequestEnded:
    """A request's whole life, once its answer has left (or it failed, or the client left)."""

    at: float
    method: str
    path: str
    model: str  # as the client sent it (capped), "-" when it named none
    configured: bool  # whether ``model`` is a configured model
    key: str
    stream: bool
    status: int
    queue_wait: float | None
    duration: float
    first_byte: float | None  # streams: seconds to the first relayed byte
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_per_second: float | None = None  # as the backend measured it (llama.cpp's timings)
    pool: str | None = None  # the pool asked for, whose member ``model`` served it
    # A failed request's details (the console keeps them, capped): llmswap's error, the
    # request body, the end of the backend's answer.  Empty for the others.
    error: str | None = None
    sent: bytes = b""
    answer: bytes = b""
    console: bool = False  # sent by the console's playground


def failed(status: int) -> bool:
    """Whether an ended request failed: an error answer, one cut off (0), a client gone (499)."""
    return status >= 400 or status == 0


@attrs.frozen
class ModelStateChanged:
    at: float
    model: str
    old: ModelState
    new: ModelState
    error: str | None = None


@attrs.frozen
class Swap:
    """A load, an unload, or both: ``stop_seconds`` to confirm ``unloaded`` gone (or asleep),
    then ``load_seconds`` until ``loaded`` answered healthy (None: nothing was loaded)."""

    at: float
    cause: Cause
    loaded: str | None
    unloaded: tuple[str, ...]
    stop_seconds: float
    load_seconds: float | None = None
    # ``loaded`` was woken from sleep rather than started.
    woke: bool = False
    # Those of ``unloaded`` put to sleep rather than stopped.
    slept: tuple[str, ...] = ()

    def summary(self) -> str:
        """The log line of a load: ``swap a -> b: sleep 0.41 s, wake 0.30 s``."""
        away = "sleep" if self.slept else "stop"
        load = "wake" if self.woke else "load"
        return (
            f"swap {', '.join(self.unloaded) or '(none)'} -> {self.loaded}: "
            f"{away} {self.stop_seconds:.2f} s, {load} {self.load_seconds or 0:.2f} s"
        )


@attrs.frozen
class MemoryFreed:
    """A start on a probed device waited ``waited`` s for the memory a stop gave back to show
    free (CUDA frees a dead process's memory some time after it is gone)."""

    at: float
    device: str
    model: str
    waited: float


Event = RequestQueued | RequestAdmitted | RequestEnded | ModelStateChanged | Swap | MemoryFreed
E = TypeVar("E", bound=Event)


@attrs.define(eq=False)
class Subscription:
    _bus: EventBus
    _kinds: tuple[type[Any], ...]
    _listener: Callable[[Any], None]

    def cancel(self) -> None:
        for kind in self._kinds:
            self._bus._remove(kind, self._listener)


class EventBus:
    """Delivers each published event to the listeners of its kind, in subscription order."""

    def __init__(self) -> None:
        self._listeners: dict[type[Any], tuple[Callable[[Any], None], ...]] = {}

    def subscribe(self, kind: type[E], listener: Callable[[E], None]) -> Subscription:
        return self.subscribe_all((kind,), listener)

    def subscribe_all(
        self, kinds: Iterable[type[Any]], listener: Callable[[Any], None]
    ) -> Subscription:
        kinds = tuple(kinds)
        for kind in kinds:
            self._listeners[kind] = (*self._listeners.get(kind, ()), listener)
        return Subscription(self, kinds, listener)

    def wants(self, kind: type[Any]) -> bool:
        return kind in self._listeners

    def publish(self, event: Event) -> None:
        for listener in self._listeners.get(type(event), ()):
            try:
                listener(event)
            except Exception:  # a broken listener must not break a swap or a request
                log.failure("event listener failed on {event!r}", event=event)

    def _remove(self, kind: type[Any], listener: Callable[[Any], None]) -> None:
        remaining = tuple(x for x in self._listeners.get(kind, ()) if x is not listener)
        if remaining:
            self._listeners[kind] = remaining
        else:
            self._listeners.pop(kind, None)
