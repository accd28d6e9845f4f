"""When a backend that is slow to stop is asked again (a process, or a container's stop signal).

A server asked to stop with SIGTERM normally exits within its usual time (llama-server: about
50 ms; vLLM: seconds).  Now and then one does not: llama-server's main loop can miss the wake-up
of its shutdown and then waits, with nothing left to do, until it is killed; every request for
the next model waited ``stop_timeout`` (10 s) for it.  llama-server, and uvicorn (vLLM's server),
take a second SIGTERM as "exit now".  So a stop still running after :data:`ROOM` times the
longest of the backend's recent stops (at least :data:`FLOOR`; half of ``stop_timeout`` before
one is known) is asked again with a second SIGTERM, and only a backend still running at
``stop_timeout`` is killed.  Every stop is recorded, those the second SIGTERM ended too: the
grace only grows from them, so a backend whose graceful stop is long (vLLM's) is asked again at
most once, then no more (its grace reaches ``stop_timeout``).
"""

from __future__ import annotations

from collections import deque

import attrs

RECENT, ROOM, FLOOR = 8, 3.0, 1.0


@attrs.define
class StopRecord:
    """One backend's stops: how long the latest took, and how many were asked again."""

    took: deque[float] = attrs.field(factory=lambda: deque(maxlen=RECENT))
    asked_again: int = 0

    def grace(self, stop_timeout: float) -> float | None:
        """Seconds after the first SIGTERM at which the second is sent; None: not before
        ``stop_timeout``, its SIGKILL."""
        grace = max(FLOOR, ROOM * max(self.took)) if self.took else stop_timeout / 2
        return grace if grace < stop_timeout else None
