"""The surface's rules in memory: every route has its row, management paths however spelled,
the browser checks without keys, sessions bound to their key, and what a log line may hold.
(tests/test_security.py attacks the running daemon through real sockets.)"""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.web.iweb import IRequest
from twisted.web.test.requesthelper import DummyRequest

from llmswap import errors, surface
from llmswap.access import Caller, Gate
from llmswap.config.config import Console, parse
from llmswap.config.values import ConfigError
from llmswap.ollama.routes import OllamaRoutes
from llmswap.resource import OpenAIResource

ADMIN = "sk-admin-0123456789abcdefghij"
ROTATED = "sk-admin-rotated-0123456789ab"
USER = "sk-user-0123456789abcdefghijk"
MODELS = {"m": {"cmd": "x", "backend_url": "http://127.0.0.1:1/v1"}}
CONTAINERS = {"m": {"container_name": "m", "backend_url": "http://127.0.0.1:1/v1"}}


def _concrete(rule: str) -> str:
    """A path a werkzeug rule matches: each parameter as ``x``."""
    out, depth = "", 0
    for ch in rule:
        if ch == "<":
            depth += 1
            out += "x"
        elif ch == ">":
            depth -= 1
        elif not depth:
            out += ch
    return out


def test_every_route_of_the_tree_has_its_row() -> None:
    rules = [("", r) for r in OpenAIResource.app.url_map.iter_rules()]
    rules += [("/api", r) for r in OllamaRoutes.app.url_map.iter_rules()]
    missing = []
    for prefix, rule in rules:
        path = (prefix + _concrete(rule.rule)).encode()
        methods = sorted(rule.methods or ()) or ["GET"]
        for method in methods:
            if surface.route(method.encode(), path) is surface.UNKNOWN:
                missing.append(f"{method} {path.decode()}")
    assert missing == []


def test_the_rows_say_who_and_how_much() -> None:
    assert surface.route(b"POST", b"/v1/chat/completions").caller is Caller.KEY
    assert surface.route(b"POST", b"/v1/messages").shape is surface.Shape.ANTHROPIC
    assert surface.route(b"POST", b"/api/chat").shape is surface.Shape.OLLAMA
    assert surface.route(b"GET", b"/api/version").caller is Caller.ANYONE
    assert surface.route(b"POST", b"/admin/models/a/b/unload").caller is Caller.UNLOAD
    assert surface.route(b"POST", b"/admin/models/a/load").caller is Caller.ADMIN
    assert surface.route(b"DELETE", b"/upstream/m/x").caller is Caller.UPSTREAM
    assert surface.route(b"PUT", b"/v1/chat/completions") is surface.UNKNOWN
    config = parse({"models": MODELS, "max_body_bytes": 1000})
    form: Any = DummyRequest([b""])
    form.requestHeaders.setRawHeaders(b"content-type", [b"multipart/form-data; boundary=x"])
    route = surface.route(b"POST", b"/v1/audio/transcriptions")
    assert surface.limit(route, form, config) == (config.max_upload_bytes, "max_upload_bytes")
    assert surface.limit(route, cast(IRequest, DummyRequest([b""])), config) == (
        1000,
        "max_body_bytes",
    )
    assert surface.limit(surface.UNKNOWN, form, config)[0] == surface.SMALL_BYTES


@pytest.mark.parametrize(
    "path",
    ["/sleep", "/%73leep", "/%2573leep", "//sleep", "/./sleep", "/x/../sleep", "/SLEEP",
     "/sleep/", "/slots/0", "/collective_rpc", "/release_memory_occupation", "/lora-adapters"],
)  # fmt: skip
def test_management_routes_however_spelled(path: str) -> None:
    assert surface.management(path)


def test_what_is_not_management_and_what_is_inference() -> None:
    assert not surface.management("/v1/chat/completions")
    assert not surface.management("/props", b"GET")
    assert surface.management("/props", b"POST")
    assert not surface.management("/sleepy")
    assert surface.inference("/chat/completions")
    assert surface.inference("/v1/%63hat/completions", below_v1=False)
    assert not surface.inference("/files")
    assert not surface.inference("/chat/completions/../../files")
    assert not surface.inference("/chat/completions", below_v1=False)


