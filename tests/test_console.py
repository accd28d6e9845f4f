"""The console's data routes and rules without a browser (test_console_browser.py has one)."""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from llmswap import errors
from llmswap.access import Gate
from llmswap.config.config import Console, parse
from llmswap.console.activity import Activity
from llmswap.console.live import INTERVAL, PENDING, LiveStreams
from llmswap.events import EventBus, RequestEnded
from llmswap.swap.snapshot import Snapshot
from tests.support import sleep, wait_for
from tests.test_daemon import DaemonTestCase

ADMIN = "sk-admin-0123456789abcdefghij"
USER = "sk-user-0123456789abcdefghijk"


def _request(host: str, method: bytes = b"GET", headers: dict[bytes, bytes] | None = None) -> Any:
    request: Any = DummyRequest([b"admin"])
    request.method = method
    request.client = IPv4Address("TCP", host, 50000)
    cookies = {}
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
        if name == b"cookie":
            cookies.update(dict(c.strip().split(b"=", 1) for c in value.split(b";")))
    request.getCookie = cookies.get  # as twisted.web's Request parses the header
    return request


def _keys() -> Any:
    models = {"m": {"cmd": "x", "backend_url": "http://127.0.0.1:1/v1"}}
    keys = [{"name": "ops", "key": ADMIN, "admin": True}, {"name": "user", "key": USER}]
    return parse({"models": models, "auth": {"keys": keys}}).auth


def test_without_auth_only_loopback_may_use_the_console_unless_it_is_opened() -> None:
    gate = Gate(None, Clock())
    gate.require_admin(_request("127.0.0.1"))
    gate.require_admin(_request("::1"))
    with pytest.raises(errors.APIError) as e:
        gate.require_admin(_request("192.168.1.20"))
    assert (e.value.status, e.value.code) == (403, "admin_not_local")
    assert "console.open: true" in e.value.message and "auth.keys" in e.value.message
    Gate(None, Clock(), Console(open=True)).require_admin(_request("192.168.1.20"))


def test_a_session_is_an_httponly_token_for_an_admin_key_and_changes_need_the_header() -> None:
    clock = Clock()
    gate = Gate(_keys(), clock)
    with pytest.raises(errors.APIError) as e:
        gate.open_session(
            _request("10.0.0.1", b"POST", {b"authorization": b"Bearer " + USER.encode()})
        )
    assert e.value.code == "admin_required"
    token, seconds = gate.open_session(
        _request("10.0.0.1", b"POST", {b"authorization": b"Bearer " + ADMIN.encode()})
    )
    assert ADMIN not in token and seconds == 8 * 3600
    cookie = {b"cookie": b"llmswap_session=" + token.encode()}
    gate.require_admin(_request("10.0.0.1", b"GET", cookie))
    with pytest.raises(errors.APIError) as e:  # a form on another site could post this
        gate.require_admin(_request("10.0.0.1", b"POST", cookie))
    assert e.value.code == "cross_site_request"
    gate.require_admin(_request("10.0.0.1", b"POST", {**cookie, b"x-requested-with": b"console"}))
    clock.advance(seconds)
    with pytest.raises(errors.APIError) as e:  # expired: back to needing a key
        gate.require_admin(_request("10.0.0.1", b"GET", cookie))
    assert e.value.status == 401


def _ended(at: float, model: str = "m", **kw: Any) -> RequestEnded:
    figures = {"first_byte": None, "prompt_tokens": 3, "completion_tokens": 6, **kw}
    return RequestEnded(at, "POST", "/v1/chat/completions", model, True, "-", False, 200,
                        0.5, 2.5, **figures)  # fmt: skip


def test_activity_filters_and_estimates_speed_when_the_backend_says_nothing() -> None:
    bus = EventBus()
    activity = Activity(bus, Clock(), Console(activity=3))
    for i, model in enumerate(["a", "b", "a", "a"]):
        bus.publish(_ended(float(i), model))
    rows = activity.recent()
    assert [r["at"] for r in rows] == [3.0, 2.0, 1.0]  # newest first, at most 3 kept
    assert [r["at"] for r in activity.recent(model="a")] == [3.0, 2.0]
    assert rows[0]["tokens_per_s"] == 3.0  # 6 tokens in the 2 s after the wait
    bus.publish(_ended(4.0, tokens_per_second=41.25))
    assert activity.recent()[0]["tokens_per_s"] == 41.2


