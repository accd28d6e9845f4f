"""Crash backoff: when a model that keeps failing may start again.

A model whose backend crashes, or fails to load, again and again must not be restarted in a
tight loop by the requests that keep coming for it (each restart reads gigabytes of weights and
may take the device from a model that works).  Its failures in a row are counted; the first
restart is at once, each next one waits twice as long (1 s, 2 s, 4 s, ... up to a minute), and
from :data:`GIVE_UP` failures on the model is shown held back with its reason (tried 8, 16, 32,
then 60 s apart).  Requests that come meanwhile are answered at once (503, ``Retry-After``),
never left waiting for a restart that is not coming.  A run of :data:`STABLE` seconds, ended by
a crash or a stop, starts the count over; so do an admin's load and a reload that changes the
model (a new slot).
"""

from __future__ import annotations

import attrs

FIRST = 1.0  # seconds before the second restart in a row
MOST = 60.0  # the longest wait between restarts
GIVE_UP = 5  # failures in a row after which the model is shown held back
STABLE = 60.0  # seconds a backend must run after ready for its crash to start the count over


@attrs.define
class Restarts:
    """One slot's failures in a row (its own, as the slot is its only writer)."""

    failures: int = 0
    retry_at: float = 0.0
    ready_at: float | None = None

    def ready(self, now: float) -> None:
        self.ready_at = now

    def stopped(self, now: float) -> None:
        """Stopped or put to sleep on purpose: after a good run, the count starts over."""
        if self.ready_at is not None and now - self.ready_at >= STABLE:
            self.reset()
        self.ready_at = None

    def failed(self, now: float, crashed: bool) -> None:
        """A load failed, or the backend crashed (``crashed``) after it was ready."""
        if crashed and self.ready_at is not None and now - self.ready_at >= STABLE:
            self.failures = 0  # it ran well: this crash is a first one
        self.ready_at = None
        self.failures += 1
        self.retry_at = now + self.delay()

    def delay(self) -> float:
        """Seconds from the last failure until the next start may begin."""
        if self.failures <= 1:
            return 0.0
        return min(MOST, FIRST * 2.0 ** (self.failures - 2))

    def wait(self, now: float) -> float:
        """Seconds until a start may begin (0: now)."""
        return max(0.0, self.retry_at - now) if self.failures else 0.0

    @property
    def given_up(self) -> bool:
        return self.failures >= GIVE_UP

    def reset(self) -> None:
        self.failures, self.retry_at = 0, 0.0
