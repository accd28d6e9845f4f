"""Readiness polls on a Clock: a line the backend prints is a poll at once, and a backend that
says when it is ready is polled seldom between its lines."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from llmswap.errors import APIError
from llmswap.swap.readiness import BURST, TOLD, BackendDied, Readiness
from llmswap.testing import MemoryBackend, MemoryHTTP

URL = "http://m:1/health"
INTERVAL = 0.01


class Counted(MemoryHTTP):
    """Counts the polls, and when each came."""

    def __init__(self, backend: MemoryBackend, clock: Clock) -> None:
        super().__init__({"m": backend})
        self.clock = clock
        self.polls: list[float] = []

    def get(self, url: str) -> Deferred[Any]:
        self.polls.append(self.clock.seconds())
        return super().get(url)


@pytest.fixture
def loading() -> tuple[Clock, MemoryBackend, Counted]:
    clock = Clock()
    backend = MemoryBackend("m", [])
    backend.running, backend.healthy = True, False
    return clock, backend, Counted(backend, clock)


def wait(
    readiness: Readiness, clock: Clock, backend: MemoryBackend, http: Counted
) -> Deferred[None]:
    d: Deferred[None] = readiness.wait(
        clock, http, "m", URL, 60.0, INTERVAL, backend.alive, backend.follow
    )
    return d


def failure_of(d: Deferred[None]) -> BaseException:
    failed: list[BaseException | None] = []

    def caught(f: Failure) -> None:
        failed.append(f.value)

    d.addErrback(caught)
    assert failed and failed[0] is not None, "still waiting"
    return failed[0]


def become_ready(backend: MemoryBackend, line: str | None) -> None:
    backend.healthy = True
    if line is not None:
        backend.print(line)


def test_a_line_is_a_poll_at_once(loading: tuple[Clock, MemoryBackend, Counted]) -> None:
    clock, backend, http = loading
    d = wait(Readiness(), clock, backend, http)
    clock.advance(0.5)
    become_ready(backend, "srv  llama_server: model loaded")
    # Ready at 0.5 s, and known at 0.5 s: no timer had to pass.
    assert d.called and http.polls[-1] == 0.5
    assert not clock.getDelayedCalls()


def test_each_load_teaches_the_next_how_often_to_poll(
    loading: tuple[Clock, MemoryBackend, Counted],
) -> None:
    clock, backend, http = loading
    readiness = Readiness()

    def load(polled: float, step: float, line: str | None) -> int:
        """Polls while it loads ``polled`` seconds (checked each ``step``), then ready."""
        backend.healthy = False
        http.polls.clear()
        d = wait(readiness, clock, backend, http)
        clock.pump([step] * round(polled / step))
        polls = len(http.polls)
        become_ready(backend, line)
        clock.advance(TOLD)
        assert d.called
        return polls

    # Most servers say when they are ready: between their lines, a poll each TOLD.
    assert load(1.0, TOLD, "model loaded") == 11
    assert readiness.told
    # Ready silently this time: known within TOLD, and the next load is polled each interval.
    load(0.05, INTERVAL, None)
    assert not readiness.told
    assert load(0.1, INTERVAL, None) == 11


def test_ready_at_the_first_poll_teaches_nothing(
    loading: tuple[Clock, MemoryBackend, Counted],
) -> None:
    clock, backend, http = loading
    readiness = Readiness(told=False)
    backend.healthy = True
    assert wait(readiness, clock, backend, http).called
    assert not readiness.told


def test_lines_call_polls_at_once_a_few_times_then_once_an_interval(
    loading: tuple[Clock, MemoryBackend, Counted],
) -> None:
    clock, backend, http = loading
    d = wait(Readiness(), clock, backend, http)
    for _ in range(10):  # ten lines at once: BURST polls now, the rest one an interval
        backend.print("loading tensors")
    assert len(http.polls) == 1 + BURST
    clock.pump([INTERVAL / 10] * 10)
    assert len(http.polls) == 2 + BURST
    become_ready(backend, "model loaded")
    clock.advance(INTERVAL)
    assert d.called


def test_a_backend_that_dies_or_never_answers(
    loading: tuple[Clock, MemoryBackend, Counted],
) -> None:
    clock, backend, http = loading
    d = wait(Readiness(), clock, backend, http)
    backend.running = False
    backend.print("segfault")
    assert isinstance(failure_of(d), BackendDied)
    backend.running = True
    d = wait(Readiness(), clock, backend, http)
    clock.advance(61)
    error = failure_of(d)
    assert isinstance(error, APIError) and error.status == 504
    assert not clock.getDelayedCalls() and not backend._followers


def test_a_cancelled_wait_leaves_no_timer_and_no_follower(
    loading: tuple[Clock, MemoryBackend, Counted],
) -> None:
    clock, backend, http = loading
    d = wait(Readiness(), clock, backend, http)
    clock.advance(0.05)
    d.cancel()
    d.addErrback(lambda _: None)
    assert not clock.getDelayedCalls() and not backend._followers


def test_a_follow_that_cannot_end_does_not_fail_a_ready_load(
    loading: tuple[Clock, MemoryBackend, Counted],
) -> None:
    clock, backend, http = loading

    def follow(line: Any) -> Any:
        def unfollow() -> None:
            raise OSError("docker-py cannot close an ssh:// engine's stream")

        return unfollow

    d = Readiness().wait(clock, http, "m", URL, 60.0, INTERVAL, backend.alive, follow)
    clock.advance(0.5)
    backend.healthy = True
    clock.advance(TOLD)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results == [None]
