"""The HTTP face of llmswap: an OpenAI-compatible Klein resource tree, with Ollama's beside it.

It only routes: relayed API calls go to :class:`~llmswap.proxy.Proxy`, the admin routes to the
swap manager, ``/api/...`` to Ollama's routes (:mod:`llmswap.ollama.routes`), and every error a
client can provoke comes back OpenAI-shaped with a fitting status (built in
:mod:`llmswap.errors`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from llmswap import errors, health, upstream
from llmswap.access import Caller, Gate
from llmswap.console.routes import ConsoleAPI
from llmswap.llamacpp import listing
from llmswap.llamacpp.routes import RouterAPI
from llmswap.metrics import Metrics
from llmswap.proxy import Proxy, internal_error
from llmswap.relay.tunnel import is_upgrade
from llmswap.responses import json_body
from llmswap.swap.manager import SwapManager

log = Logger()
T = TypeVar("T")

# The console's pages and data: its own script and style only (no inline code, nothing from
# elsewhere), never framed (clickjacking), types as sent, no referrer to other sites.
CONSOLE_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; object-src 'none'; "
     b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)  # fmt: skip


class OpenAIResource:
    """Routes of the OpenAI API and llmswap's own (health, metrics, admin)."""

    app = Klein()

    def __init__(
        self,
        manager: SwapManager,
        proxy: Proxy[None],
        gate: Gate,
        metrics: Metrics,
        clock: IReactorTime,
        reload: Callable[[], Deferred[Any]] | None = None,
        ollama: IResource | None = None,
        console: ConsoleAPI | None = None,
        anthropic: Proxy[None] | None = None,
        upstream: upstream.UpstreamProxy | None = None,
        router: RouterAPI | None = None,
    ) -> None:
        self._manager = manager
        self._proxy = proxy
        self._anthropic = anthropic or proxy
        self._upstream = upstream
        self._router = router
        self._ollama = ollama
        self._console = console
        self._gate = gate
        self._metrics = metrics
        self._clock = clock
        self._reload = reload

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: IRequest) -> bytes:
        accept = request.getHeader(b"accept") or b""
        if self._console is not None and b"text/html" in accept:  # a browser: the console
            request.redirect(b"/ui/")  # type: ignore[attr-defined]
            return b""
        # What Ollama answers here: its clients (and Open WebUI) check it to find a server.
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Ollama is running"

    @app.route("/ui", methods=["GET"])
    def ui_slash(self, request: IRequest) -> bytes:
        request.redirect(b"/ui/")  # type: ignore[attr-defined]
        return b""

    @app.route("/ui/", branch=True, methods=["GET", "HEAD"])
    def ui(self, request: IRequest) -> Any:
        return self._console_call(request, lambda c: c.static)

    @app.route("/admin/events", methods=["GET"])
    def admin_events(self, request: IRequest) -> Any:
        return self._console_call(request, lambda c: c.events(request))

    @app.route("/admin/activity", methods=["GET"])
    def admin_activity(self, request: IRequest) -> Any:
        return self._console_call(request, lambda c: c.activity(request))

    @app.route("/admin/timeline", methods=["GET"])
    def admin_timeline(self, request: IRequest) -> Any:
        return self._console_call(request, lambda c: c.timeline(request))

    @app.route("/admin/failures", methods=["GET"])
    def admin_failures(self, request: IRequest) -> Any:
        return self._console_call(request, lambda c: c.failures(request))

    @app.route("/admin/config", methods=["GET"])
    def admin_config(self, request: IRequest) -> Any:
        return self._console_call(request, lambda c: c.config(request, None))

    @app.route("/admin/config/check", methods=["POST"])
    def admin_config_check(self, request: IRequest) -> Any:
        return self._console_call(request, lambda c: c.config(request, "check"))

    @app.route("/admin/config/apply", methods=["POST"])
    def admin_config_apply(self, request: IRequest) -> Any:
        return self._console_call(request, lambda c: c.config(request, "apply"))

    @app.route("/admin/logs", methods=["GET"])
    def admin_own_log(self, request: IRequest) -> Any:
        return self._console_call(request, lambda c: c.logs(request, None))

    @app.route("/admin/logs/<model>", methods=["GET"])
    def admin_logs(self, request: IRequest, model: str) -> Any:
        return self._console_call(request, lambda c: c.logs(request, model))

    @app.route("/admin/session", methods=["POST"])
    def admin_login(self, request: IRequest) -> Any:
        return self._console_call(request, lambda c: c.login(request))

    @app.route("/admin/session", methods=["DELETE"])
    def admin_logout(self, request: IRequest) -> Any:
        return self._console_call(request, lambda c: c.logout(request))

    def _console_call(self, request: IRequest, call: Callable[[ConsoleAPI], Any]) -> Any:
        """A console route's answer, sent with the console's protective headers."""
        for name, value in CONSOLE_HEADERS:
            request.setHeader(name, value)
        return _delegated(request, self._console, call)

    @app.route("/api/", branch=True)
    def ollama(self, request: IRequest) -> Any:
        if self._ollama is None:
            err = errors.unknown_url(
                request.method.decode("latin-1"), request.path.decode("latin-1")
            )
            return errors.render_ollama(request, err)
        return self._ollama

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> Any:
        try:
            self._gate.protect_health(request)
        except errors.APIError as e:
            return errors.render(request, e)
        details = self._gate.health_details(request)
        d = self._manager.files()
        return d.addCallback(lambda files: json_body(request, health.document(
            self._manager.snapshot(health.QUEUE_SHOWN), files, details)))  # fmt: skip

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> Any:
        if b"model" in request.args:  # type: ignore[attr-defined]  # a backend's, as the router
            return self._router_call(request, lambda r: r.proxied(request, "/metrics"))
        try:
            self._gate.protect_health(request)
        except errors.APIError as e:
            return errors.render(request, e)
        return self._metrics.resource()

    @app.route("/v1/models", methods=["GET"])
    async def models(self, request: IRequest) -> bytes:
        """OpenAI's list; each model with the router's ``status`` (and ``meta`` while loaded:
        ``n_ctx``...), as llama.cpp's router lists them."""
        try:
            key = self._gate.identify(request)
        except errors.APIError as e:
            return errors.render(request, e)
        config, snap = self._manager.config, self._manager.snapshot()
        names = self._gate.names(key, config)
        metas = {}
        if self._router is not None:
            metas = await self._router.meta.of(
                config, snap, [n for n in names if n in config.models]
            )
        data = []
        for name in names:
            m = config.models.get(name)
            if m is None:  # a pool
                if not config.pools[name].unlisted:
                    data.append(self._model_object(name))
                continue
            if m.unlisted:
                continue
            extra: dict[str, Any] = {"status": listing.status(listing.shown(snap, config, name))}
            if name in metas:
                extra["meta"] = metas[name]
            names_of = (name, *m.aliases) if config.list_aliases else (name,)
            data += [{**self._model_object(n), **extra} for n in names_of]
        return json_body(request, {"object": "list", "data": data})

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    def model(self, request: IRequest, model_id: str) -> bytes:
        """OpenAI's retrieve-model: any name a request may use (unlisted ones and aliases)."""
        try:
            key = self._gate.identify(request)
            config = self._manager.config
            visible = self._gate.names(key, config)
            if (model_id if model_id in config.pools else config.resolve(model_id)) not in visible:
                raise errors.model_not_found(model_id, visible)
        except errors.APIError as e:
            return errors.render(request, e)
        return json_body(request, self._model_object(model_id))

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(self._clock.seconds()),
                "owned_by": "local"}  # fmt: skip

    @app.route("/admin/models/<model>/load", methods=["POST"])
    async def admin_load(self, request: IRequest, model: str) -> bytes:
        return await self._admin(request, model, self._manager.load, Caller.ADMIN)

    @app.route("/admin/models/<model>/unload", methods=["POST"])
    async def admin_unload(self, request: IRequest, model: str) -> bytes:
        return await self._admin(request, model, self._manager.unload, Caller.UNLOAD)

    @app.route("/admin/unload", methods=["POST"])
    async def admin_unload_all(self, request: IRequest) -> bytes:
        try:
            self._gate.require(request, Caller.UNLOAD)
            await self._manager.unload()
        except errors.APIError as e:
            return errors.render(request, e)
        states = {name: self._manager.state(name).value for name in self._manager.models()}
        return json_body(request, {"models": states})

    @app.route("/admin/reload", methods=["POST"])
    async def admin_reload(self, request: IRequest) -> bytes:
        try:
            self._gate.require_admin(request)
            if self._reload is None:
                raise errors.bad_request("This daemon has no configuration file to reload")
            summary = await self._reload()
        except errors.APIError as e:
            return errors.render(request, e)
        return json_body(request, {"reloaded": True, "changes": summary})

    async def _admin(self, request: IRequest, model: str, change: Any, caller: Caller) -> bytes:
        try:
            self._gate.require(request, caller)
            if model not in self._manager.backends and model not in self._manager.config.models:
                raise errors.model_not_found(model, self._manager.models())
            await change(model)
        except errors.APIError as e:
            return errors.render(request, e)
        log.info("admin: {path} done", path=errors.printable(request.path.decode("latin-1")))
        state = self._manager.state(model).value
        return json_body(request, {"model": model, "state": state})

    # llama.cpp's router API (llmswap.llamacpp).
    @app.route("/models", methods=["GET"])
    def router_models(self, request: IRequest) -> Any:
        return self._router_call(request, lambda r: r.models(request))

    @app.route("/models/load", methods=["POST"])
    def router_load(self, request: IRequest) -> Any:
        return self._router_call(request, lambda r: r.load(request))

    @app.route("/models/unload", methods=["POST"])
    def router_unload(self, request: IRequest) -> Any:
        return self._router_call(request, lambda r: r.unload(request))

    @app.route("/models/sse", methods=["GET"])
    def router_events(self, request: IRequest) -> Any:
        return self._router_call(request, lambda r: r.events(request))

    @app.route("/props", methods=["GET"])
    def router_props(self, request: IRequest) -> Any:
        return self._router_call(request, lambda r: r.props(request))

    @app.route("/slots", methods=["GET"])
    def router_slots(self, request: IRequest) -> Any:
        return self._router_call(request, lambda r: r.proxied(request, "/slots", Caller.ADMIN))

    def _router_call(self, request: IRequest, call: Callable[[RouterAPI], Any]) -> Any:
        return _delegated(request, self._router, call)

    @app.route("/v1/<path:_endpoint>", methods=["POST"])
    def proxy(self, request: IRequest, _endpoint: str) -> IResource:
        return self._proxy.handle(request, None)

    # llama.cpp's own routes, routed by the model in the body like the OpenAI ones.
    @app.route("/infill", methods=["POST"])
    @app.route("/completion", methods=["POST"])
    @app.route("/rerank", methods=["POST"])
    @app.route("/tokenize", methods=["POST"])
    @app.route("/detokenize", methods=["POST"])
    def llama_cpp(self, request: IRequest) -> IResource:
        return self._proxy.handle(request, None)

    @app.route("/v1/messages", methods=["POST"])
    @app.route("/v1/messages/count_tokens", methods=["POST"])
    def anthropic(self, request: IRequest) -> IResource:
        return self._anthropic.handle(request, None)

    @app.route("/upstream/<path:_rest>")
    def upstream(self, request: IRequest, _rest: str) -> Any:
        try:
            if self._upstream is None:
                raise errors.unknown_url(request.method.decode("latin-1"), "/upstream/")
            key = self._gate.require(request, Caller.UPSTREAM)
            visible = self._gate.visible(key, self._manager.models())
            found = upstream.target(self._manager.config, request.uri, visible)
            upstream.check_reach(self._manager.config, found, request.method, self._gate.may(
                key, Caller.ADMIN))  # fmt: skip
            if is_upgrade(request):
                return self._upstream.tunnel(request, found)
        except errors.APIError as e:
            return errors.render(request, e)
        return self._upstream.handle(request, found)

    @app.handle_errors(NotFound, MethodNotAllowed, RequestRedirect)
    def routing_error(self, request: IRequest, failure: Failure) -> bytes:
        """An unknown path (werkzeug's redirect to a slashed path too: no API client follows
        one), or a method its route does not take; in Ollama's shape below /api."""
        err = errors.routing(request, failure)
        if request.path == b"/api" or request.path.startswith(b"/api/"):
            return errors.render_ollama(request, err)
        return errors.render(request, err)

    @app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        return errors.render(request, internal_error(failure, request))


def _delegated(request: IRequest, part: T | None, call: Callable[[T], Any]) -> Any:
    """The answer of a part of the API the daemon may lack (the console, the router API): its
    errors, at once or later, OpenAI-shaped; 404 when it is not there."""
    try:
        if part is None:
            raise errors.unknown_url(
                request.method.decode("latin-1"), request.path.decode("latin-1")
            )
        result = call(part)
    except errors.APIError as e:
        return errors.render(request, e)
    if isinstance(result, Deferred):
        result.addErrback(_render_api_error, request)
    return result


def _render_api_error(failure: Failure, request: IRequest) -> bytes:
    failure.trap(errors.APIError)
    err: errors.APIError = failure.value  # type: ignore[assignment]
    return errors.render(request, err)
