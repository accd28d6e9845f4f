"""A model's states and the only transitions between them.

A state is what ``/health``, the metrics and the console show, and what the scheduler trusts
when it decides which models occupy memory; a state set to something impossible (``ready``
from ``stopping``) would make llmswap believe a GPU is free that is not.  So every change goes
through :func:`check`, and a transition missing from the table is a bug that raises
:class:`IllegalTransition` rather than a silent overwrite.
"""

from __future__ import annotations

from llmswap.events import ModelState

TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    # Started by a load; adopted as ready (or asleep) at start-up; a stray server (started by
    # hand, or left by a crash) stopped before a load.
    ModelState.STOPPED: frozenset(
        {ModelState.STARTING, ModelState.READY, ModelState.ASLEEP, ModelState.STOPPING}
    ),
    # Healthy; failed to start; stopped after a failed or cancelled start.
    ModelState.STARTING: frozenset(
        {ModelState.READY, ModelState.FAILED, ModelState.STOPPING, ModelState.STOPPED}
    ),
    # Evicted (drains first); stopped outright; exited by itself.
    ModelState.READY: frozenset({ModelState.DRAINING, ModelState.STOPPING, ModelState.FAILED}),
    # Drained and stopped; eviction called off (nobody waits any more); exited by itself.
    ModelState.DRAINING: frozenset({ModelState.STOPPING, ModelState.READY, ModelState.FAILED}),
    # Confirmed gone; confirmed asleep (a sleep is a stop that keeps the process); gone after a
    # failed start, which is reported as such.
    ModelState.STOPPING: frozenset({ModelState.STOPPED, ModelState.ASLEEP, ModelState.FAILED}),
    # Woken by a load (its device memory is counted from the first wake call); stopped for
    # real (its host memory is wanted, or llmswap stops); exited by itself.
    ModelState.ASLEEP: frozenset({ModelState.STARTING, ModelState.STOPPING, ModelState.FAILED}),
    # Restarted by the next request; its leftover process stopped.
    ModelState.FAILED: frozenset({ModelState.STARTING, ModelState.STOPPING}),
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in llmswap, never a user's error."""


def check(model: str, old: ModelState, new: ModelState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"model {model}: {old} -> {new} is not a legal transition")
