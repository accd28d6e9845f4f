"""The HTTP face of llmswap: an OpenAI-compatible Klein resource tree.

Only ``model`` and ``stream`` are read from a request body; the body itself is forwarded as the
bytes received.  Every error a client can provoke comes back OpenAI-shaped with a fitting status.
A request passes the gate (key, model, limits), waits for a lease from the swap manager (a stream
gets keep-alive comments meanwhile), is relayed, and is counted in the metrics and the log.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any

import attrs
from klein import Klein
from klein.interfaces import IKleinRequest
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    inlineCallbacks,
    maybeDeferred,
    passthru,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed, NotFound

from llmswap import errors
from llmswap.access import Gate, nothing_to_release
from llmswap.accesslog import AccessLog
from llmswap.config import Config
from llmswap.keepalive import KeepAlive
from llmswap.manager import STARTING, Lease, SwapManager
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
        # Services: the daemon's service tree stops their timers.
        self.keepalive: KeepAlive[_Exchange] = KeepAlive(
            clock, lambda: self._config.keepalive_interval, self._still_waiting
        )
        self.access_log = AccessLog(clock)
        self._on_lease = self._serve
        self._on_failure = self._ended

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
    def proxy(self, request: IRequest, _endpoint: str) -> IResource:
        # The route returns at once and the request's life goes on as callbacks on its queue
        # ticket's Deferred: a request waiting in the queue then holds its ticket and one
        # callback, not a suspended route (Klein keeps about 4 KB of render state per pending
        # route, an ``async def`` route 1.5 KB more).
        x = _Exchange(request, self._clock.seconds())
        d: Deferred[Any] = maybeDeferred(self._admit, x)
        if not d.called:  # it waits in the queue
            _forget_routing(request)
            if x.stream:
                self.keepalive.add(x)  # until _serve or _ended
        # What a waiting request holds is counted in bytes (docs/benchmarks.md): the callbacks
        # share one arguments tuple, the bound methods are made once, no kwargs dicts.
        args = (x,)
        d.addCallbacks(self._on_lease, self._on_failure, callbackArgs=args, errbackArgs=args)
        x.answering = d
        finished = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addCallbacks(passthru, _hung_up, errbackArgs=args)
        return _ANSWERED_LATER

    def _admit(self, x: _Exchange) -> Deferred[Lease]:
        """Check the request and queue it; fires with a lease on the model's backend."""
        request = x.request
        key = self._gate.identify(request)
        x.key_name = key.name if key is not None else "-"
        content = request.content
        assert content is not None
        x.body = content.read()
        # Kept as bytes from here; the request's own copy (a temporary file, open, above 100
        # KB) goes now rather than when the answer ends, maybe minutes of queueing later.
        content.close()
        request.content = None
        x.model, x.stream = parse_body(x.body, self._config.max_body_bytes)
        if x.model not in self._config.models:
            raise errors.model_not_found(x.model, self._gate.visible(key, self._manager.models()))
        x.model = sys.intern(x.model)  # a configured name: one string, not one per request
        self._gate.check_model(key, x.model)
        priority = key.priority if key is not None else self._priority(request)
        x.release_key = self._gate.admit(key)
        return self._manager.acquire(x.model, priority)

    @inlineCallbacks
    def _serve(self, lease: Lease, x: _Exchange) -> Any:
        """Relay the request to the backend its lease names; release the lease after it."""
        failure = None
        try:
            self.keepalive.discard(x)
            request = x.request
            x.waited = lease.waited
            if not started_writing(request):
                request.setHeader(b"x-llmswap-queue-position", str(lease.position).encode())
                request.setHeader(b"x-llmswap-queue-wait", f"{lease.waited:.3f}".encode())
            url = lease.backend_url + request.uri[len(b"/v1") :].decode("latin-1")
            drop = _KEY_HEADERS if self._gate.enabled else frozenset()
            x.relayed = yield self._relay.forward(request, x.model, url, x.body, drop)
            x.status = x.relayed.status
        except Exception:  # CancelledError included: the client went away
            failure = Failure()
        finally:
            lease.release()
        self._ended(failure, x)

    def _ended(self, failure: Failure | None, x: _Exchange) -> None:
        """Answer what stopped the request, if anything; finish it; count and log it.

        The end of every request's chain, so it logs what it cannot handle rather than raise.
        """
        self.keepalive.discard(x)
        request = x.request
        try:
            if failure is not None:
                self._answer_failure(failure, x)
            if not x.gone:
                request.finish()
        except Exception:
            _internal_error(Failure(), request)
        x.release_key()
        duration = self._clock.seconds() - x.started
        # The answer leaves on the reactor's next poll (Twisted buffers writes until then), so
        # counting and logging now would hold it back by their cost.  A callLater(0) still runs
        # before that poll; the call it schedules runs after it.
        self._clock.callLater(0, self._clock.callLater, 0, self._account, x, duration)

    def _account(self, x: _Exchange, duration: float) -> None:
        """Count an ended request in the metrics and write its access log line."""
        known = x.model if x.model in self._config.models else "-"
        relayed = x.relayed
        first = relayed.first_byte_at - x.started if x.stream and relayed.first_byte_at else None
        self._metrics.answered(known, x.status, x.key_name, x.waited, duration, first, relayed.tail)
        if self._config.access_log:
            self._log_access(x, duration)

    def _answer_failure(self, failure: Failure, x: _Exchange) -> None:
        """OpenAI-shaped, or an event in a stream already committed by "loading" comments."""
        if x.gone and failure.check(CancelledError):  # nobody is left to answer
            x.status = _CLIENT_CLOSED
            return
        if isinstance(failure.value, errors.APIError):
            err = failure.value
        else:
            err = _internal_error(failure, x.request)
        x.status = err.status
        if started_writing(x.request):
            x.request.write(sse_event(err.body()))
        else:
            x.request.write(_error(x.request, err))

    def _log_access(self, x: _Exchange, duration: float) -> None:
        # The line, formatted here once, is the event's format string (braces escaped: the model
        # name is the client's text), so the log observer has no field to look up; the fields
        # stay in the event for structured (JSON) observers.
        request = x.request
        line = (
            f"{request.method.decode()} {request.path.decode('latin-1')} model={x.model} "
            f"key={x.key_name} stream={x.stream} status={x.status} "
            f"queue_wait={x.waited or 0.0:.3f}s duration={duration:.3f}s"
        )
        self.access_log.logger.info(
            line.replace("{", "{{").replace("}", "}}"),
            model=x.model,
            key=x.key_name,
            status=x.status,
            queue_wait=x.waited,
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

    def _still_waiting(self, x: _Exchange) -> None:
        """An SSE comment while a stream waits, so clients and proxies keep the connection."""
        request = x.request
        if not started_writing(request):
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
        what = "loading" if self._manager.state(x.model) == STARTING else "queued for"
        waited = self._clock.seconds() - x.started
        request.write(f": {what} {x.model}, {waited:.0f} s\n\n".encode())

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
        return _error(request, _internal_error(failure, request))


def _internal_error(failure: Failure, request: IRequest) -> errors.APIError:
    log.failure("unexpected error handling {path}", failure, path=request.path)
    return errors.APIError(500, "Internal error in llmswap (logged)", "server_error", "internal")


_NOT_RELAYED = Relayed(0)


@attrs.define(eq=False)
class _Exchange:
    """One proxied request, from admission to its metrics and access-log line."""

    request: IRequest
    started: float
    body: bytes = b""
    model: str = "-"
    stream: bool = False
    key_name: str = "-"
    release_key: Callable[[], None] = nothing_to_release
    waited: float | None = None
    relayed: Relayed = _NOT_RELAYED
    status: int = 0
    gone: bool = False  # the client hung up
    answering: Deferred[Any] | None = None  # the chain that answers it


def _forget_routing(request: IRequest) -> None:
    """Drop what Klein keeps on a request for its route (a werkzeug URL map adapter with the
    URL's parts, about 0.6 KB): nothing reads it once the route has returned, and a request may
    wait in the queue for minutes."""
    if isinstance(request, Componentized):
        with contextlib.suppress(KeyError):  # a Klein that keeps nothing there
            request.unsetComponent(IKleinRequest)


def _hung_up(failure: Failure, x: _Exchange) -> None:
    x.gone = True
    if x.answering is not None:
        x.answering.cancel()  # drops a waiting ticket, or aborts the backend request


class _AnsweredLater(Resource):
    """What the proxy route returns: Klein renders it, and twisted.web leaves the request open
    (NOT_DONE_YET) for the exchange's callbacks to answer and finish."""

    isLeaf = True

    def render(self, request: IRequest) -> object:
        return NOT_DONE_YET


_ANSWERED_LATER = _AnsweredLater()
