"""Ollama's ``/api/...`` routes: models from the configuration, and their state, in Ollama's form.

Chat, generate and embed requests go through :class:`OllamaProxy`, the OpenAI request path with
Ollama's hooks: the same keys, limits, queue, scheduler, metrics and access log.  Every error on
these routes is Ollama-shaped (``{"error": "..."}``) with its HTTP status.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Generator
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from llmswap import errors, filters
from llmswap.access import Caller, Gate
from llmswap.bodies import json_object
from llmswap.config.keys import APIKey
from llmswap.config.model import ModelConfig, server_root
from llmswap.events import Cause, ModelState
from llmswap.interfaces import BackendHTTP, BackendResponse
from llmswap.ollama import stream, translate
from llmswap.proxy import Exchange, Proxy, internal_error
from llmswap.relay import capped
from llmswap.relay.forward import Relayed
from llmswap.responses import json_body
from llmswap.swap.manager import SwapManager
from llmswap.swap.queue import Lease

log = Logger()

# The Ollama API release whose behaviour these routes follow (clients check it for features).
API_VERSION = "0.12.6"
_PROPS_TIMEOUT = 2.0
_NEVER = timedelta(days=365 * 100)  # Ollama's expires_at for a model kept loaded for good


@attrs.define(eq=False)
class Call:
    """An Ollama request: what was asked, of which model (as the client named it)."""

    kind: str
    request: dict[str, Any]
    name: str = ""
    path: str = ""
    keep_alive: float | None = None
    load_only: bool = False
    may_unload: bool = False  # keep_alive 0 unloads: the key's permission (admin or unload)


def _empty_answer(call: Call, reason: str) -> dict[str, Any]:
    """What an empty chat or generate gets: ``done_reason`` load or unload."""
    answer: dict[str, Any] = {"model": call.request["model"], "created_at": translate.now_iso()}
    if call.kind == stream.CHAT:
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    answer.update(done=True, done_reason=reason)
    return answer


def _empty(call: Call) -> bool:
    """An empty chat or generate only loads (or, with keep_alive 0, unloads) the model."""
    if call.kind == stream.CHAT:
        return not call.request.get("messages")
    if call.kind == stream.GENERATE:
        return not call.request.get("prompt") and not call.request.get("images")
    return False


class OllamaProxy(Proxy[Call]):
    """The request path with Ollama's hooks: parse and translate, write NDJSON, keep_alive."""

    comments_while_waiting = False  # an NDJSON client would choke on SSE comments

    def parse(self, x: Exchange[Call], key: APIKey | None) -> None:
        call: Call = x.call
        data = call.request
        models = self._config.models
        config = self._config
        x.model = translate.resolve(data.get("model"), config.known, self._gate.names(key, config))
        self.resolve(x, key)
        call.name = data["model"]
        embedding = call.kind in (stream.EMBED, stream.EMBEDDINGS)
        x.stream = not embedding and data.get("stream", True) is not False
        if call.kind == stream.CHAT:
            call.path, body = "/chat/completions", translate.chat(data, x.model, x.stream)
        elif call.kind == stream.GENERATE:
            call.path, body = translate.generate(data, x.model, x.stream)
            if call.path == "/completions":
                call.kind = stream.COMPLETE
        else:
            body = translate.embed(data, x.model, call.kind == stream.EMBEDDINGS)
            call.path = "/embeddings"
        x.body = json.dumps(filters.apply(body, models[x.model], x.preset)).encode()

    def uploads(self, request: IRequest) -> bool:
        return False  # the route read the body already: Ollama's requests are JSON

    def forward(self, x: Exchange[Call], lease: Lease) -> Deferred[Relayed]:
        call: Call = x.call
        request = x.request
        if call.load_only:
            request.write(json_body(request, _empty_answer(call, "load")))
            return succeed(Relayed(200))
        writer = stream.OllamaWriter(
            request, self._clock, call.kind, call.name, x.stream, x.started, lease.load_seconds
        )
        url = lease.backend_url + call.path
        return self._relay.forward(request, x.model, url, x.body, self.dropped_headers(), writer,
                                   lease.authorization)  # fmt: skip

    def served(self, x: Exchange[Call]) -> None:
        seconds = x.call.keep_alive
        if seconds == 0:
            if not x.call.may_unload:  # the model stays, under its ttl
                return
            d = self._manager.unload(x.model, Cause.KEEP_ALIVE)
            d.addErrback(lambda f: log.failure("keep_alive 0: unloading {m}", f, m=x.model))
        elif seconds is not None and (x.call.may_unload or not self._shortens(x.model, seconds)):
            self._manager.keep_alive(x.model, seconds)

    def _shortens(self, model: str, seconds: float) -> bool:
        """Whether a keep_alive would unload ``model`` sooner than its ttl: an unload too."""
        ttl = self._config.models[model].ttl
        return ttl is None or seconds < ttl

    def render_error(self, request: IRequest, err: errors.APIError) -> bytes:
        return errors.render_ollama(request, err)

    def dropped_headers(self) -> frozenset[bytes]:
        # The answer is parsed, so it must come as plain bytes.
        return super().dropped_headers() | {b"accept-encoding"}


