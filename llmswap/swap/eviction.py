"""Making room for a load: put away what it evicts, and confirm it, before anything starts.

A model with a sleep mode is put to sleep rather than stopped when its host memory fits its
sleep device, after stopping the least recently used sleepers there, but never the model that is
coming (its wake frees its own host memory, too late to make room).  Otherwise, and for every
other model, it is stopped.  Either way its device memory is confirmed free when this fires.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from llmswap.interfaces import BackendHTTP
from llmswap.swap import policy
from llmswap.swap.slot import Slot

log = Logger()


@attrs.frozen
class Away:
    """The models put away, in order, and those of them that sleep rather than stopped."""

    unloaded: tuple[str, ...] = ()
    slept: tuple[str, ...] = ()


@inlineCallbacks
def put_away(
    slots: Mapping[str, Slot],
    view: Callable[[str], policy.View],
    names: Iterable[str],
    coming: str | None,
    http: BackendHTTP,
    interval: float,
    sleep: bool = True,
) -> Generator[Deferred[Any], Any, Away]:
    """Sleep (when ``sleep`` and it can) or stop each of ``names``, one after another; fires
    with the :class:`Away`, the sleepers stopped for room included."""
    away: list[tuple[str, bool]] = []
    for name in names:
        away += yield _put_away(slots, view, name, coming, http, interval, sleep)
    return Away(tuple(n for n, _ in away), tuple(n for n, slept in away if slept))


@inlineCallbacks
def _put_away(
    slots: Mapping[str, Slot],
    view: Callable[[str], policy.View],
    name: str,
    coming: str | None,
    http: BackendHTTP,
    interval: float,
    sleep: bool,
) -> Generator[Deferred[Any], Any, list[tuple[str, bool]]]:
    slot = slots[name]
    if not sleep or slot.config.sleep is None or slot.asleep or not slot.backend.alive():
        yield slot.stop()
        return [(name, False)]
    keep = frozenset() if coming is None else frozenset({coming})
    room = policy.plan_eviction(view(name), name, keep, asleep=True)
    if coming in room:
        yield slot.stop()
        return [(name, False)]
    done = []
    for other in room:
        yield slots[other].stop()
        done.append((other, False))
    slept = yield slot.put_to_sleep(http, interval)
    return [*done, (name, slept)]


@inlineCallbacks
def shut_down(slots: Mapping[str, Slot]) -> Generator[Deferred[Any], Any, None]:
    """llmswap stops: every backend stopped (sleepers too), or left to be adopted where the
    driver can (containers, unless ``docker.stop_on_exit``)."""
    for name, slot in slots.items():
        try:
            yield slot.backend.shutdown()
        except Exception as e:
            log.error("model {model}: stop failed: {e}", model=name, e=e)


@inlineCallbacks
def clear_strays(slots: Mapping[str, Slot], coming: str) -> Generator[Deferred[Any], Any, None]:
    """Stop what runs uncounted (a crashed model's leftover process, a container started by
    hand); sleepers are counted on their own device and stay."""
    for name, other in slots.items():
        alive = other.backend.alive()
        if name != coming and alive and not other.state.resident and not other.asleep:
            yield other.stop()
