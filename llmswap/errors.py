"""OpenAI-shaped errors, all built here.

Every failure a client can see is an :class:`APIError`; the resource tree renders it as
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status, so the ``openai`` SDK
raises the matching exception class and shows the message instead of a traceback or a hang.
Client text quoted in a message (a model name, a header) goes through :func:`quote`, so a 200 KB
"model name" is not echoed back whole.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed

# Characters of client text an error message quotes at most.
QUOTE_LIMIT = 200


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Client text as an error message (or a log line) may show it: at most ``limit``
    characters, control characters escaped."""
    if len(text) <= limit:
        return printable(text)
    return f"{printable(text[:limit])}... ({len(text)} characters)"


# Line breaks and other control characters, as Python escapes them: client text in a log line
# cannot start a line of its own (a forged entry) or move a terminal's cursor.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, 0x85)} | {
    0x2028: "\\u2028", 0x2029: "\\u2029", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}  # fmt: skip


def printable(text: str) -> str:
    """``text`` with its control characters escaped."""
    return text if text.isprintable() else text.translate(_CONTROLS)


@attrs.define(eq=False)
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    headers: dict[str, str] = attrs.field(factory=dict)
    param: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> bytes:
        return json.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        ).encode()


def render(request: IRequest, err: APIError) -> bytes:
    """Set ``err``'s status and headers on ``request``; the body to write (OpenAI's shape)."""
    _status(request, err)
    return err.body()


def render_ollama(request: IRequest, err: APIError) -> bytes:
    """The same in Ollama's shape, ``{"error": "..."}``, which its clients raise."""
    _status(request, err)
    return ollama_body(err)


def ollama_body(err: APIError) -> bytes:
    return json.dumps({"error": err.message}).encode()


# Anthropic's error types, by status (its clients raise by status and show the message).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    503: "overloaded_error", 504: "api_error",
}  # fmt: skip


def render_anthropic(request: IRequest, err: APIError) -> bytes:
    """The same in Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``."""
    _status(request, err)
    return anthropic_body(err)


def anthropic_body(err: APIError) -> bytes:
    kind = _ANTHROPIC_TYPES.get(err.status, "api_error")
    return json.dumps({"type": "error", "error": {"type": kind, "message": err.message}}).encode()