def _request(
    host: str | None = "127.0.0.1",
    headers: dict[bytes, bytes] | None = None,
    method: bytes = b"GET",
    client: Any = None,
) -> Any:
    request: Any = DummyRequest([b"admin"])
    request.method = method
    request.client = client or IPv4Address("TCP", host or "127.0.0.1", 50000)
    cookies = {}
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
        if name == b"cookie":
            cookies.update(dict(c.strip().split(b"=", 1) for c in value.split(b";")))
    request.getCookie = cookies.get
    return request


def _code(gate: Gate, request: Any, caller: Caller = Caller.ADMIN) -> str | None:
    try:
        gate.require(request, caller)
    except errors.APIError as e:
        return e.code
    return None


def test_without_auth_admin_answers_only_to_this_machines_own_pages() -> None:
    gate = Gate(None, Clock(), Console(hosts=("gpubox.lan",)))
    for good in ({}, {b"host": b"127.0.0.1:8888"}, {b"host": b"localhost:8888"},
                 {b"host": b"[::1]:8888"}, {b"host": b"ui.localhost"},
                 {b"host": b"192.168.1.5:8888"}, {b"host": b"gpubox.lan:8888"},
                 {b"host": b"127.0.0.1:8888", b"origin": b"http://127.0.0.1:8888"}):  # fmt: skip
        assert _code(gate, _request(headers=good)) is None, good
    for bad, code in (
        ({b"host": b"evil.example:8888"}, "foreign_host"),
        ({b"host": b"127.0.0.1:8888", b"origin": b"http://evil.example"}, "cross_site_request"),
        ({b"host": b"127.0.0.1:8888", b"origin": b"null"}, "cross_site_request"),
        ({b"host": b"127.0.0.1:8888", b"origin": b"http://127.0.0.1:9999"}, "cross_site_request"),
    ):
        for caller in (Caller.ADMIN, Caller.UNLOAD, Caller.UPSTREAM):
            assert _code(gate, _request(headers=bad), caller) == code, bad
    assert _code(gate, _request("192.168.1.20")) == "admin_not_local"
    unix = UNIXAddress(b"/run/llmswap.sock")
    assert _code(gate, _request(client=unix)) == "admin_not_local"
    trusting = Gate(None, Clock(), Console(unix_is_loopback=True))
    assert _code(trusting, _request(client=unix)) is None
    opened = Gate(None, Clock(), Console(open=True))
    assert _code(opened, _request("192.168.1.20", {b"host": b"evil.example"})) == "foreign_host"


def _auth(admin_secret: str = ADMIN, **user: Any) -> Any:
    keys = [{"name": "ops", "key": admin_secret, "admin": True},
            {"name": "user", "key": USER, **user}]  # fmt: skip
    return parse({"models": MODELS, "auth": {"keys": keys}}).auth


def test_permissions_beyond_a_valid_key() -> None:
    user = {b"authorization": b"Bearer " + USER.encode()}
    gate = Gate(_auth(), Clock())
    assert _code(gate, _request(headers=user), Caller.UNLOAD) == "unload_not_allowed"
    assert _code(gate, _request(headers=user), Caller.UPSTREAM) == "upstream_not_allowed"
    gate = Gate(_auth(unload=True, upstream=True), Clock())
    assert _code(gate, _request(headers=user), Caller.UNLOAD) is None
    assert _code(gate, _request(headers=user), Caller.UPSTREAM) is None
    assert _code(gate, _request(headers=user), Caller.ADMIN) == "admin_required"


def _login(gate: Gate) -> dict[bytes, bytes]:
    token, _ = gate.open_session(_request(headers={b"authorization": b"Bearer " + ADMIN.encode()}))
    return {b"cookie": b"llmswap_session=" + token.encode()}


def test_a_session_ends_with_its_keys_secret_and_closes_its_streams() -> None:
    clock = Clock()
    gate = Gate(_auth(), clock)
    cookie = _login(gate)
    closed: list[str] = []
    gate.hold_open(_request(headers=cookie), lambda: closed.append("events"))
    assert _code(gate, _request("10.0.0.1", cookie)) is None
    gate.configure(_auth(), Console())  # a reload with the same secret: the session stays
    assert _code(gate, _request("10.0.0.1", cookie)) is None and closed == []
    gate.configure(_auth(ROTATED), Console())
    assert closed == ["events"]
    assert _code(gate, _request("10.0.0.1", cookie)) == "invalid_api_key"


