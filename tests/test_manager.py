"""The swap manager's timing rules, on a Clock, with an in-memory backend and health endpoint."""

from __future__ import annotations

import itertools
from typing import Any

import attrs
from prometheus_client import generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from llmswap import health
from llmswap.config.config import parse
from llmswap.errors import APIError
from llmswap.metrics import Metrics
from llmswap.swap import policy, restarts
from llmswap.swap.manager import SwapManager
from llmswap.swap.queue import Lease
from llmswap.testing import MemoryBackend, MemoryHTTP
from tests.support import samples


class ManagerCase(unittest.TestCase):
    """A started manager of models a and b on a Clock, with in-memory backends."""

    def start(self, model: dict[str, Any], **settings: Any) -> None:
        self.clock = Clock()
        self.events: list[str] = []
        models = {n: {"backend_url": f"http://{n}:1/v1", "cmd": "x", **model} for n in "ab"}
        config = parse({"models": models, **settings})
        self.backends = {n: MemoryBackend(n, self.events) for n in "ab"}
        self.manager = SwapManager(config, self.backends, MemoryHTTP(self.backends), self.clock)
        self.manager.startService()
        self.addCleanup(self.manager.stopService)

    def health(self) -> dict[str, Any]:
        return health.document(self.manager.snapshot(health.QUEUE_SHOWN))

    def refused(self, model: str) -> APIError:
        """The error a request for ``model`` is answered with at once."""
        with self.assertRaises(APIError) as raised:
            self.manager.acquire(model)
        err: APIError = raised.exception
        return err