def _status(request: IRequest, err: APIError) -> None:
    request.setResponseCode(err.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in err.headers.items():
        request.setHeader(name.encode(), value.encode())


# -- 4xx: the request --------------------------------------------------------------------------


def _client(status: int, message: str, code: str, **kw: Any) -> APIError:
    return APIError(status, message, "invalid_request_error", code, **kw)


def _server(status: int, message: str, code: str, **kw: Any) -> APIError:
    return APIError(status, message, "server_error", code, **kw)


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return _client(400, message, code, param=param)


def too_large(size: int | None, limit: int, setting: str = "max_body_bytes") -> APIError:
    """``size`` None: a chunked body, cut where it passed the limit."""
    what = f"Request body of {size} bytes" if size is not None else "Request body"
    message = f"{what} exceeds the limit of {limit} bytes ({setting})"
    return _client(413, message, "request_too_large")


def invalid_json(detail: str) -> APIError:
    return bad_request(f"Request body is not valid JSON: {quote(detail)}", "invalid_json")


def invalid_priority(header: str, value: bytes) -> APIError:
    message = f"Header {header} must be an integer priority, got {quote(repr(value))}"
    return bad_request(message, "invalid_priority", header)


def model_not_found(model: str, known: list[str]) -> APIError:
    message = f"The model '{quote(model)}' does not exist. Available models: "
    return _client(404, message + ", ".join(sorted(known)), "model_not_found", param="model")


def unknown_url(method: str, path: str) -> APIError:
    return _client(404, f"Unknown endpoint {quote(method)} {quote(path)}", "unknown_url")


def routing(request: IRequest, failure: Failure) -> APIError:
    """The error for a request no route takes: an unknown path, or a method it does not allow
    (``failure`` is Klein's werkzeug ``NotFound`` or ``MethodNotAllowed``)."""
    method, path = request.method.decode("latin-1"), request.path.decode("latin-1")
    if failure.check(MethodNotAllowed):
        allowed = getattr(failure.value, "valid_methods", None) or []
        return method_not_allowed(method, path, list(allowed))
    return unknown_url(method, path)


def method_not_allowed(method: str, path: str, allowed: list[str]) -> APIError:
    message = (
        f"Method {quote(method)} is not allowed on {quote(path)}; "
        f"use {', '.join(allowed) or 'another method'}"
    )
    return _client(405, message, "method_not_allowed", headers={"Allow": ", ".join(allowed)})


def not_supported(what: str) -> APIError:
    message = (
        f"llmswap serves the models in its configuration; '{what}' is not available here "
        "(add or change models in llmswap.yaml and reload)"
    )
    return _client(501, message, "not_supported")


# -- 401/403/429: the key ------------------------------------------------------------------------


def unauthorized(message: str) -> APIError:
    return _client(401, message, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def forbidden(key: str, what: str, code: str) -> APIError:
    return _client(403, f"API key '{key}' {what}", code)


def foreign_host(host: str) -> APIError:
    message = (
        f"Host '{host}' is not one of this daemon's names: without auth, the console, the logs "
        "and the /admin/ routes answer to loopback names, IP addresses and console.hosts"
    )
    return _client(403, message, "foreign_host")


def foreign_origin(origin: str) -> APIError:
    message = f"A page of another origin ({origin}) may not use the console or the /admin/ routes"
    return _client(403, message, "cross_site_request")


def management_route(path: str) -> APIError:
    message = f"'{quote(path)}' manages the backend itself: only admin keys may use it"
    return _client(403, message, "management_route")


def not_local() -> APIError:
    message = (
        "The console, the logs and the /admin/ routes answer only to loopback clients while "
        "no auth section is configured: set 'console.open: true', or configure auth.keys with "
        "an admin key"
    )
    return _client(403, message, "admin_not_local")


def cross_site() -> APIError:
    message = "A change asked with the console's session must carry an X-Requested-With header"
    return _client(403, message, "cross_site_request")


def model_not_allowed(key: str, model: str) -> APIError:
    message = f"API key '{key}' may not use model '{quote(model)}'"
    return _client(403, message, "model_not_allowed", param="model")


def rate_limited(message: str, retry_after: float, code: str) -> APIError:
    retry = str(max(1, math.ceil(retry_after)))
    return APIError(429, message, "requests", code, {"Retry-After": retry})


# -- 5xx: llmswap and the backends ---------------------------------------------------------------


def backend_unavailable(message: str, retry_after: int = 5) -> APIError:
    retry = {"Retry-After": str(retry_after)}
    return _server(503, message, "backend_unavailable", headers=retry)


def queue_full(capacity: int, retry_after: int = 5) -> APIError:
    message = f"Queue full ({capacity} requests). Try again later."
    return _server(503, message, "queue_full", headers={"Retry-After": str(retry_after)})


def startup_timeout(model: str, timeout: float) -> APIError:
    message = f"Model '{model}' did not become ready within its startup_timeout of {timeout:g} s"
    return _server(504, message, "model_startup_timeout")


def upgrade_refused(status: int) -> APIError:
    """A backend's answer to a tunnelled upgrade that was not a 101: its status when the
    request was at fault (4xx), else 502."""
    message = f"The model's server did not accept the upgrade: it answered {status}"
    if 400 <= status < 500:
        return _client(status, message, "upgrade_refused")
    return _server(502, message, "upgrade_refused")


def too_many_tunnels(most: int) -> APIError:
    message = f"{most} upgraded connections are open already; try again later"
    return _server(503, message, "too_many_tunnels", headers={"Retry-After": "10"})


def backend_error(message: str) -> APIError:
    return _server(502, message, "backend_unreachable")


def gateway_timeout(message: str, code: str = "timeout") -> APIError:
    return _server(504, message, code)


def shutting_down() -> APIError:
    return backend_unavailable("llmswap is shutting down; retry against the restarted daemon")


def internal() -> APIError:
    return _server(500, "Internal error in llmswap (logged)", "internal")
