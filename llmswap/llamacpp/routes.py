"""The router API's calls: each checks its caller as the matching ``/admin/`` route does
(loading: admin keys; unloading: admin keys or ``unload: true``; listing: any key, its models
only) and answers in the router's shapes; errors stay OpenAI-shaped, with the router's words.

A load or unload is answered at once, as the router answers (``{"success": true}``), and
carried out by the swap manager as its admin calls are: queued behind the change under way,
draining before stopping.  Clients follow it in ``GET /models`` or ``GET /models/sse``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from llmswap import __version__, errors
from llmswap.access import Caller, Gate
from llmswap.bodies import json_object
from llmswap.config.keys import APIKey
from llmswap.events import Cause, ModelState
from llmswap.llamacpp.events import ModelEvents
from llmswap.llamacpp.listing import Meta, entry, shown
from llmswap.proxy import ANSWERED_LATER
from llmswap.responses import json_body
from llmswap.surface import SMALL_BYTES
from llmswap.swap.manager import SwapManager
from llmswap.upstream import Target, UpstreamProxy, check_reach

log = Logger()


def _arg(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode())  # type: ignore[attr-defined]
    return values[0].decode("utf-8", "replace") if values else None


class RouterAPI:
    def __init__(
        self,
        manager: SwapManager,
        gate: Gate,
        upstream: UpstreamProxy,
        events: ModelEvents,
        meta: Meta,
        clock: IReactorTime,
    ) -> None:
        self._manager = manager
        self._gate = gate
        self._upstream = upstream
        self._events = events
        self._clock = clock
        self.meta = meta

    def _visible(self, request: IRequest) -> list[str]:
        key = self._gate.identify(request)
        return self._gate.visible(key, self._manager.models())

    @inlineCallbacks
    def models(self, request: IRequest) -> Generator[Deferred[Any], Any, bytes]:
        """``GET /models``: every model the caller may use, with its status."""
        visible = self._visible(request)
        config, snap = self._manager.config, self._manager.snapshot()
        metas = yield self.meta.of(config, snap, visible)
        created = int(self._clock.seconds())
        data = [entry(config, n, shown(snap, config, n), created, metas.get(n)) for n in visible]
        return json_body(request, {"data": data, "object": "list"}, no_store=True)

    def _named(self, request: IRequest, caller: Caller) -> str:
        """The model a load or unload names (its alias too), if the caller may change it."""
        key = self._gate.authorize(request, caller)
        content = request.content
        body = json_object(content.read() if content is not None else b"", SMALL_BYTES)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise errors.bad_request("model name is missing from the request",
                                     "missing_required_parameter", "model")  # fmt: skip
        return self._model(key, name)

    def _model(self, key: APIKey | None, name: str) -> str:
        """The model ``name`` (or its alias) means, if ``key`` may use it; else 404, listing
        the models it may."""
        visible = self._gate.visible(key, self._manager.models())
        model = self._manager.config.resolve(name)
        if model is None or model not in visible:
            raise errors.model_not_found(name, visible)
        return model

    def load(self, request: IRequest) -> bytes:
        """``POST /models/load``: begins the load (evicting what it needs room from)."""
        model = self._named(request, Caller.ADMIN)
        if self._manager.state(model) in (ModelState.STARTING, ModelState.READY):
            raise errors.bad_request("model is already running", "model_already_loaded")
        log.info("router API: loading {model}", model=model)
        self._manager.load(model).addErrback(self._failed, "loading", model)
        return json_body(request, {"success": True})

    def unload(self, request: IRequest) -> bytes:
        """``POST /models/unload``: begins the unload (its requests finish first)."""
        model = self._named(request, Caller.UNLOAD)
        state = self._manager.state(model)
        if not (state.resident or state is ModelState.ASLEEP):
            raise errors.bad_request("model is not running", "model_not_loaded")
        log.info("router API: unloading {model}", model=model)
        self._manager.unload(model, Cause.ADMIN).addErrback(self._failed, "unloading", model)
        return json_body(request, {"success": True})

    def _failed(self, failure: Any, what: str, model: str) -> None:
        failure.trap(errors.APIError)  # anything else is logged as unhandled
        log.warn("router API: {what} {model}: {e}", what=what, model=model, e=failure.value)

    def events(self, request: IRequest) -> Any:
        """``GET /models/sse``: status changes as they happen."""
        self._events.add(request, self._visible(request))
        return ANSWERED_LATER

    def props(self, request: IRequest) -> Any:
        """``GET /props``: the router's own, or with ``?model=`` that model's backend's."""
        if _arg(request, "model") is None:
            self._gate.identify(request)
            return json_body(request, self._router_props())
        return self.proxied(request, "/props")

    def proxied(self, request: IRequest, path: str, caller: Caller = Caller.KEY) -> Any:
        """A GET route naming its model in ``?model=`` (``/props``, ``/slots``, ``/metrics``),
        answered by that model's backend if it is loaded (``&autoload=true``: loading it first,
        as a request would), for a ``caller`` that may use the model."""
        key = self._gate.authorize(request, caller)
        model = self._model(key, _arg(request, "model") or "")
        config = self._manager.config
        autoload = _arg(request, "autoload") in ("true", "1")
        if not autoload and self._manager.state(model) is not ModelState.READY:
            raise errors.bad_request("model is not loaded", "model_not_loaded")
        found = Target(model, path)
        check_reach(config, found, b"GET", admin=self._gate.may(key, Caller.ADMIN))
        return self._upstream.handle(request, found)

    def _router_props(self) -> dict[str, Any]:
        config = self._manager.config
        # One model at a time per host without budgets; with them, as many as fit.
        on = [m.host for m in config.instances.values()]
        most = sum(on.count(h) if host.devices else 1 for h, host in config.hosts.items())
        return {
            "role": "router",
            "max_instances": most,
            "models_autoload": True,
            "model_alias": "llmswap",
            "model_path": "none",
            "default_generation_settings": {"params": None, "n_ctx": 0},
            "ui_settings": {},
            "build_info": f"llmswap {__version__}",
            "cors_proxy_enabled": False,
        }