class HistoryTests(unittest.TestCase):
    @inlineCallbacks
    def test_activity_survives_a_restart_through_sqlite(self) -> Any:
        path = os.path.abspath(self.mktemp())
        console = Console(history=path, activity=10)
        bus = EventBus()
        first = Activity(bus, reactor, console)
        first.startService()
        yield wait_for(lambda: first._db is not None)
        bus.publish(_ended(reactor.seconds(), "a"))
        bus.publish(_ended(reactor.seconds(), "b", console=True))  # the playground's
        yield first.stopService()  # flushes what is not written yet
        second = Activity(EventBus(), reactor, console)
        second.startService()
        self.addCleanup(second.stopService)
        yield wait_for(lambda: len(second.recent()) == 2)
        rows = second.recent()
        self.assertEqual([(r["model"], r["console"]) for r in rows], [("b", True), ("a", False)])

    @inlineCallbacks
    def test_a_history_file_of_an_earlier_llmswap_is_read_and_written_on(self) -> Any:
        path = os.path.abspath(self.mktemp())
        with sqlite3.connect(path) as old:  # its table without the console column
            old.execute(
                "CREATE TABLE activity (at REAL, path TEXT, model TEXT, key TEXT, status "
                "INTEGER, stream INTEGER, queue_wait REAL, ttft REAL, duration REAL, "
                "prompt_tokens INTEGER, completion_tokens INTEGER, tokens_per_s REAL)"
            )
            row = (reactor.seconds(), "/v1/chat/completions", "old", "-", 200, 0, 0.1, None,
                   0.2, 1, 2, None)  # fmt: skip
            old.execute(f"INSERT INTO activity VALUES ({', '.join('?' * len(row))})", row)
        old.close()
        bus = EventBus()
        activity = Activity(bus, reactor, Console(history=path, activity=10))
        activity.startService()
        yield wait_for(lambda: len(activity.recent()) == 1)
        self.assertEqual(activity.recent()[0]["console"], False)
        bus.publish(_ended(reactor.seconds(), "new", console=True))
        yield activity.stopService()
        with sqlite3.connect(path) as db:
            kept = db.execute("SELECT model, console FROM activity ORDER BY at").fetchall()
        db.close()
        self.assertEqual(kept, [("old", None), ("new", 1)])

    @inlineCallbacks
    def test_a_full_disk_neither_stops_the_history_nor_grows_memory(self) -> Any:
        path = os.path.abspath(self.mktemp())
        bus = EventBus()
        activity = Activity(bus, reactor, Console(history=path, activity=200))
        activity.startService()
        self.addCleanup(activity.stopService)
        yield wait_for(lambda: activity._db is not None)
        db = activity._db
        assert db is not None
        yield db.runOperation("PRAGMA max_page_count = 1")  # as full as a disk can be
        for i in range(500):
            bus.publish(_ended(reactor.seconds(), f"m{i}"))
        yield wait_for(lambda: activity._failing)  # SQLite: database or disk is full
        for i in range(500):
            bus.publish(_ended(reactor.seconds(), f"n{i}"))
        yield wait_for(lambda: len(activity._unsaved) == 200)  # the newest wait; no more
        yield db.runOperation("PRAGMA max_page_count = 100000")  # room again
        yield wait_for(lambda: not activity._failing and not activity._unsaved)
        yield activity.stopService()
        again = Activity(EventBus(), reactor, Console(history=path, activity=200))
        again.startService()
        self.addCleanup(again.stopService)
        yield wait_for(lambda: len(again.recent()) == 200)
        self.assertEqual(again.recent()[0]["model"], "n499")

    @inlineCallbacks
    def test_a_stop_during_the_start_leaves_nothing_running(self) -> Any:
        path = os.path.abspath(self.mktemp())
        first = Activity(EventBus(), reactor, Console(history=path, activity=10))
        first.startService()
        yield first.stopService()  # the database was still being opened and read
        second = Activity(EventBus(), reactor, Console(history=path, activity=10))
        second.startService()
        yield wait_for(lambda: bool(second._loops))  # by now the first's reads are long done
        yield second.stopService()
        self.assertEqual((first._db, first._loops), (None, []))  # no timer or pool outlives it


class _PushRequest(DummyRequest):  # type: ignore[misc]
    """DummyRequest models pull producers only (it loops on resumeProducing)."""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer


