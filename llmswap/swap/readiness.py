"""Readiness: does a backend's health URL answer 2xx, now or within its startup timeout?

llama-server answers 503 while it loads the model and 200 once it can serve; vLLM and most other
OpenAI servers refuse connections until ready.  Both look the same here: anything but a 2xx is
"not yet".  A single poll is bounded, so a backend that accepts the connection and then says
nothing cannot stall the swap past its ``startup_timeout``.

A load pays for its polls twice: each poll's worth of delay is added to the swap, and each poll
costs llmswap about half a millisecond of CPU (a loading llama-server closes every connection it
answers 503 on), taken from the backend that loads and the one that serves, on a box whose
cores they fill.  Polled every 10 ms, two loads were half of what llmswap spent on four users'
whole run against llama.cpp's router (docs/benchmarks.md).  Most servers say when they are
ready ("model loaded", "Application startup complete"), so each line a starting backend prints
is a poll at once (:class:`_Lines`), and a backend whose last readiness was told so, or whose
first load this is, is polled between its lines only every :data:`TOLD` seconds.  One whose
last readiness came silently is polled every ``health_interval``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from llmswap import errors
from llmswap.interfaces import BackendHTTP, BackendResponse

log = Logger()

PROBE_TIMEOUT = 5.0
# Between the lines of a backend that says when it is ready: a guess wrong once (it became
# ready silently this time) costs at most this, and the next load polls at the interval again.
TOLD = 0.1
# Lines wake polls at once this many times in a row, then one per interval: a backend that
# prints a line a millisecond is polled no more often than a silent one.
BURST = 3


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


@attrs.define
class Readiness:
    """One backend's waits for readiness, and what its last one taught (owned by its Slot)."""

    told: bool = True  # its last readiness came on a poll a line of its called (or none yet)
    _lines: _Lines | None = attrs.field(default=None, init=False, repr=False)  # a wait's

    def exited(self) -> None:
        """Its backend exited: a wait under way looks now, not at its next poll (with
        :data:`TOLD`, up to 0.1 s later)."""
        if self._lines is not None:
            self._lines.end()

    @inlineCallbacks
    def wait(
        self,
        clock: IReactorTime,
        http: BackendHTTP,
        model: str,
        url: str,
        timeout: float,
        interval: float,
        alive: Callable[[], bool],
        follow: Callable[[Callable[[str], None]], Callable[[], None]],
    ) -> Generator[Deferred[Any], Any, None]:
        """Poll ``url`` until 2xx, at once after each line ``follow`` reports; fail fast if
        ``alive()`` turns false; give up after ``timeout``.

        Fails with :class:`BackendDied` or a 504 APIError.
        """
        deadline = clock.seconds() + timeout
        self._lines = lines = _Lines(clock, interval)
        unfollow = follow(lines.heard)
        first, called = True, False  # ready at the first poll tells nothing of how it says so
        try:
            while True:
                if not alive():
                    raise BackendDied(model)
                remaining = deadline - clock.seconds()
                if remaining <= 0:
                    raise errors.startup_timeout(model, timeout)
                lines.polling(called)
                if (yield probe(clock, http, url, min(PROBE_TIMEOUT, remaining))):
                    self.told = called or (first and self.told)
                    return None
                first = False
                pause = max(interval, TOLD) if self.told else interval
                called = yield lines.pause(min(pause, max(remaining, 0.0)))
        finally:
            lines.close()
            self._lines = None
            try:
                unfollow()
            except Exception as e:  # a follow that cannot end must not fail a load that ended
                log.warn("model {m}: ending its log follow: {e}", m=model, e=e)


class _Lines:
    """A starting backend's lines, as calls to poll now: a pause between polls ends at the
    first line (at once for :data:`BURST` lines in a row, then once an interval has passed).
    A poll is called by a line only when a line ended the pause before it: one the clock ended
    was not, however many lines came meanwhile."""

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        self._clock = clock
        self._interval = interval
        self._credit, self._at = float(BURST), clock.seconds()
        self._heard = False  # a line came since the last poll began
        self._pausing: Deferred[bool] | None = None
        self._timer: IDelayedCall | None = None

    def heard(self, _line: str) -> None:
        self._heard = True
        if self._pausing is not None:
            self._end_at(self._due(), by_line=True)

    def polling(self, called: bool) -> None:
        """A poll begins; one a line ``called`` spends a credit."""
        self._heard = False
        if called:
            self._credit = self._credits() - 1
            self._at = self._clock.seconds()

    def pause(self, seconds: float) -> Deferred[bool]:
        """Until ``seconds`` have passed or a line calls for a poll: True when a line did."""
        if self._heard and self._due() <= 0:
            return succeed(True)
        self._pausing = Deferred(lambda _: self.close())
        self._end_at(seconds, by_line=False)
        if self._heard:
            self._end_at(self._due(), by_line=True)
        return self._pausing

    def end(self) -> None:
        """End the pause now (the backend exited)."""
        if self._pausing is not None:
            self._end_at(0.0, by_line=False)

    def close(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._pausing = None

    def _credits(self) -> float:
        refilled = (self._clock.seconds() - self._at) / self._interval if self._interval else BURST
        return min(float(BURST), self._credit + refilled)

    def _due(self) -> float:
        """Seconds until a line may call a poll."""
        return max(0.0, (1 - self._credits()) * self._interval)

    def _end_at(self, seconds: float, by_line: bool) -> None:
        """End the pause in ``seconds``, unless its timer ends it sooner."""
        if seconds <= 0:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._end_now(by_line)
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() - self._clock.seconds() <= seconds:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(seconds, self._end, by_line)

    def _end(self, by_line: bool) -> None:
        self._timer = None
        self._end_now(by_line)

    def _end_now(self, by_line: bool) -> None:
        pausing, self._pausing = self._pausing, None
        if pausing is not None:
            pausing.callback(by_line)
