"""The shared heartbeat of waiting streams (their loading comments), on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from llmswap.heartbeat import Heartbeat


def test_every_waiting_item_hears_each_interval_until_discarded() -> None:
    clock, said = Clock(), list[str]()
    heartbeat: Heartbeat[str] = Heartbeat(clock, lambda: 5.0, said.append)
    heartbeat.add("a")
    clock.advance(3)
    heartbeat.add("b")  # shares the tick: its first comment comes within one interval
    clock.advance(2)
    assert sorted(said) == ["a", "b"]
    heartbeat.discard("a")
    clock.advance(5)
    assert sorted(said) == ["a", "b", "b"]


def test_no_timer_runs_while_nothing_waits_or_after_stop() -> None:
    clock, said = Clock(), list[str]()
    heartbeat: Heartbeat[str] = Heartbeat(clock, lambda: 5.0, said.append)
    heartbeat.add("a")
    heartbeat.discard("a")
    assert clock.getDelayedCalls() == []
    heartbeat.startService()
    heartbeat.add("b")
    heartbeat.stopService()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert said == []


def test_a_stream_whose_comment_fails_is_dropped_and_the_others_still_hear() -> None:
    clock, said = Clock(), list[str]()

    def say(item: str) -> None:
        if item == "broken":
            raise RuntimeError("boom")
        said.append(item)

    heartbeat: Heartbeat[str] = Heartbeat(clock, lambda: 5.0, say)
    heartbeat.add("broken")
    heartbeat.add("fine")
    clock.pump([5, 5])
    assert said == ["fine", "fine"]
