"""Readiness: does a backend's health URL answer 2xx, now or within its startup timeout?

llama-server answers 503 while it loads the model and 200 once it can serve; vLLM and most other
OpenAI servers refuse connections until ready.  Both look the same here: anything but a 2xx is
"not yet".  The poll interval is short (10 ms by default) because every poll of delay is added to
every swap; a single poll is also bounded, so a backend that accepts the connection and then says
nothing cannot stall the swap past its ``startup_timeout``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from llmswap import errors
from llmswap.interfaces import BackendHTTP, BackendResponse

PROBE_TIMEOUT = 5.0


class BackendDied(Exception):
    """The backend process/container exited while we waited for it to become ready."""


@inlineCallbacks
def probe(
    clock: IReactorTime, http: BackendHTTP, url: str, timeout: float = PROBE_TIMEOUT
) -> Generator[Deferred[Any], Any, bool]:
    """One poll of ``url`` (a treq ``HTTPClient`` GET, bounded by ``timeout``): True on 2xx.

    Refused, timed out, or garbage from a half-started server all mean "not ready"; only a
    cancellation (llmswap stopping) propagates.
    """
    d = http.get(url)
    d.addTimeout(timeout, clock)
    try:
        response: BackendResponse = yield d
        yield response.collect(lambda _: None)
    except CancelledError:
        raise
    except Exception:
        return False
    return 200 <= response.code < 300


@inlineCallbacks
def wait_healthy(
    clock: IReactorTime,
    http: BackendHTTP,
    model: str,
    url: str,
    timeout: float,
    interval: float,
    alive: Callable[[], bool],
) -> Generator[Deferred[Any], Any, None]:
    """Poll ``url`` until 2xx; fail fast if ``alive()`` turns false; give up after ``timeout``.

    Fails with :class:`BackendDied` or a 504 APIError.
    """
    deadline = clock.seconds() + timeout
    while True:
        if not alive():
            raise BackendDied(model)
        remaining = deadline - clock.seconds()
        if remaining <= 0:
            raise errors.startup_timeout(model, timeout)
        if (yield probe(clock, http, url, min(PROBE_TIMEOUT, remaining))):
            return None
        wait: Deferred[None] = deferLater(clock, min(interval, max(remaining, 0.0)), lambda: None)
        yield wait
