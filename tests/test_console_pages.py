"""The console's second round through real sockets: failed requests kept with what explains
them, the Config view (check at a line, apply with a backup and what changed), and the
playground's requests (an admin's browser session on the API routes, marked as the console's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from llmswap.config import secrets
from llmswap.config.config import Console, load
from llmswap.console.failures import Failures
from llmswap.events import EventBus, RequestEnded
from tests.support import Daemon, sleep, wait_for
from tests.test_console import ADMIN, USER
from tests.test_daemon import DaemonTestCase, broken_stream

CONSOLE = {"X-Requested-With": ["llmswap-console"]}


class ConsolePagesTests(DaemonTestCase):
    @inlineCallbacks
    def call(self, method: str, path: str, body: Any = None, **headers: str) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        response = yield self.http.request(
            method, self.daemon.url + path, data=data,
            headers=Headers({k.replace("_", "-"): [v] for k, v in headers.items()}),
        )  # fmt: skip
        text = yield response.text()
        return response.code, json.loads(text) if text.startswith("{") else text

    def from_file(self, raw: dict[str, Any]) -> Path:
        path = Path(self.mktemp()).resolve()
        path.mkdir()
        config = path / "llmswap.yaml"
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.daemon = Daemon.from_config(load(config), str(path / "logs"))
        self.daemon.start()
        self.addCleanup(self.daemon.stop)
        return config

    # -- failed requests --------------------------------------------------------------------

    @inlineCallbacks
    def test_a_failed_request_is_kept_with_its_request_answer_state_and_backend_output(
        self,
    ) -> Any:
        self.start({"a": self.fake("a"), "crashy": self.fake("crashy", crash_after=2)})
        yield self.chat("a")
        sent = {"model": "a", "messages": [{"role": "user", "content": "why?"}], "fake_status": 500}
        response = yield self.post("/v1/chat/completions", sent)
        self.assertEqual(response.code, 500)
        yield broken_stream(self, "crashy")  # cut mid-stream: status 0
        yield self.post("/v1/chat/completions", {"model": "nope"})  # llmswap's own 404
        yield wait_for(lambda: len(self.daemon.service.health()["models"]) == 2)

        def kept() -> list[dict[str, Any]]:
            return self.failures  # type: ignore[no-any-return]

        @inlineCallbacks
        def read() -> Any:
            code, body = yield self.call("GET", "/admin/failures")
            self.assertEqual(code, 200)
            self.failures = body["failures"]

        for _ in range(200):
            yield read()
            if len(kept()) == 3 and all(f["output"] is not None for f in kept()[1:]):
                break
            yield sleep(0.05)
        unknown, cut, teapot = kept()  # newest first
        self.assertEqual((unknown["status"], unknown["model"]), (404, "nope"))
        self.assertIn("The model 'nope' does not exist", unknown["error"])
        self.assertIsNone(unknown["state"])
        self.assertEqual(
            (cut["status"], cut["model"], cut["path"]), (0, "crashy", "/v1/chat/completions")
        )
        self.assertEqual(json.loads(cut["request"])["stream"], True)
        self.assertEqual(teapot["status"], 500)
        self.assertEqual(json.loads(teapot["request"]), sent)  # the body as sent
        self.assertIn("fake failure", teapot["answer"])  # the backend's own error body
        self.assertEqual(teapot["state"], {"state": "ready", "error": None})
        self.assertTrue(any('"POST /v1/chat/completions HTTP/1.1" 500' in line
                            for line in teapot["output"]), teapot["output"])  # fmt: skip
        # The Activity row it belongs to has the same time.
        _code, body = yield self.call("GET", "/admin/activity?status=500")
        self.assertEqual(body["activity"][0]["at"], teapot["at"])

    @inlineCallbacks
    def test_failed_requests_survive_a_restart_in_the_history_the_newest_kept(self) -> Any:
        history = os.path.abspath(self.mktemp())
        console = Console(history=history, failures=3)
        first = Failures(EventBus(), reactor, console, lambda m: None, lambda m, n: None)
        first.startService()
        yield wait_for(lambda: first._db is not None)
        for i in range(5):
            first._ended(failed_event(reactor.seconds(), i))
        yield first.stopService()  # waits for its writes
        second = Failures(EventBus(), reactor, console, lambda m: None, lambda m, n: None)
        second.startService()
        self.addCleanup(second.stopService)
        yield wait_for(lambda: second._db is not None)
        self.assertEqual([f["model"] for f in second.recent()], ["m4", "m3", "m2"])
        self.assertEqual(second.recent()[0]["request"], '{"model": "m4"}')

    # -- the Config view --------------------------------------------------------------------

    @inlineCallbacks
    def test_config_is_shown_without_its_secrets_checked_at_a_line_and_applied(self) -> Any:
        fake_a = self.fake("a")
        fake_a["env"] = {"HTTP_PROXY": "http://proxy:url-cred-9f8e7d@127.0.0.1:9"}
        raw = {"models": {"a": fake_a},
               "auth": {"keys": [{"name": "ops", "key": ADMIN, "admin": True},
                                 {"name": "user", "key": USER}]}}  # fmt: skip
        path = self.from_file(raw)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        code, _ = yield self.call("GET", "/admin/config", Authorization=f"Bearer {USER}")
        self.assertEqual(code, 403)
        code, shown = yield self.call("GET", "/admin/config", **admin)
        self.assertEqual(code, 200)
        self.assertNotIn(ADMIN, json.dumps(shown))
        self.assertNotIn(USER, json.dumps(shown))
        self.assertNotIn("url-cred-9f8e7d", json.dumps(shown))  # nor in the running lines
        self.assertEqual(shown["text"].count(secrets.MASK), 3)
        in_file = "the configuration file"
        self.assertEqual(shown["keys"], [{"name": "ops", "from": in_file},
                                         {"name": "user", "from": in_file}])  # fmt: skip
        self.assertTrue(
            shown["running"][0].endswith("OK, 1 models, listen tcp:0:interface=127.0.0.1")
        )

        # An error is refused at its line; the file is untouched.
        bad = shown["text"].replace("  a:\n", "  a:\n    ttll: 5\n", 1)
        code, verdict = yield self.call("POST", "/admin/config/check", {"text": bad}, **admin)
        line = bad.splitlines().index("    ttll: 5") + 1
        self.assertEqual((code, verdict["ok"], verdict["problems"][0]["line"]), (200, False, line))
        before = path.read_text()
        code, refused = yield self.call("POST", "/admin/config/apply", {"text": bad}, **admin)
        self.assertEqual((code, refused["error"]["code"]), (400, "invalid_config"))
        self.assertIn(f"line {line}: unknown key 'models.a.ttll'", refused["error"]["message"])
        self.assertEqual(path.read_text(), before)

        # A valid edit: a model added, the loaded one changed (restarted), the secrets kept.
        yield self.post("/v1/chat/completions", {"model": "a"}, headers=admin)
        fake_b = yaml.safe_dump({"b": self.fake("b")})
        good = (
            shown["text"]
            .replace("  a:\n", "  a:\n    ttl: 77\n", 1)
            .replace("auth:", "".join(f"  {line}\n" for line in fake_b.splitlines()) + "auth:", 1)
        )
        code, verdict = yield self.call("POST", "/admin/config/check", {"text": good}, **admin)
        self.assertEqual((code, verdict["ok"], verdict["models"]), (200, True, ["a", "b"]))
        code, applied = yield self.call("POST", "/admin/config/apply", {"text": good}, **admin)
        self.assertEqual(code, 200, applied)
        self.assertEqual(applied["changes"], {"added": ["b"], "removed": [], "changed": ["a"],
                                              "restarted": ["a"]})  # fmt: skip
        self.assertEqual(Path(applied["backup"]).read_text(), before)
        written = yaml.safe_load(path.read_text())
        self.assertEqual([k["key"] for k in written["auth"]["keys"]], [ADMIN, USER])
        self.assertEqual(written["models"]["a"]["ttl"], 77)
        health = yield self.health()
        self.assertEqual(sorted(health["models"]), ["a", "b"])

    @inlineCallbacks
    def test_without_auth_the_config_is_shown_read_only_unless_the_owner_says_so(self) -> Any:
        path = self.from_file({"models": {"a": self.fake("a")}})  # edit_config: auth, no auth
        code, shown = yield self.call("GET", "/admin/config")
        self.assertEqual((code, shown["editable"], shown["text"]), (200, False, ""))
        self.assertIn("OK, 1 models", shown["running"][0])
        before = path.read_text()
        for action in ("check", "apply"):  # a check reads files too: not here either
            code, body = yield self.call("POST", f"/admin/config/{action}", {"text": before},
                                         X_Requested_With="llmswap-console")  # fmt: skip
            self.assertEqual((code, body["error"]["code"]), (403, "config_read_only"))
            self.assertIn("console.edit_config is auth and there is no auth section",
                          body["error"]["message"])  # fmt: skip
        self.assertEqual(path.read_text(), before)

    @inlineCallbacks
    def test_an_error_quotes_no_text_of_a_file_it_read(self) -> Any:
        path = self.from_file({"models": {"a": self.fake("a")}, "console": {"edit_config": True}})
        beside = path.with_name("models.yaml")  # in the configuration's directory: read
        beside.write_text("aws_access_key_id = AKIAEXAMPLEEXAMPLE\n[unclosed: {\n")
        text = path.read_text() + "include: [models.yaml]\n"
        code, verdict = yield self.call("POST", "/admin/config/check", {"text": text},
                                        X_Requested_With="llmswap-console")  # fmt: skip
        self.assertEqual((code, verdict["ok"]), (200, False))
        (problem,) = verdict["problems"]
        self.assertNotIn("AKIA", problem["message"])
        self.assertRegex(problem["message"], r"is not valid YAML at line \d+, column \d+: ")
        self.assertIsNone(problem["line"])  # a line of another file, not of this text
        code, body = yield self.call("POST", "/admin/config/check", {"txt": 1})
        self.assertEqual((code, body["error"]["param"]), (400, "text"))

    # -- the playground's requests ------------------------------------------------------------

    @inlineCallbacks
    def test_the_playground_uses_the_session_on_the_api_and_is_marked_as_the_console(
        self,
    ) -> Any:
        keys = [{"name": "ops", "key": ADMIN, "admin": True}]
        self.start({"a": self.fake("a")}, auth={"keys": keys})
        response = yield self.http.post(
            self.daemon.url + "/admin/session",
            headers=Headers({"Authorization": [f"Bearer {ADMIN}"]}),
        )
        cookie = response.headers.getRawHeaders("set-cookie")[0].split(";")[0]
        chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
        # The cookie alone (a form on another site could send it): no key.
        code, body = yield self.call("POST", "/v1/chat/completions", chat, Cookie=cookie)
        self.assertEqual(code, 401)
        code, body = yield self.call("POST", "/v1/chat/completions", chat, Cookie=cookie,
                                     X_Requested_With="llmswap-console",
                                     Origin="http://elsewhere.example")  # fmt: skip
        self.assertEqual(code, 403)
        code, body = yield self.call("POST", "/v1/chat/completions", chat, Cookie=cookie,
                                     X_Requested_With="llmswap-console")  # fmt: skip
        self.assertEqual((code, body["choices"][0]["message"]["content"]), (200, "Hello from a"))
        # A session does not open another.
        code, body = yield self.call("POST", "/admin/session", Cookie=cookie,
                                     X_Requested_With="llmswap-console")  # fmt: skip
        self.assertEqual(code, 401)
        yield wait_for(lambda: bool(self.daemon.service.manager.snapshot().instances))

        @inlineCallbacks
        def rows() -> Any:
            _code, body = yield self.call("GET", "/admin/activity?status=200", Cookie=cookie)
            return body["activity"]

        for _ in range(100):
            found = yield rows()
            if found:
                break
            yield sleep(0.05)
        self.assertEqual([(r["key"], r["console"]) for r in found], [("ops", True)])


def failed_event(at: float, i: int) -> RequestEnded:
    return RequestEnded(
        at=at + i, method="POST", path="/v1/chat/completions", model=f"m{i}",
        configured=False, key="-", stream=False, status=502, queue_wait=0.0, duration=0.1,
        first_byte=None, error="Model backend is unreachable", sent=b'{"model": "m%d"}' % i,
    )  # fmt: skip


def reading_failures(console: Console) -> tuple[Failures, list[Deferred[list[str]]], Clock]:
    """The failed-requests list on a Clock, and each read of a backend's output it starts."""
    reads: list[Deferred[list[str]]] = []

    def output(model: str, lines: int) -> Deferred[list[str]]:
        reads.append(Deferred())
        return reads[-1]

    clock = Clock()
    return Failures(EventBus(), clock, console, lambda m: None, output), reads, clock


