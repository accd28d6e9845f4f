"""The resource tree in memory (treq.testing.StubTreq): routing and every client-side error."""

from __future__ import annotations

import json
from typing import Any, cast

from klein import Klein
from klein.interfaces import IKleinRequest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from llmswap.access import Gate
from llmswap.accesslog import AccessLog
from llmswap.bodies import parse_body
from llmswap.config.config import Config, parse
from llmswap.events import EventBus
from llmswap.headers import CLIENT_CHARS, client_of
from llmswap.metrics import Metrics
from llmswap.proxy import Proxy, _forget_routing
from llmswap.relay.forward import Relay
from llmswap.resource import OpenAIResource
from llmswap.service import make_backends
from llmswap.swap.manager import SwapManager
from llmswap.testing import MemoryHTTP

SEED_HEALTH_KEYS = {"status", "current_model", "queue_size", "queue_capacity", "message"}


def stub_api(config: Config, clock: Clock) -> Any:
    """The daemon's resource tree over a manager that was never started (no backend runs)."""
    bus = EventBus()
    manager = SwapManager(config, make_backends(config, clock), MemoryHTTP({}), clock, bus)
    gate = Gate(config.auth, clock)
    proxy: Proxy[None] = Proxy(manager, Relay(None, clock, 1.0), gate, bus, clock)
    api = OpenAIResource(manager, proxy, gate, Metrics(bus, manager.snapshot), clock)
    AccessLog(clock, bus)  # not started: it passes each line on at once
    return StubTreq(api.resource())


class StubCase(unittest.TestCase):
    stub: Any

    def request(
        self, method: str, path: str, body: bytes | None = None, key: str | None = None
    ) -> tuple[int, Any, Any]:
        headers = {"Authorization": [f"Bearer {key}"]} if key else {}
        d = self.stub.request(method, "http://llmswap" + path, data=body, headers=headers)
        self.stub.flush()
        response = self.successResultOf(d)
        payload = self.successResultOf(response.content())
        return response.code, response.headers, json.loads(payload)

    def assert_error(self, result: tuple[int, Any, Any], status: int, code: str) -> str:
        got_status, headers, body = result
        self.assertEqual(got_status, status)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})
        self.assertEqual(body["error"]["code"], code)
        return str(body["error"]["message"])