class ManagerTests(ManagerCase):
    def setUp(self) -> None:
        self.start({"startup_timeout": 10}, queue_size=2, request_timeout=30, linger=0)

    def test_swap_stops_the_old_backend_before_starting_the_new(self) -> None:
        lease = self.successResultOf(self.manager.acquire("a"))
        lease.release()
        lease = self.successResultOf(self.manager.acquire("b"))
        lease.release()
        self.assertEqual(self.events, ["start a", "stop a", "start b"])

    def test_next_request_waits_for_the_lease_of_the_current_one(self) -> None:
        first = self.successResultOf(self.manager.acquire("a"))
        second = self.manager.acquire("b")
        self.assertNoResult(second)
        self.assertEqual(self.events, ["start a"])
        first.release()
        self.successResultOf(second)
        self.assertEqual(self.events, ["start a", "stop a", "start b"])

    def test_startup_timeout_fails_the_request_and_stops_the_backend(self) -> None:
        self.backends["a"].healthy = False
        d = self.manager.acquire("a")
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        err = self.failureResultOf(d, APIError).value
        self.assertEqual(err.status, 504)
        self.assertIn("startup_timeout of 10 s", err.message)
        self.assertFalse(self.backends["a"].running)
        self.assertEqual(self.health()["models"]["a"]["state"], "failed")

    def test_queue_wait_times_out_with_504(self) -> None:
        self.successResultOf(self.manager.acquire("a"))  # held, never released
        waiting = self.manager.acquire("a")
        self.clock.advance(30)
        err = self.failureResultOf(waiting, APIError).value
        self.assertEqual((err.status, err.code), (504, "queue_timeout"))
        self.assertEqual(self.health()["queue_size"], 0)

    def test_each_waiting_request_times_out_request_timeout_after_it_arrived(self) -> None:
        self.successResultOf(self.manager.acquire("a"))  # held, never released
        first = self.manager.acquire("a")
        self.clock.advance(10)
        second = self.manager.acquire("a")
        self.clock.advance(20)  # t=30: the first waited 30 s, the second 20 s
        self.assertEqual(self.failureResultOf(first, APIError).value.code, "queue_timeout")
        self.assertNoResult(second)
        self.clock.advance(9.9)
        self.assertNoResult(second)
        self.clock.advance(0.1)
        self.assertEqual(self.failureResultOf(second, APIError).value.code, "queue_timeout")

    def test_a_reloaded_request_timeout_applies_to_requests_already_waiting(self) -> None:
        self.successResultOf(self.manager.acquire("a"))
        waiting = self.manager.acquire("a")
        self.clock.advance(10)
        shorter = attrs.evolve(self.manager.config, request_timeout=5)
        self.successResultOf(self.manager.reconfigure(shorter, {}))
        err = self.failureResultOf(waiting, APIError).value
        self.assertEqual(err.code, "queue_timeout")
        self.assertIn("waited 5 s (request_timeout)", err.message)

    def test_a_backend_gone_after_a_reload_removed_its_model_restarts_nothing(self) -> None:
        lease = self.successResultOf(self.manager.acquire("a"))
        only_b = {"b": {"backend_url": "http://b:1/v1", "cmd": "x", "startup_timeout": 10}}
        fresh = {"b": self.backends["b"]}
        removing = self.manager.reconfigure(parse({"models": only_b}), fresh)
        lease.release()
        self.assertEqual(self.successResultOf(removing)["removed"], ["a"])
        # The request that outlived the drain finds its backend gone: nothing is restarted.
        self.assertFalse(self.manager.backend_gone("a", "Model 'a' backend is unreachable"))
        self.assertTrue(self.manager.backend_gone("b", "Model 'b' backend is unreachable"))
        self.assertEqual(self.events, ["start a", "stop a"])

    def test_queue_full_raises_503(self) -> None:
        self.successResultOf(self.manager.acquire("a"))
        for model in ("a", "b"):
            self.manager.acquire(model).addErrback(lambda f: f.trap(APIError))
        with self.assertRaises(APIError) as ctx:
            self.manager.acquire("b")
        self.assertEqual(ctx.exception.status, 503)
        self.assertEqual(ctx.exception.message, "Queue full (2 requests). Try again later.")

    def test_cancelled_waiting_request_never_causes_a_swap(self) -> None:
        held = self.successResultOf(self.manager.acquire("a"))
        leaving = self.manager.acquire("b")
        leaving.cancel()
        self.failureResultOf(leaving)
        held.release()
        self.assertEqual(self.events, ["start a"])
        self.assertEqual(self.health()["queue_size"], 0)

    def test_a_fault_taking_one_request_answers_it_and_the_next_ones_go_on(self) -> None:
        def broken(*args: Any) -> None:
            raise ZeroDivisionError("a bug")

        unpatch = self.patch(policy, "on_arrival", broken)
        err = self.failureResultOf(self.manager.acquire("b"), APIError).value
        self.assertEqual((err.status, err.code), (500, "internal"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.health()["queue_size"], 0)
        unpatch.restore()
        due = [call.getTime() for call in self.clock.getDelayedCalls()]
        self.assertIn(self.clock.seconds(), due)  # a round is due at once, in a turn of its own
        self.successResultOf(self.manager.acquire("a")).release()
        self.successResultOf(self.manager.acquire("b")).release()
        self.assertEqual(self.events, ["start a", "stop a", "start b"])

    def test_backend_crash_is_reported_and_the_next_request_restarts_it(self) -> None:
        self.successResultOf(self.manager.acquire("a")).release()
        self.backends["a"].crash()
        health = self.health()
        self.assertEqual(health["models"]["a"]["state"], "failed")
        self.assertIn("exited with code 9", health["models"]["a"]["error"])
        self.assertIsNone(health["current_model"])
        self.successResultOf(self.manager.acquire("a")).release()
        self.assertEqual(self.events, ["start a", "start a"])

    def test_a_model_that_keeps_crashing_restarts_with_backoff_then_is_held_back(self) -> None:
        metrics = Metrics(self.manager.bus, self.manager.snapshot)
        starts = []
        for n in range(1, 6):
            self.successResultOf(self.manager.acquire("a")).release()
            starts.append(self.clock.seconds())
            self.clock.advance(5)  # it serves, then dies 5 s after it was ready
            self.backends["a"].crash()
            wait = restarts.FIRST * 2 ** (n - 2) if n > 1 else 0.0
            if n == 5:
                break
            # A request while its restart waits is answered at once, saying when to come back.
            if wait:
                err = self.refused("a")
                self.assertEqual(err.status, 503)
                self.assertEqual(err.headers["Retry-After"], str(int(wait)))
                self.assertEqual(
                    err.message,
                    f"Model 'a' failed {n} times in a row (last: backend exited with code 9); "
                    f"it starts again in {int(wait)} s",
                )
            self.clock.advance(wait)
        # Restarts one after another, never at once: 0, 1, 2, 4 s after each crash.
        gaps = [b - a - 5 for a, b in itertools.pairwise(starts)]
        self.assertEqual(gaps, [0.0, 1.0, 2.0, 4.0])
        self.assertEqual(self.events, ["start a"] * 5)
        # Five in a row: held back, shown failed with why, and tried again a while later.
        err = self.refused("a")
        self.assertEqual(
            err.message,
            "Model 'a' failed 5 times in a row and is held back (last: backend exited with code "
            "9); next try in 8 s",
        )
        self.assertEqual(self.health()["models"]["a"]["state"], "failed")
        self.clock.advance(8)
        self.successResultOf(self.manager.acquire("a")).release()
        self.assertEqual(self.events, ["start a"] * 6)
        scraped = samples(generate_latest(metrics.registry).decode())
        self.assertEqual(scraped[("llmswap_model_restarts_total", (("model", "a"),))], 5)

    def test_a_crash_after_a_long_run_restarts_at_once_and_an_admin_load_forgives(self) -> None:
        for _ in range(3):  # three quick crashes
            self.clock.advance(10)
            self.successResultOf(self.manager.acquire("a")).release()
            self.backends["a"].crash()
        self.refused("a")
        self.successResultOf(self.manager.load("a"))  # an admin's load starts it now
        self.clock.advance(restarts.STABLE)
        self.backends["a"].crash()  # after a good run: a first crash again
        self.successResultOf(self.manager.acquire("a")).release()
        self.assertEqual(self.events, ["start a"] * 5)

    def test_a_good_run_ended_by_an_unload_forgets_the_crashes_before_it(self) -> None:
        for _ in range(3):  # three quick crashes
            self.clock.advance(10)
            self.successResultOf(self.manager.acquire("a")).release()
            self.backends["a"].crash()
        self.clock.advance(10)
        self.successResultOf(self.manager.acquire("a")).release()
        self.clock.advance(restarts.STABLE)  # then it runs well, and is unloaded
        self.successResultOf(self.manager.unload("a"))
        self.successResultOf(self.manager.acquire("a")).release()
        self.backends["a"].crash()  # one crash after that is a first one: restarted at once
        self.successResultOf(self.manager.acquire("a")).release()
        self.assertEqual(self.events, ["start a"] * 4 + ["stop a"] + ["start a"] * 2)

    def test_a_load_that_keeps_failing_answers_its_requests_and_backs_off(self) -> None:
        self.backends["a"].healthy = False
        first = self.manager.acquire("a")
        self.clock.advance(10.1)  # startup_timeout
        self.failureResultOf(first, APIError)
        second = self.manager.acquire("a")  # the first restart is at once
        self.clock.advance(10.1)
        self.failureResultOf(second, APIError)
        err = self.refused("a")
        self.assertIn("Model 'a' failed 2 times in a row (last: Model 'a' ", err.message)
        self.assertEqual(err.headers["Retry-After"], "1")
        self.assertEqual(self.events, ["start a", "stop a", "start a", "stop a"])

    def test_a_backend_that_exits_while_it_loads_fails_its_request_at_once(self) -> None:
        self.backends["a"].healthy = False
        waiting = self.manager.acquire("a")
        self.clock.advance(0.05)  # between two readiness polls
        self.backends["a"].crash()
        err = self.failureResultOf(waiting, APIError).value  # no time passed
        self.assertEqual(err.status, 503)
        self.assertIn("exited with code 9", err.message)

    def test_stop_answers_waiting_requests_with_503(self) -> None:
        self.successResultOf(self.manager.acquire("a"))
        waiting = self.manager.acquire("b")
        self.manager.stopService()
        err = self.failureResultOf(waiting, APIError).value
        self.assertEqual(err.status, 503)
        self.assertFalse(self.backends["a"].running)


class SwapAwareTimingTests(ManagerCase):
    """The fairness bound on a Clock: the loaded model keeps its turn until another waited."""

    def setUp(self) -> None:
        self.start({"ttl": 100}, max_wait_before_swap=20, request_timeout=300)

    def test_requests_for_the_loaded_model_go_first_until_the_bound(self) -> None:
        lease = self.successResultOf(self.manager.acquire("a"))
        b = self.manager.acquire("b")
        served_a = 0
        # A steady stream of requests for a, one every 5 s, each taking 5 s.
        for _ in range(3):
            nxt = self.manager.acquire("a")
            self.clock.advance(5)
            lease.release()
            lease = self.successResultOf(nxt)
            served_a += 1
        self.assertNoResult(b)
        nxt = self.manager.acquire("a")
        self.clock.advance(5)  # b has now waited 20 s
        lease.release()
        self.successResultOf(b)
        self.assertEqual(self.events, ["start a", "stop a", "start b"])
        self.assertNoResult(nxt)  # a's latest request now waits for b's turn to end
        self.assertEqual(served_a, 3)
        self.manager.stopService()
        self.assertEqual(self.failureResultOf(nxt, APIError).value.status, 503)

    def test_idle_model_is_unloaded_after_its_ttl(self) -> None:
        self.successResultOf(self.manager.acquire("a")).release()
        self.clock.advance(99)
        self.assertTrue(self.backends["a"].running)
        self.clock.advance(1)
        self.assertFalse(self.backends["a"].running)
        self.assertEqual(self.manager.state("a"), "stopped")


class LearnedLingerTests(ManagerCase):
    """Models that load at once on a Clock, lingering 2 s (unbounded by their load time)."""

    def setUp(self) -> None:
        self.start({}, linger=2, linger_bound=False, max_wait_before_swap=60)

    def switch(self, model: str, client: str | None = None) -> float:
        """One request of a lone user for ``model``; how long it waited for it."""
        waiting, asked = self.manager.acquire(model, client=client), self.clock.seconds()
        while not waiting.called:
            self.clock.advance(0.1)
        self.successResultOf(waiting).release()
        return round(self.clock.seconds() - asked, 1)

    def test_a_lone_user_switching_models_soon_waits_for_no_linger(self) -> None:
        waits = [self.switch(m) for m in "abababab"]
        # Each switch is a bet that the follow-up comes; it never does.  The first ones, which
        # the prior alone would take, are not made to wait: each request for the other model
        # came after the answer, with nobody else waiting (the lone user, as far as anyone
        # can tell); then the bets lost say so.
        self.assertEqual(waits, [0.0] * 8)
        health = self.health()["models"]["a"]["linger"]
        self.assertEqual(health["seconds"], 0.0)
        self.assertEqual((health["paid"], health["wasted"]), (0, 4))  # each switch to b

    def test_a_lone_user_who_says_who_she_is_never_waits_for_a_linger(self) -> None:
        waits = [self.switch(m, client="ann") for m in "abababab"]
        self.assertEqual(waits, [0.0] * 8)

    def test_no_bet_where_lingering_changes_nothing(self) -> None:
        self.start({"memory": "1GiB"}, devices={"gpu": {"memory": "4GiB"}}, linger=2)
        waits = [self.switch(m) for m in "abab"]  # both fit: nobody waits for anybody
        self.assertEqual(waits, [0.0] * 4)
        linger = self.health()["models"]["a"]["linger"]
        self.assertEqual((linger["paid"], linger["wasted"]), (0, 0))

    def follow_ups(self, count: int, gap: float) -> tuple[Lease, Deferred[Lease]]:
        """a's user asks ``count`` times more, ``gap`` s after each answer, while b's user
        waits: a's last lease, and b's waiting request."""
        lease = self.successResultOf(self.manager.acquire("a"))
        b = self.manager.acquire("b")
        for _ in range(count):
            lease.release()
            self.clock.advance(gap)
            lease = self.successResultOf(self.manager.acquire("a"))
        return lease, b

    def test_lingering_that_pays_is_kept(self) -> None:
        lease, b = self.follow_ups(6, 0.5)
        self.assertNoResult(b)  # each follow-up came within the linger: no swap
        linger = self.health()["models"]["a"]["linger"]
        self.assertEqual((linger["paid"], linger["wasted"]), (6, 0))
        self.assertEqual(linger["seconds"], 1.5)  # three times what its follow-ups took
        scraped = samples(
            generate_latest(Metrics(self.manager.bus, self.manager.snapshot).registry).decode()
        )
        self.assertEqual(
            scraped[("llmswap_lingers_total", (("model", "a"), ("outcome", "paid")))], 6
        )
        lease.release()
        self.clock.advance(1.5)
        self.successResultOf(b).release()
        self.assertEqual(self.events, ["start a", "stop a", "start b"])

    def test_a_linger_lasts_as_long_as_its_follow_ups_take_to_come(self) -> None:
        # a's user asks again at once (an agent): once two follow-ups came within 0.01 s,
        # a lingers 0.03 s, not 2, when the next does not come.
        lease, b = self.follow_ups(3, 0.01)
        lease.release()
        self.clock.advance(0.029)
        self.assertEqual(self.events, ["start a"])
        self.clock.advance(0.002)
        self.assertEqual(self.events, ["start a", "stop a", "start b"])  # not 2 s later
        self.successResultOf(b).release()
        self.assertEqual(self.health()["models"]["a"]["linger"]["seconds"], 0.03)