def test_consoles_share_one_bounded_payload_and_a_slow_one_is_told_to_resync() -> None:
    clock, bus = Clock(), EventBus()
    config = parse({"models": {"m": {"cmd": "x", "backend_url": "http://127.0.0.1:1/v1"}}})
    snap = Snapshot(0.0, True, "swap-aware", 50, 0, 0, (), {})
    streams = LiveStreams(bus, clock, lambda _: snap, lambda: config)
    assert not bus.wants(RequestEnded)  # nobody watching: the requests pay nothing
    fast: Any = _PushRequest([b""])
    slow: Any = _PushRequest([b""])
    streams.add(fast)
    streams.add(slow)
    assert fast.written[0].startswith(b"event: state\n")
    slow.producer.pauseProducing()  # its browser reads too slowly
    for i in range(PENDING * 3):
        bus.publish(_ended(float(i)))
    clock.advance(INTERVAL)
    events = b"".join(fast.written[1:]).split(b"\n\n")
    assert events[0] == b"event: resync\ndata: {}"  # more than PENDING rows: re-read them
    assert events[1].startswith(b"event: state\n")
    rows = json.loads(events[2].split(b"data: ", 1)[1])
    assert len(rows) == PENDING and rows[-1]["at"] == PENDING * 3 - 1
    assert len(slow.written) == 1  # nothing was held for it meanwhile
    slow.producer.resumeProducing()
    assert slow.written[1].startswith(b"event: resync\ndata: {}\n\nevent: state\n")
    fast.producer.stopProducing()
    slow.producer.stopProducing()
    assert not bus.wants(RequestEnded)
    assert clock.getDelayedCalls() == []


class ConsoleRoutesTests(DaemonTestCase):
    @inlineCallbacks
    def get(self, path: str, **kw: Any) -> Any:
        response = yield self.http.get(self.daemon.url + path, **kw)
        return response.code, (yield response.text())

    @inlineCallbacks
    def test_activity_logs_and_events_after_a_request(self) -> Any:
        self.start({"a": self.fake("a")})
        yield self.chat("a")
        code, text = yield self.get("/admin/activity?model=a")
        (row,) = json.loads(text)["activity"]
        self.assertEqual((code, row["status"], row["completion_tokens"]), (200, 200, 3))
        code, text = yield self.get("/admin/logs/a")
        self.assertIn('fake a: "POST /v1/chat/completions HTTP/1.1" 200', text)
        code, text = yield self.get("/admin/logs")
        self.assertIn("swap (none) -> a", text)
        code, text = yield self.get("/admin/logs/nope")
        self.assertEqual((code, json.loads(text)["error"]["code"]), (404, "model_not_found"))
        code, text = yield self.get("/admin/activity?status=x")
        self.assertEqual(code, 400)

    @inlineCallbacks
    def test_a_followed_backend_log_streams_new_lines(self) -> Any:
        self.start({"a": self.fake("a")})
        yield self.chat("a")
        url = self.daemon.url + "/admin/logs/a?follow=1&lines=0"
        response = yield self.http.get(url, unbuffered=True)
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        yield self.chat("a")
        yield wait_for(lambda: b"POST /v1/chat/completions" in b"".join(received))
        done.cancel()
        done.addErrback(lambda _: None)

    @inlineCallbacks
    def test_with_keys_no_key_no_data(self) -> Any:
        keys = [{"name": "ops", "key": ADMIN, "admin": True}, {"name": "user", "key": USER}]
        self.start({"a": self.fake("a")}, auth={"keys": keys})
        for path in ("/admin/activity", "/admin/events", "/admin/logs", "/admin/timeline"):
            code, _ = yield self.get(path)
            self.assertEqual(code, 401, path)
        code, _ = yield self.get("/admin/activity", headers={"Authorization": f"Bearer {USER}"})
        self.assertEqual(code, 403)
        code, page = yield self.get("/ui/")  # the page holds no data: it shows the login form
        self.assertEqual(code, 200)
        self.assertIn("Admin key", page)
        response = yield self.http.post(
            self.daemon.url + "/admin/session",
            headers=Headers({"Authorization": [f"Bearer {ADMIN}"]}),
        )
        cookie = response.headers.getRawHeaders("set-cookie")[0]
        self.assertRegex(
            cookie, r"^llmswap_session=[\w-]+; HttpOnly; SameSite=Strict; Path=/; Max-Age=28800$"
        )
        self.assertNotIn(ADMIN, cookie)
        token = cookie.split(";")[0]
        code, _ = yield self.get("/admin/activity", headers={"Cookie": token})
        self.assertEqual(code, 200)
        yield sleep(0)