class OllamaRoutes:
    """The ``/api`` subtree."""

    app = Klein()

    def __init__(
        self,
        manager: SwapManager,
        proxy: OllamaProxy,
        gate: Gate,
        http: BackendHTTP,
        clock: IReactorTime,
    ) -> None:
        self._manager = manager
        self._proxy = proxy
        self._gate = gate
        self._http = http
        self._clock = clock
        self._since = datetime.now(UTC)

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    @app.route("/version", methods=["GET"])
    def version(self, request: IRequest) -> bytes:
        return json_body(request, {"version": API_VERSION})

    @app.route("/tags", methods=["GET"])
    def tags(self, request: IRequest) -> bytes:
        try:
            key = self._gate.identify(request)
        except errors.APIError as e:
            return errors.render_ollama(request, e)
        config = self._manager.config
        listed = []
        for name in self._gate.names(key, config):
            if name in config.models:
                listed.append(self._listed(config.models[name]))
                continue
            pool = config.pools[name]  # listed as its first member the key may use
            if not pool.unlisted:
                members = [config.resolve(m) or m for m in pool.members]
                first = next(m for m in members if self._gate.allows(key, m))
                entry = self._listed(config.models[first])
                entry["name"] = entry["model"] = translate.tagged(name)
                listed.append(entry)
        return json_body(request, {"models": listed})

    @app.route("/ps", methods=["GET"])
    def ps(self, request: IRequest) -> bytes:
        try:
            names = self._visible(request)
        except errors.APIError as e:
            return errors.render_ollama(request, e)
        snap = self._manager.snapshot()
        config = self._manager.config
        models = config.models
        loaded = []
        for name, instance in [(n, i) for n in names for i in config.placements[n]]:
            m = snap.instances[instance]
            asleep = m.state is ModelState.ASLEEP
            if m.state not in (ModelState.READY, ModelState.DRAINING) and not asleep:
                continue
            if m.ttl is None or asleep:  # a sleeper stays until its host memory is needed
                expires = datetime.now(UTC) + _NEVER
            else:
                idle_from = snap.at if m.in_flight else m.last_used
                expires = datetime.now(UTC) + timedelta(seconds=idle_from + m.ttl - snap.at)
            entry = self._listed(models[name])
            entry["expires_at"] = expires.isoformat().replace("+00:00", "Z")
            # Asleep: its process lives, its device memory is free (Ollama has no such state;
            # clients ignore the extra field).
            entry["size_vram"] = 0 if asleep else entry["size"]
            entry["state"] = m.state.value
            if models[name].info.context_length:
                entry["context_length"] = models[name].info.context_length
            loaded.append(entry)
        return json_body(request, {"models": loaded})

    @app.route("/show", methods=["POST"])
    @inlineCallbacks
    def show(self, request: IRequest) -> Generator[Deferred[Any], Any, bytes]:
        try:
            data = _body(request, self._manager.config.max_body_bytes)
            model = self._allowed(request, data.get("model") or data.get("name"))
        except errors.APIError as e:
            return errors.render_ollama(request, e)
        cfg = self._manager.config.models[model]
        info = cfg.info
        context = info.context_length
        capabilities = list(info.capabilities)
        if self._manager.state(model) is ModelState.READY:
            props = yield self._props(cfg)
            context = context or _get(props, "default_generation_settings", "n_ctx")
            if _get(props, "modalities", "vision") and "vision" not in capabilities:
                capabilities.append("vision")
        family = info.family or "unknown"
        model_info: dict[str, Any] = {"general.architecture": family}
        if context:
            model_info[f"{family}.context_length"] = context
        return json_body(
            request,
            {
                "modelfile": f"# served by llmswap: a {cfg.kind} backend",
                "parameters": "",
                "template": "",
                "details": self._details(cfg),
                "model_info": model_info,
                "capabilities": capabilities,
                "modified_at": self._modified(),
            },
        )

    @app.route("/chat", methods=["POST"])
    def chat(self, request: IRequest) -> Any:
        return self._relayed(request, stream.CHAT)

    @app.route("/generate", methods=["POST"])
    def generate(self, request: IRequest) -> Any:
        return self._relayed(request, stream.GENERATE)

    @app.route("/embed", methods=["POST"])
    def embed(self, request: IRequest) -> Any:
        return self._relayed(request, stream.EMBED)

    @app.route("/embeddings", methods=["POST"])
    def embeddings(self, request: IRequest) -> Any:
        return self._relayed(request, stream.EMBEDDINGS)

    @app.route("/<any(pull, push, create, copy, delete):what>", methods=["POST", "DELETE"])
    def not_here(self, request: IRequest, what: str) -> bytes:
        return errors.render_ollama(request, errors.not_supported(what))

    @app.route("/blobs/<digest>", methods=["HEAD", "POST"])
    def blobs(self, request: IRequest, digest: str) -> bytes:
        return errors.render_ollama(request, errors.not_supported("blobs"))

    @app.handle_errors(NotFound, MethodNotAllowed, RequestRedirect)
    def routing_error(self, request: IRequest, failure: Failure) -> bytes:
        return errors.render_ollama(request, errors.routing(request, failure))

    @app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        return errors.render_ollama(request, internal_error(failure, request))

    # -- helpers ------------------------------------------------------------------------------

    def _relayed(self, request: IRequest, kind: str) -> Any:
        try:
            call = Call(kind, _body(request, self._manager.config.max_body_bytes))
            call.keep_alive = translate.keep_alive(call.request.get("keep_alive"))
            call.load_only = _empty(call)
            if call.keep_alive is not None:
                call.may_unload = self._gate.permits(request, Caller.UNLOAD)
                if call.load_only and call.keep_alive == 0:
                    return self._unload(request, call)
        except errors.APIError as e:
            return errors.render_ollama(request, e)
        return self._proxy.handle(request, call)

    @inlineCallbacks
    def _unload(self, request: IRequest, call: Call) -> Generator[Deferred[Any], Any, bytes]:
        """Open WebUI's eject: an empty request with keep_alive 0 unloads, never loads.  A key
        without the permission is answered as Ollama answers for a model it keeps loaded (a
        load's answer), and the model stays."""
        try:
            model = self._allowed(request, call.request.get("model"))
            if not call.may_unload:
                log.info("keep_alive 0 from a key that may not unload: {m} stays", m=model)
                return json_body(request, _empty_answer(call, "load"))
            yield self._manager.unload(model, Cause.KEEP_ALIVE)
        except errors.APIError as e:
            return errors.render_ollama(request, e)
        return json_body(request, _empty_answer(call, "unload"))

    def _allowed(self, request: IRequest, name: Any) -> str:
        """The configured model ``name`` means, if the caller's key may use it (404 lists
        only the models it may see; 403 for one it may not use)."""
        key = self._gate.identify(request)
        config = self._manager.config
        model = translate.resolve(name, config.resolve, self._gate.visible(key, config.models))
        self._gate.check_model(key, model)
        return model

    def _visible(self, request: IRequest) -> list[str]:
        return self._gate.visible(self._gate.identify(request), self._manager.models())

    def _listed(self, cfg: ModelConfig) -> dict[str, Any]:
        name = translate.tagged(cfg.name)
        config = self._manager.config
        _, memory = config.footprint(config.placements[cfg.name][0])  # on several hosts: alike
        size = cfg.memory or (int(memory) if memory > 1 else 0)
        return {
            "name": name,
            "model": name,
            "modified_at": self._modified(),
            "size": size,
            "digest": hashlib.sha256(repr(cfg).encode()).hexdigest(),
            "details": self._details(cfg),
        }

    def _details(self, cfg: ModelConfig) -> dict[str, Any]:
        info = cfg.info
        return {
            "parent_model": "",
            "format": "gguf",
            "family": info.family or "",
            "families": [info.family] if info.family else [],
            "parameter_size": info.parameter_size or "",
            "quantization_level": info.quantization_level or "",
        }

    def _modified(self) -> str:
        return self._since.isoformat().replace("+00:00", "Z")

    @inlineCallbacks
    def _props(self, cfg: ModelConfig) -> Generator[Deferred[Any], Any, dict[str, Any] | None]:
        """llama-server's ``/props`` (context size, modalities); None from other servers."""
        url = server_root(cfg.backend_url) + "/props"
        try:
            d = self._http.get(url)
            d.addTimeout(_PROPS_TIMEOUT, self._clock)
            response: BackendResponse = yield d
            body = yield capped.read(response).addTimeout(_PROPS_TIMEOUT, self._clock)
            return json.loads(body) if response.code == 200 else None
        except Exception:
            return None


def _body(request: IRequest, limit: int) -> dict[str, Any]:
    content = request.content
    return json_object(content.read() if content is not None else b"", limit, empty_ok=True)


def _get(props: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(props, dict):
            return None
        props = props.get(key)
    return props