def test_a_sessions_streams_close_at_logout_and_at_expiry() -> None:
    clock = Clock()
    gate = Gate(_auth(), clock)
    closed: list[str] = []
    cookie = _login(gate)
    gate.hold_open(_request(headers=cookie), lambda: closed.append("logs"))
    gate.close_session(_request(headers=cookie))
    assert closed == ["logs"]
    cookie = _login(gate)
    ended = gate.hold_open(_request(headers=cookie), lambda: closed.append("events"))
    finished_first = gate.hold_open(_request(headers=cookie), lambda: closed.append("gone"))
    finished_first()  # that stream ended by itself: nothing left to close
    clock.advance(8 * 3600)
    assert closed == ["logs", "events"]
    ended()
    assert clock.getDelayedCalls() == []


def test_a_key_in_a_header_is_the_callers_even_with_a_session_cookie() -> None:
    gate = Gate(_auth(upstream=True), Clock())
    both = {**_login(gate), b"authorization": b"Bearer " + USER.encode()}
    # The header's key decides (it needs no X-Requested-With: no other site can send it)...
    assert _code(gate, _request(headers=both), Caller.UPSTREAM) is None
    # ...and it is not an admin's, whatever the cookie says.
    assert _code(gate, _request(headers=both), Caller.ADMIN) == "admin_required"


def test_health_details_go_to_admins_or_everyone_with_open_health_full() -> None:
    admin = _request("10.0.0.1", {b"authorization": b"Bearer " + ADMIN.encode()})
    user = _request("10.0.0.1", {b"authorization": b"Bearer " + USER.encode()})
    gate = Gate(_auth(), Clock())
    assert gate.health_details(admin) and not gate.health_details(user)
    assert not gate.health_details(_request("10.0.0.1"))
    keys = [{"name": "ops", "key": ADMIN, "admin": True}]
    full = parse({"models": MODELS, "auth": {"keys": keys, "open_health": "full"}}).auth
    assert Gate(full, Clock()).health_details(_request("10.0.0.1"))
    without_auth = Gate(None, Clock())
    assert without_auth.health_details(_request("127.0.0.1"))
    assert not without_auth.health_details(_request("192.168.1.20"))
    with pytest.raises(ConfigError, match=r"open_health' must be one of true, false, full"):
        parse({"models": MODELS, "auth": {"keys": keys, "open_health": "some"}})


def test_client_text_in_a_log_line_or_an_error_is_escaped_and_capped() -> None:
    assert errors.printable("plain text, ünïcode") == "plain text, ünïcode"
    assert errors.printable("a\nb\rc\td\x1b[2J\u2028e") == "a\\nb\\rc\\td\\x1b[2J\\u2028e"
    assert errors.quote("x\n" * 300).startswith("x\\nx\\n")
    assert errors.quote("x\n" * 300).endswith("... (600 characters)")


@pytest.mark.parametrize("url", ["http://box:2375", "box:2375", "tcp://10.0.0.2:2375"])
def test_every_plain_tcp_spelling_to_another_box_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="plain TCP to another box"):
        parse({"models": CONTAINERS, "docker": {"base_url": url}})
    parse({"models": CONTAINERS, "docker": {"base_url": url, "insecure": True}})


def test_docker_host_from_the_environment_is_checked_too(monkeypatch: Any) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://box:2375")
    with pytest.raises(ConfigError, match="DOCKER_HOST tcp://box:2375 is plain TCP"):
        parse({"models": MODELS})
    monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
    parse({"models": MODELS})
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    monkeypatch.delenv("DOCKER_TLS_VERIFY")
    parse({"models": MODELS})


def test_backends_are_not_given_what_llmswap_reads(monkeypatch: Any) -> None:
    monkeypatch.setenv("REMOTE_KEY", "sk-remote-0123456789abcdef")
    monkeypatch.setenv("USER_KEY", USER)
    raw = {
        "models": {**MODELS, "r": {"remote": {"url": "https://x/v1", "key_env": "REMOTE_KEY"}}},
        "auth": {"keys": [{"name": "user", "key_env": "USER_KEY"}]},
    }
    hidden = parse(raw).hidden_env
    assert {"REMOTE_KEY", "USER_KEY", "DOCKER_HOST", "CREDENTIALS_DIRECTORY"} <= hidden
    assert "DOCKER_HOST" not in parse({**raw, "pass_env": ["DOCKER_HOST"]}).hidden_env