def test_a_flood_of_failures_shares_one_read_of_the_output_and_caps_its_lines() -> None:
    failures, reads, clock = reading_failures(Console(failures=3))
    for i in range(10):
        failures._ended(attrs.evolve(failed_event(clock.seconds(), i), model="a", configured=True))
    assert len(reads) == 1  # one read under way serves every failure meanwhile
    reads[0].callback(["x" * 5000, "last"])
    kept = failures.recent()
    assert [f["request"] for f in kept] == ['{"model": "m9"}', '{"model": "m8"}', '{"model": "m7"}']
    assert all(f["output"] == ["x" * 500, "last"] for f in kept)
    failures._ended(attrs.evolve(failed_event(clock.seconds(), 10), model="a", configured=True))
    assert len(reads) == 2  # the next failure reads the output of its own moment
    reads[1].errback(OSError("gone"))
    assert failures.recent(1)[0]["output"] == [
        "[llmswap: the backend's output could not be read: gone]"
    ]
    ignored, _, _ = reading_failures(Console(failures=0))
    ignored._ended(failed_event(clock.seconds(), 0))
    assert ignored.recent() == []  # console.failures: 0 keeps no prompt anywhere


def test_a_stop_waits_for_a_read_of_output_under_way_and_leaves_no_timer() -> None:
    failures, reads, clock = reading_failures(Console(failures=3))
    failures.startService()
    failures._ended(attrs.evolve(failed_event(clock.seconds(), 0), model="a", configured=True))
    stopped = failures.stopService()
    assert not stopped.called  # the failure is kept with its output, read before the stop
    # One the shutdown answers meanwhile (another model's) is kept without a read.
    failures._ended(attrs.evolve(failed_event(clock.seconds(), 1), model="b", configured=True))
    assert len(reads) == 1 and failures.recent()[0]["output"] is None
    reads[0].callback(["the last line"])
    assert stopped.called and failures.recent()[1]["output"] == ["the last line"]
    assert clock.getDelayedCalls() == []  # the read's timeout went with it
