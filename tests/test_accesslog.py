"""The access log's batching, on a Clock: lines arrive late by at most the delay, never lost."""

from __future__ import annotations

import time
from typing import cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent

from llmswap.accesslog import AccessLog
from llmswap.events import EventBus


def _running(clock: Clock, seen: list[LogEvent]) -> AccessLog:
    access = AccessLog(clock, EventBus(), observer=cast(ILogObserver, seen.append), delay=0.1)
    access.startService()
    return access


def test_lines_arrive_together_within_the_delay_in_order_with_their_own_times() -> None:
    clock, seen = Clock(), list[LogEvent]()
    access = _running(clock, seen)
    before = time.time()
    access.logger.info("first")
    clock.advance(0.05)
    access.logger.info("second {n}", n=2)
    after = time.time()
    assert seen == []
    clock.advance(0.05)
    assert [formatEvent(e) for e in seen] == ["first", "second 2"]
    assert all(before <= e["log_time"] <= after for e in seen)
    assert {e["log_namespace"] for e in seen} == {"llmswap.access"}
    assert clock.getDelayedCalls() == []  # no timer while nothing is held
    access.logger.info("third")
    clock.advance(0.1)
    assert [formatEvent(e) for e in seen][2:] == ["third"]


def test_stopping_passes_on_what_is_held_and_leaves_no_timer() -> None:
    clock, seen = Clock(), list[LogEvent]()
    access = _running(clock, seen)
    access.logger.info("held")
    access.stopService()
    assert [formatEvent(e) for e in seen] == ["held"]
    assert clock.getDelayedCalls() == []
    access.logger.info("after the stop")  # a request answered while the daemon stops
    assert [formatEvent(e) for e in seen] == ["held", "after the stop"]
