"""One host's changes, one at a time: its swap lock.

Each host (a Docker engine and its devices) has a lane.  Loads and unloads on one host run one
after another under the lane's :class:`DeferredLock`, so the GPU-safety promise (never more than
the budget; what is evicted is confirmed stopped or asleep before the next start) holds per box,
while lanes of different hosts change at the same time: a slow load on one box never holds a
request for another.  A change that concerns every host (a reload) holds every lane.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    maybeDeferred,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmswap import errors

log = Logger()


@attrs.define(eq=False)
class Lane:
    """A host's change under way, if any (the policy starts no other on it until it ends)."""

    host: str
    # Called after each change: the manager decides again.
    _ended: Callable[[], None]
    lock: DeferredLock = attrs.field(factory=DeferredLock)
    change: Deferred[Any] | None = None
    # Set before the change starts, which may run to its end before begin returns.
    changing: bool = False

    def begin(self, change: Callable[..., Deferred[Any]], *args: Any) -> Deferred[Any]:
        """Run a load or unload under the lock.

        The returned Deferred carries the change's outcome (an admin call reports it); the
        policy's own changes are logged here, so their Deferreds are not waited on.
        """
        self.changing = True
        d: Deferred[Any] = self.lock.run(change, *args)
        self.change = d
        d.addBoth(self._end, change.__name__)
        return d

    def _end(self, result: Any, name: str) -> Any:
        self.changing = False
        self.change = None
        _log_failure(result, name)
        self._ended()
        return result


def _log_failure(result: Any, name: str) -> None:
    if isinstance(result, Failure) and not result.check(CancelledError, errors.APIError):
        log.failure("{change} failed", result, change=name)


def idle(lanes: Sequence[Lane]) -> Deferred[Any] | None:
    """Fires when the changes under way on ``lanes`` end (their outcomes left to their own
    chains); None when none is under way."""
    under_way = [lane.change for lane in lanes if lane.change is not None]
    return DeferredList(under_way) if under_way else None


def begin_everywhere(
    lanes: Sequence[Lane], change: Callable[[], Deferred[Any]], ended: Callable[[], None]
) -> Deferred[Any]:
    """Run ``change`` holding every lane (all idle: see :func:`idle`)."""
    for lane in lanes:
        assert not lane.lock.locked, "begin_everywhere needs idle lanes"
        lane.lock.acquire()  # free: taken at once
        lane.changing = True
    d: Deferred[Any] = maybeDeferred(change)
    for lane in lanes:
        lane.change = d

    def end(result: Any) -> Any:
        for lane in lanes:
            lane.changing = False
            lane.change = None
            lane.lock.release()
        _log_failure(result, getattr(change, "__name__", "change"))
        ended()
        return result

    d.addBoth(end)
    return d
