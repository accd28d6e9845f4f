"""The HTTP face of llmswap: an OpenAI-compatible Klein resource tree.

Only ``model`` and ``stream`` are read from a request body; the body itself is forwarded as the
bytes received.  Every error a client can provoke comes back OpenAI-shaped with a fitting status.
A request passes the gate (key, model, limits), waits for a lease from the swap manager (a stream
gets keep-alive comments meanwhile), is relayed, and is counted in the metrics and the log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from llmswap import errors
from llmswap.access import Gate
from llmswap.config import Config
from llmswap.manager import STARTING, SwapManager
from llmswap.metrics import Metrics
from llmswap.relay import Relay, Relayed, sse_event, started_writing

log = Logger()

_CLIENT_CLOSED = 499  # nginx's convention for "client went away before the answer"
# llmswap's own keys are not the backend's business.
_KEY_HEADERS = frozenset({b"authorization", b"x-api-key"})


def _json(request: IRequest, status: int, payload: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload).encode()


def _error(request: IRequest, err: errors.APIError) -> bytes:
    request.setResponseCode(err.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in err.headers.items():
        request.setHeader(name.encode(), value.encode())
    return err.body()


def parse_body(body: bytes, max_bytes: int) -> tuple[str, bool]:
    """Read ``model`` and ``stream`` from a JSON request body, rejecting anything unusable."""
    if len(body) > max_bytes:
        raise errors.APIError(
            413,
            f"Request body of {len(body)} bytes exceeds the limit of {max_bytes} bytes "
            "(max_body_bytes)",
            "invalid_request_error",
            "request_too_large",
        )
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.bad_request(f"Request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(data, dict):
        raise errors.bad_request("Request body must be a JSON object", "invalid_json")
    model = data.get("model")
    if model is None:
        raise errors.bad_request(
            "Missing required parameter: 'model'", "missing_required_parameter", "model"
        )
    if not isinstance(model, str) or not model:
        raise errors.bad_request("'model' must be a non-empty string", "invalid_type", "model")
    return model, data.get("stream") is True


class OpenAIResource:
    """Routes of the OpenAI API, bound to the manager that owns the backends.

    The configuration is the manager's (it changes on reload); the gate checks keys and limits.
    """

    app = Klein()

    def __init__(
        self,
        manager: SwapManager,
        relay: Relay,
        gate: Gate,
        metrics: Metrics,
        clock: IReactorTime,
        reload: Callable[[], Deferred[Any]] | None = None,
    ) -> None:
        self._manager = manager
        self._relay = relay
        self._gate = gate
        self._metrics = metrics
        self._clock = clock
        self._reload = reload

    @property
    def _config(self) -> Config:
        return self._manager.config

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        try:
            self._gate.protect_health(request)
        except errors.APIError as e:
            return _error(request, e)
        return _json(request, 200, self._manager.health())

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> Any:
        try:
            self._gate.protect_health(request)
        except errors.APIError as e:
            return _error(request, e)
        return self._metrics.resource()

    @app.route("/v1/models", methods=["GET"])
    def models(self, request: IRequest) -> bytes:
        try:
            key = self._gate.identify(request)
        except errors.APIError as e:
            return _error(request, e)
        created = int(self._clock.seconds())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "local"}
            for name in self._gate.visible(key, self._manager.models())
        ]
        return _json(request, 200, {"object": "list", "data": data})

    @app.route("/admin/models/<model>/load", methods=["POST"])
    async def admin_load(self, request: IRequest, model: str) -> bytes:
        return await self._admin(request, model, self._manager.load)

    @app.route("/admin/models/<model>/unload", methods=["POST"])
    async def admin_unload(self, request: IRequest, model: str) -> bytes:
        return await self._admin(request, model, self._manager.unload)

    @app.route("/admin/unload", methods=["POST"])
    async def admin_unload_all(self, request: IRequest) -> bytes:
        try:
            self._gate.require_admin(request)
            await self._manager.unload()
        except errors.APIError as e:
            return _error(request, e)
        states = {name: self._manager.state(name) for name in self._manager.models()}
        return _json(request, 200, {"models": states})

    @app.route("/admin/reload", methods=["POST"])
    async def admin_reload(self, request: IRequest) -> bytes:
        try:
            self._gate.require_admin(request)
            if self._reload is None:
                raise errors.bad_request("This daemon has no configuration file to reload")
            summary = await self._reload()
        except errors.APIError as e:
            return _error(request, e)
        return _json(request, 200, {"reloaded": True, "changes": summary})

    async def _admin(self, request: IRequest, model: str, change: Any) -> bytes:
        try:
            self._gate.require_admin(request)
            if model not in self._config.models:
                raise errors.model_not_found(model, self._manager.models())
            await change(model)
        except errors.APIError as e:
            return _error(request, e)
        log.info("admin: {path} done", path=request.path.decode("latin-1"))
        return _json(request, 200, {"model": model, "state": self._manager.state(model)})

    @app.route("/v1/<path:_endpoint>", methods=["POST"])
    async def proxy(self, request: IRequest, _endpoint: str) -> bytes | None:
        started = self._clock.seconds()
        model, stream, status, key_name = "-", False, 0, "-"
        waited: float | None = None
        relayed = Relayed(0)
        done: Callable[[], None] | None = None
        try:
            key = self._gate.identify(request)
            key_name = key.name if key is not None else "-"
            assert request.content is not None
            body = request.content.read()
            model, stream = parse_body(body, self._config.max_body_bytes)
            if model not in self._config.models:
                raise errors.model_not_found(model, self._gate.visible(key, self._manager.models()))
            self._gate.check_model(key, model)
            priority = key.priority if key is not None else self._priority(request)
            done = self._gate.admit(key)
            waiting = self._manager.acquire(model, priority)
            keepalive = None
            if stream and not waiting.called:
                keepalive = LoopingCall(self._still_waiting, request, model, started)
                keepalive.clock = self._clock
                keepalive.start(self._config.keepalive_interval, now=False)
            try:
                lease = await waiting
            finally:
                if keepalive is not None:
                    keepalive.stop()
            waited = lease.waited
            try:
                if not started_writing(request):
                    request.setHeader(b"x-llmswap-queue-position", str(lease.position).encode())
                    request.setHeader(b"x-llmswap-queue-wait", f"{waited:.3f}".encode())
                url = lease.backend_url + request.uri[len(b"/v1") :].decode("latin-1")
                drop = _KEY_HEADERS if self._gate.enabled else frozenset()
                relayed = await self._relay.forward(request, model, url, body, drop)
                status = relayed.status
            finally:
                lease.release()
            return None
        except errors.APIError as e:
            status = e.status
            if started_writing(request):  # a stream already committed by "loading" comments
                request.write(sse_event(e.body()))
                return None
            return _error(request, e)
        except CancelledError:
            status = _CLIENT_CLOSED
            raise
        finally:
            if done is not None:
                done()
            duration = self._clock.seconds() - started
            known = model if model in self._config.models else "-"
            first = relayed.first_byte_at - started if stream and relayed.first_byte_at else None
            self._metrics.answered(known, status, key_name, waited, duration, first, relayed.tail)
            if self._config.access_log:
                self._log_access(request, model, key_name, stream, status, waited, duration)

    def _log_access(
        self,
        request: IRequest,
        model: str,
        key_name: str,
        stream: bool,
        status: int,
        waited: float | None,
        duration: float,
    ) -> None:
        # Formatted here, once: the logger then only substitutes one field, while the fields
        # stay in the event for structured (JSON) observers.
        path = request.path.decode("latin-1")
        log.info(
            "{access}",
            access=f"{request.method.decode()} {path} model={model} key={key_name} "
            f"stream={stream} status={status} queue_wait={waited or 0.0:.3f}s "
            f"duration={duration:.3f}s",
            model=model,
            key=key_name,
            status=status,
            queue_wait=waited,
            duration=duration,
        )

    def _priority(self, request: IRequest) -> int:
        header = self._config.priority_header
        if header is None:
            return 0
        value = request.getHeader(header)
        if value is None:
            return 0
        try:
            return int(value)
        except ValueError:
            raise errors.bad_request(
                f"Header {header} must be an integer priority, got {value!r}",
                "invalid_priority",
                header,
            ) from None

    def _still_waiting(self, request: IRequest, model: str, started: float) -> None:
        """An SSE comment while a stream waits, so clients and proxies keep the connection."""
        if not started_writing(request):
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
        what = "loading" if self._manager.state(model) == STARTING else "queued for"
        waited = self._clock.seconds() - started
        request.write(f": {what} {model}, {waited:.0f} s\n\n".encode())

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _error(
            request,
            errors.APIError(
                404,
                f"Unknown endpoint {request.method.decode()} {request.path.decode('latin-1')}",
                "invalid_request_error",
                "unknown_url",
            ),
        )

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        err = errors.APIError(
            405,
            f"Method {request.method.decode()} is not allowed on "
            f"{request.path.decode('latin-1')}; use {', '.join(allowed) or 'another method'}",
            "invalid_request_error",
            "method_not_allowed",
            headers={"Allow": ", ".join(allowed)},
        )
        return _error(request, err)

    @app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("unexpected error handling {path}", failure, path=request.path)
        return _error(
            request,
            errors.APIError(500, "Internal error in llmswap (logged)", "server_error", "internal"),
        )
