"""A model's states and the only transitions between them.

A state is what ``/health``, the metrics and the console show, and what the scheduler trusts
when it decides which models occupy memory; a state set to something impossible (``ready``
from ``stopping``) would make llmswap believe a GPU is free that is not.  So every change goes
through :func:`check`, and a transition missing from the table is a bug that raises
:class:`IllegalTransition` rather than a silent overwrite.
"""

from __future__ import annotations

import enum


class ModelState(enum.StrEnum):
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

S = ModelState
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    # Started by a load; adopted as ready (or asleep) at start-up; a stray server (started by
    # hand, or left by a crash) stopped before a load.
    S.STOPPED: frozenset({S.STARTING, S.READY, S.ASLEEP, S.STOPPING}),
    # Healthy; failed to start; stopped after a failed or cancelled start.
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING, S.STOPPED}),
    # Evicted (drains first); stopped outright; exited by itself.
    S.READY: frozenset({S.DRAINING, S.STOPPING, S.FAILED}),
    # Drained and stopped; eviction called off (nobody waits any more); exited by itself.
    S.DRAINING: frozenset({S.STOPPING, S.READY, S.FAILED}),
    # Confirmed gone; confirmed asleep (a sleep is a stop that keeps the process); gone after a
    # failed start, which is reported as such.
    S.STOPPING: frozenset({S.STOPPED, S.ASLEEP, S.FAILED}),
    # Woken by a load (its device memory is counted from the first wake call); stopped for
    # real (its host memory is wanted, or llmswap stops); exited by itself; adopted at start-up.
    S.ASLEEP: frozenset({S.STARTING, S.STOPPING, S.FAILED}),
    # Restarted by the next request; its leftover process stopped.
    S.FAILED: frozenset({S.STARTING, S.STOPPING}),
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in llmswap, never a user's error."""


def check(model: str, old: ModelState, new: ModelState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"model {model}: {old} -> {new} is not a legal transition")