class APITests(StubCase):
    def setUp(self) -> None:
        self.clock = clock = Clock()
        self.config = parse(
            {
                "max_body_bytes": 200,
                "queue_size": 7,
                "models": {
                    "qwen3": {"backend_url": "http://127.0.0.1:9/v1", "cmd": "true"},
                    "gemma": {"backend_url": "http://127.0.0.1:9/v1", "cmd": ["true"]},
                },
            }
        )
        self.stub = stub_api(self.config, clock)

    def test_models_lists_configured_names_owned_by_local(self) -> None:
        status, _, body = self.request("GET", "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual(body["object"], "list")
        self.assertEqual(
            [(m["id"], m["owned_by"]) for m in body["data"]],
            [("qwen3", "local"), ("gemma", "local")],
        )

    def test_health_keeps_the_seed_keys_and_adds_model_states(self) -> None:
        status, _, body = self.request("GET", "/health")
        self.assertEqual(status, 200)
        self.assertLessEqual(SEED_HEALTH_KEYS, set(body))
        self.assertEqual(body["queue_capacity"], 7)
        self.assertEqual(body["queue_size"], 0)
        self.assertIsNone(body["current_model"])
        self.assertEqual(
            {m: s["state"] for m, s in body["models"].items()},
            {"qwen3": "stopped", "gemma": "stopped"},
        )

    def test_malformed_json_is_400(self) -> None:
        message = self.assert_error(
            self.request("POST", "/v1/chat/completions", b'{"model": "qwen3",'), 400, "invalid_json"
        )
        self.assertIn("not valid JSON", message)

    def test_non_object_body_is_400(self) -> None:
        self.assert_error(
            self.request("POST", "/v1/chat/completions", b"[1, 2]"), 400, "invalid_json"
        )

    def test_missing_model_is_400(self) -> None:
        message = self.assert_error(
            self.request("POST", "/v1/chat/completions", b'{"messages": []}'),
            400,
            "missing_required_parameter",
        )
        self.assertIn("'model'", message)

    def test_model_of_wrong_type_is_400(self) -> None:
        self.assert_error(
            self.request("POST", "/v1/embeddings", b'{"model": 3}'), 400, "invalid_type"
        )

    def test_unknown_model_is_404_listing_valid_names(self) -> None:
        message = self.assert_error(
            self.request("POST", "/v1/chat/completions", b'{"model": "llama"}'),
            404,
            "model_not_found",
        )
        self.assertIn("'llama'", message)
        self.assertIn("gemma, qwen3", message)

    def test_access_line_shows_the_clients_model_name_as_sent(self) -> None:
        with capturedLogs() as events:
            self.request("POST", "/v1/chat/completions", b'{"model": "{x} {0} }{"}')
            self.clock.advance(0)  # the line is written after the answer has gone out
            self.clock.advance(0)
        (line,) = [e for e in events if e["log_namespace"] == "llmswap.access"]
        self.assertEqual(
            formatEvent(line),
            "POST /v1/chat/completions model={x} {0} }{ key=- stream=False status=404 "
            "queue_wait=0.000s duration=0.000s",
        )
        self.assertEqual((line["model"], line["status"]), ("{x} {0} }{", 404))

    def test_body_over_limit_is_413(self) -> None:
        body = json.dumps({"model": "qwen3", "prompt": "x" * 300}).encode()
        message = self.assert_error(
            self.request("POST", "/v1/completions", body), 413, "request_too_large"
        )
        self.assertIn("max_body_bytes", message)

    def test_unknown_endpoint_is_404(self) -> None:
        self.assert_error(self.request("GET", "/v2/things"), 404, "unknown_url")

    def test_wrong_method_is_405_with_allow(self) -> None:
        status, headers, body = self.request("GET", "/v1/chat/completions")
        self.assert_error((status, headers, body), 405, "method_not_allowed")
        self.assertIn("POST", headers.getRawHeaders("allow")[0])

    def test_request_when_not_running_is_503_not_a_hang(self) -> None:
        # The manager service was never started: the answer is a clear 503 with Retry-After.
        status, headers, body = self.request("POST", "/v1/chat/completions", b'{"model": "gemma"}')
        self.assert_error((status, headers, body), 503, "backend_unavailable")
        self.assertEqual(headers.getRawHeaders("retry-after"), ["5"])


ALICE = "sk-alice-0123456789abcdefghij"
ROOT_KEY = "sk-root-0123456789abcdefghijk"


class AccessTests(StubCase):
    """Keys, models per key, admin rights and rate limits, as clients see them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.config = parse(
            {
                "models": {
                    "qwen3": {"backend_url": "http://127.0.0.1:9/v1", "cmd": "true"},
                    "gemma": {"backend_url": "http://127.0.0.1:9/v1", "cmd": "true"},
                },
                "auth": {
                    "open_health": False,
                    "keys": [
                        {"name": "alice", "key": ALICE, "models": ["gemma"], "rpm": 2},
                        {"name": "root", "key": ROOT_KEY, "admin": True},
                    ],
                },
            }
        )
        self.stub = stub_api(self.config, self.clock)

    def chat(self, key: str | None, model: str = "gemma") -> tuple[int, Any, Any]:
        return self.request(
            "POST", "/v1/chat/completions", json.dumps({"model": model}).encode(), key
        )

    def test_missing_or_wrong_key_is_401_and_never_echoed(self) -> None:
        message = self.assert_error(self.chat(None), 401, "invalid_api_key")
        self.assertIn("Authorization: Bearer", message)
        wrong = "sk-wrong-0123456789abcdefghij"
        message = self.assert_error(self.chat(wrong), 401, "invalid_api_key")
        self.assertNotIn(wrong, message)
        d = self.stub.post(
            "http://llmswap/v1/chat/completions", data=b'{"model": "gemma"}',
            headers={"x-api-key": [ALICE]},
        )  # fmt: skip
        self.stub.flush()
        self.assertNotEqual(self.successResultOf(d).code, 401)

    def test_model_outside_the_keys_list_is_403_and_hidden_from_models(self) -> None:
        self.assert_error(self.chat(ALICE, "qwen3"), 403, "model_not_allowed")
        _, _, body = self.request("GET", "/v1/models", key=ALICE)
        self.assertEqual([m["id"] for m in body["data"]], ["gemma"])
        _, _, body = self.request("GET", "/v1/models", key=ROOT_KEY)
        self.assertEqual([m["id"] for m in body["data"]], ["qwen3", "gemma"])

    def test_admin_routes_need_an_admin_key(self) -> None:
        self.assert_error(self.request("POST", "/admin/unload"), 401, "invalid_api_key")
        self.assert_error(
            self.request("POST", "/admin/unload", key=ALICE), 403, "unload_not_allowed"
        )
        self.assert_error(
            self.request("POST", "/admin/models/gemma/load", key=ALICE), 403, "admin_required"
        )

    def test_health_can_require_a_key(self) -> None:
        self.assert_error(self.request("GET", "/health"), 401, "invalid_api_key")
        status, _, _ = self.request("GET", "/health", key=ALICE)
        self.assertEqual(status, 200)

    def test_requests_per_minute_get_429_with_retry_after(self) -> None:
        for _ in range(2):  # the bucket allows the burst (the manager is not running: 503)
            self.assertEqual(self.chat(ALICE)[0], 503)
        result = self.chat(ALICE)
        self.assert_error(result, 429, "rate_limit_exceeded")
        self.assertEqual(result[1].getRawHeaders("retry-after"), ["30"])
        self.clock.advance(30)
        self.assertEqual(self.chat(ALICE)[0], 503)
        self.assertEqual(self.chat(ROOT_KEY)[0], 503)  # other keys are not affected


class HostileInputTests(StubCase):
    """What a client can send must come back as a 4xx with a bounded message, never a 500."""

    def setUp(self) -> None:
        config = parse({"models": {"m": {"backend_url": "http://127.0.0.1:9/v1", "cmd": "x"}}})
        self.stub = stub_api(config, Clock())

    def test_json_nested_deeper_than_python_recurses_is_invalid_json(self) -> None:
        body = b"[" * 200_000 + b"]" * 200_000
        message = self.assert_error(
            self.request("POST", "/v1/chat/completions", body), 400, "invalid_json"
        )
        self.assertIn("nested too deeply", message)

    def test_a_huge_unknown_model_name_is_not_echoed_whole(self) -> None:
        name = "x" * 200_000
        body = json.dumps({"model": name}).encode()
        message = self.assert_error(
            self.request("POST", "/v1/chat/completions", body), 404, "model_not_found"
        )
        self.assertIn("x" * 200 + "... (200000 characters)", message)
        self.assertLess(len(message), 400)


class RoutingMemoryTests(unittest.TestCase):
    def test_a_waiting_request_keeps_nothing_of_its_routing(self) -> None:
        """Klein keeps a URL map adapter on each request (about 0.6 KB); a request that waits
        in the queue for minutes drops it.  A Klein that keeps it elsewhere fails here."""
        app, seen = Klein(), {}

        def kept(request: Any) -> list[object]:
            # Componentized's cache of adapters (getComponent would make a fresh one).
            return [a for a in request._adapterCache.values() if IKleinRequest.providedBy(a)]

        @app.route("/v1/chat/completions", methods=["POST"])
        def route(request: Any) -> bytes:
            seen["klein's"] = kept(request)
            _forget_routing(request)
            seen["after"] = kept(request)
            return b"queued"

        response = self.successResultOf(
            cast(Any, StubTreq(app.resource())).post(
                "http://127.0.0.1/v1/chat/completions", data=b"{}"
            )
        )
        self.assertEqual(self.successResultOf(response.content()), b"queued")
        self.assertEqual(len(seen["klein's"]), 1)
        self.assertEqual(seen["after"], [])


def test_who_asks_is_open_webuis_forwarded_user_else_the_bodys_user_else_unknown() -> None:
    said = parse_body(b'{"model": "m", "user": "ann"}', 100)[2]
    assert said == "ann"
    assert parse_body(b'{"model": "m", "user": 7}', 100)[2] is None
    request: Any = DummyRequest([b""])
    assert client_of(request, said) == "ann"
    assert client_of(request, None) is None
    request.requestHeaders.setRawHeaders(b"x-openwebui-user-id", [b"u-42"])
    assert client_of(request, said) == "u-42"
    request.requestHeaders.setRawHeaders(b"x-openwebui-user-id", [b"x" * 1000])
    assert client_of(request, None) == "x" * CLIENT_CHARS
