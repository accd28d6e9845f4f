"""The event stream: typed events with their causes, bounded for slow readers; model states."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from llmswap.config.config import parse
from llmswap.events import (
    Cause,
    EventBus,
    ModelState,
    ModelStateChanged,
    RequestAdmitted,
    RequestQueued,
    Swap,
)
from llmswap.interfaces import IBackend
from llmswap.swap.manager import SwapManager
from llmswap.swap.state import TRANSITIONS, IllegalTransition
from llmswap.testing import MemoryBackend, MemoryHTTP


def test_the_in_memory_fakes_provide_the_backend_interface() -> None:
    assert verifyObject(IBackend, MemoryBackend("a", []))


def test_every_state_has_its_transitions_and_ready_is_reached_only_from_loading_or_draining() -> (
    None
):
    assert set(TRANSITIONS) == set(ModelState)
    assert {old for old, new in TRANSITIONS.items() if ModelState.READY in new} == {
        ModelState.STOPPED,  # adopted at start-up
        ModelState.STARTING,
        ModelState.DRAINING,  # eviction called off
    }
    assert TRANSITIONS[ModelState.STOPPING] == {
        ModelState.STOPPED,
        ModelState.ASLEEP,
        ModelState.FAILED,
    }
    # A sleeper is awake only through a load (wake), never straight back to serving.
    assert ModelState.READY not in TRANSITIONS[ModelState.ASLEEP]
    assert {old for old, new in TRANSITIONS.items() if ModelState.ASLEEP in new} == {
        ModelState.STOPPED,
        ModelState.STOPPING,
    }


def test_bus_delivers_by_kind_and_a_cancelled_subscription_hears_nothing() -> None:
    bus, heard = EventBus(), list[Any]()
    assert not bus.wants(Swap)
    sub = bus.subscribe(Swap, heard.append)
    assert bus.wants(Swap) and not bus.wants(RequestQueued)
    swap = Swap(1.0, Cause.TTL, None, ("a",), 0.5)
    bus.publish(swap)
    bus.publish(RequestAdmitted(1.0, 1, "a", 0.0))
    sub.cancel()
    bus.publish(swap)
    assert heard == [swap]
    assert not bus.wants(Swap)


def test_a_failing_listener_does_not_stop_the_others() -> None:
    bus, heard = EventBus(), list[Any]()

    def broken(_: Any) -> None:
        raise RuntimeError("listener bug")

    bus.subscribe(Swap, broken)
    bus.subscribe(Swap, heard.append)
    bus.publish(Swap(1.0, Cause.TTL, None, ("a",), 0.5))
    assert len(heard) == 1


class ManagerEventTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.log: list[str] = []
        models = {n: {"backend_url": f"http://{n}:1/v1", "cmd": "x", "ttl": 50} for n in "ab"}
        self.config = parse({"models": models, "linger": 0})
        self.backends = {n: MemoryBackend(n, self.log) for n in "ab"}
        self.bus = EventBus()
        self.events: list[Any] = []
        self.bus.subscribe_all(
            [Swap, ModelStateChanged, RequestQueued, RequestAdmitted], self.events.append
        )
        self.manager = SwapManager(
            self.config, self.backends, MemoryHTTP(self.backends), self.clock, self.bus
        )
        self.manager.startService()
        self.addCleanup(self.manager.stopService)

    def swaps(self) -> list[tuple[Cause, str | None, tuple[str, ...]]]:
        return [(e.cause, e.loaded, e.unloaded) for e in self.events if isinstance(e, Swap)]

    def test_each_swap_says_why_it_happened(self) -> None:
        self.successResultOf(self.manager.acquire("a", key="alice")).release()
        self.successResultOf(self.manager.acquire("b")).release()  # evicts a
        self.clock.advance(50)  # b idle for its ttl
        self.successResultOf(self.manager.load("a"))
        self.backends["a"].crash()
        self.successResultOf(self.manager.unload("b"))  # not loaded: nothing to tell
        self.successResultOf(self.manager.reconfigure(self.config, {}))
        self.assertEqual(
            self.swaps(),
            [
                (Cause.REQUEST, "a", ()),
                (Cause.REQUEST, "b", ("a",)),
                (Cause.TTL, None, ("b",)),
                (Cause.ADMIN, "a", ()),
                (Cause.CRASH, None, ("a",)),
            ],
        )
        queued = [e for e in self.events if isinstance(e, RequestQueued)]
        self.assertEqual([(e.model, e.key) for e in queued], [("a", "alice"), ("b", "-")])

    def test_every_state_change_is_published_in_order(self) -> None:
        self.successResultOf(self.manager.acquire("a")).release()
        self.successResultOf(self.manager.acquire("b")).release()
        changes = [
            (e.model, e.old.value, e.new.value)
            for e in self.events
            if isinstance(e, ModelStateChanged)
        ]
        self.assertEqual(
            changes,
            [
                ("a", "stopped", "starting"),
                ("a", "starting", "ready"),
                ("a", "ready", "draining"),
                ("a", "draining", "stopping"),
                ("a", "stopping", "stopped"),
                ("b", "stopped", "starting"),
                ("b", "starting", "ready"),
            ],
        )

    def test_an_illegal_transition_raises_and_changes_nothing(self) -> None:
        self.successResultOf(self.manager.acquire("a")).release()
        slot = self.manager._slots["a"]
        with pytest.raises(IllegalTransition, match=r"model a: ready -> starting"):
            slot.set(ModelState.STARTING)
        self.assertIs(self.manager.state("a"), ModelState.READY)

    def test_snapshot_counts_every_waiting_request_and_lists_only_those_asked_for(self) -> None:
        held = self.successResultOf(self.manager.acquire("a"))
        for i in range(30):
            self.manager.acquire("a", priority=i).addErrback(lambda _: None)
            self.clock.advance(1)
        snap = self.manager.snapshot(queue=3)
        self.assertEqual((snap.waiting, snap.in_flight), (30, 1))
        self.assertEqual(snap.instances["a"].waiting, 30)
        self.assertEqual([(w.position, w.priority, w.age) for w in snap.queue],
                         [(1, 0, 30.0), (2, 1, 29.0), (3, 2, 28.0)])  # fmt: skip
        self.assertEqual(self.manager.snapshot().queue, ())
        held.release()
