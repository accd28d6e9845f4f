"""Assemble the daemon: a MultiService of the swap manager and the HTTP site.

Children start in order and stop in reverse: the site stops listening before the manager stops
the backends, and the manager stops every backend it started before twistd exits.  The service
also owns what a configuration reload replaces: backends, keys (the gate), relay timeout.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from llmswap import errors, health
from llmswap.access import Gate
from llmswap.accesslog import AccessLog
from llmswap.anthropic import AnthropicProxy
from llmswap.backends import session
from llmswap.backends.docker import DockerBackend
from llmswap.backends.engine import DockerClientProvider
from llmswap.backends.process import ProcessBackend
from llmswap.backends.remote import RemoteBackend
from llmswap.config.config import Config, load, reload_changes
from llmswap.config.model import ModelConfig
from llmswap.config.values import ConfigError
from llmswap.console.activity import Activity
from llmswap.console.configpage import ConfigPage
from llmswap.console.failures import Failures
from llmswap.console.live import LiveStreams
from llmswap.console.logs import OwnLog
from llmswap.console.routes import ConsoleAPI
from llmswap.console.timeline import Timeline
from llmswap.events import EventBus, ModelState
from llmswap.interfaces import IBackend
from llmswap.llamacpp.events import ModelEvents
from llmswap.llamacpp.listing import Meta
from llmswap.llamacpp.routes import RouterAPI
from llmswap.memory.witness import MemoryWitness
from llmswap.metrics import Metrics
from llmswap.ollama.routes import OllamaProxy, OllamaRoutes
from llmswap.proxy import Proxy
from llmswap.relay.agent import BackendPool, backend_agent
from llmswap.relay.forward import Relay
from llmswap.relay.tunnel import Tunnels
from llmswap.resource import OpenAIResource
from llmswap.site import HTTPService, LLMSwapSite
from llmswap.swap.manager import SwapManager
from llmswap.swap.prefetch import Prefetcher
from llmswap.upstream import UpstreamProxy
from llmswap.watch import ConfigWatcher

log = Logger()


class _PoolService(Service):
    """Closes the kept-alive backend connections on shutdown so the reactor stops cleanly."""

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d


def default_log_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "llmswap" / "logs"


def make_backends(
    config: Config, reactor: Any, only: list[str] | None = None
) -> dict[str, IBackend]:
    engines = {name: DockerClientProvider(host.docker) for name, host in config.hosts.items()}
    log_dir = Path(config.log_dir) if config.log_dir else default_log_dir()
    backends: dict[str, IBackend] = {}
    for name, model in config.instances.items():
        if only is not None and name not in only:
            continue
        if model.kind == "docker":
            backends[name] = DockerBackend(model, engines[model.host], reactor)
        elif model.kind == "remote":
            backends[name] = RemoteBackend(model)
        else:
            backends[name] = ProcessBackend(model, reactor, log_dir, config.hidden_env)
    return backends


class LLMSwapService(MultiService):
    """The whole daemon; ``manager`` and ``port`` are exposed for tests and tooling."""

    # ``--listen`` was given: the file's ``listen`` never applies, and a reload says nothing of it.
    listen_given = False

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        pool = BackendPool(reactor)
        agent = backend_agent(reactor, pool)
        http = HTTPClient(agent)
        _PoolService(pool).setServiceParent(self)
        # What happens to requests and models, for metrics and the access log (and any
        # other listener); publishers hold no reference to them.
        self.bus = EventBus()
        backends = make_backends(config, reactor)
        session.util_linux()  # which launcher starts a server: asked now, not at a load
        prefetch = Prefetcher(lambda: self.config, reactor)
        prefetch.setServiceParent(self)
        self.memory = MemoryWitness(lambda: self.config, self._loaded, reactor, self.bus)
        self.memory.setServiceParent(self)
        self.manager = SwapManager(config, backends, http, reactor, self.bus, prefetch, self.memory)
        self.manager.setServiceParent(self)
        self.metrics = Metrics(self.bus, self.manager.snapshot)
        self.gate = Gate(config.auth, reactor, config.console)
        self.relay = Relay(agent, reactor, config.request_timeout)
        parts = (self.manager, self.relay, self.gate, self.bus, reactor)
        proxy: Proxy[None] = Proxy(*parts)
        anthropic, upstream, ollama = (
            AnthropicProxy(*parts),
            UpstreamProxy(*parts),
            OllamaProxy(*parts),
        )
        self.tunnels = upstream.tunnels = Tunnels(reactor)
        self.tunnels.setServiceParent(self)
        routes = OllamaRoutes(self.manager, ollama, self.gate, http, reactor)
        console = self._console(config, reactor)
        meta = Meta(http, reactor)
        events = ModelEvents(self.bus, reactor, self.manager.snapshot, lambda: self.config, meta)
        events.setServiceParent(self)
        router = RouterAPI(self.manager, self.gate, upstream, events, meta, reactor)
        api = OpenAIResource(
            self.manager, proxy, self.gate, self.metrics, reactor, self.reload, routes.resource(),
            console, anthropic, upstream, router,
        )  # fmt: skip
        for each in (proxy, anthropic, upstream, ollama):  # their waiting streams' timers
            each.setServiceParent(self)
        AccessLog(reactor, self.bus, lambda: self.config.access_log).setServiceParent(self)
        self.watcher = ConfigWatcher(self.reload, lambda: self.config, reactor)
        self.watcher.setServiceParent(self)
        self._site = LLMSwapSite(api.resource(), self.gate, lambda: self.config)
        self._reactor = reactor
        self.web = HTTPService(config, self._site, reactor)
        self.web.setServiceParent(self)

    def _console(self, config: Config, reactor: Any) -> ConsoleAPI:
        """The console's services: they start before the site and stop after it."""
        settings = config.console
        activity = Activity(self.bus, reactor, settings)
        timeline = Timeline(self.bus, reactor, self.manager.snapshot)
        own_log = OwnLog(settings.log_lines)
        live = LiveStreams(self.bus, reactor, self.manager.snapshot, lambda: self.config)
        failures = Failures(self.bus, reactor, settings, self._model_state, self._output)
        for service in (activity, failures, timeline, own_log, live):
            service.setServiceParent(self)
        config_page = ConfigPage(self.manager, self.reload, reactor)
        return ConsoleAPI(
            self.manager, self.gate, activity, timeline, own_log, live, failures, config_page
        )

    def _model_state(self, model: str) -> dict[str, Any] | None:
        """A model's state and error now, as a failed request's record keeps them."""
        found = self.manager.snapshot().instances.get(model)
        return {"state": found.state.value, "error": found.error} if found else None

    def _output(self, model: str, lines: int) -> Deferred[list[str]] | None:
        backend = self.manager.backends.get(model)
        return backend.output(lines) if backend is not None else None

    def _loaded(self) -> list[tuple[ModelConfig, IBackend]]:
        """The instances that are loaded now, with their backends (what the witness measures)."""
        snap, backends = self.manager.snapshot(), self.manager.backends
        ready = [n for n, m in snap.instances.items() if m.state is ModelState.READY]
        return [(self.config.instances[n], backends[n]) for n in ready]

    @property
    def config(self) -> Config:
        """The running configuration: the manager's, which a reload replaces."""
        return self.manager.config

    @property
    def backends(self) -> Mapping[str, IBackend]:
        return self.manager.backends

    def health(self) -> dict[str, Any]:
        """The ``/health`` document, as the route serves it."""
        return health.document(self.manager.snapshot(health.QUEUE_SHOWN))

    @inlineCallbacks
    def reload(self) -> Generator[Deferred[Any], Any, dict[str, list[str]]]:
        """Re-read the configuration file and apply it without dropping a request.

        A configuration that does not validate is refused with its error; the running one keeps
        serving.  The listening endpoint stays (changing it needs a restart).
        """
        if not self.config.from_file:
            raise errors.bad_request(
                f"Nothing to reload: this daemon runs the {self.config.source} configuration"
            )
        try:  # in a thread: ``memory: auto`` reads GGUF headers
            new = yield deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), load, self.config.source,
                self.config.ports,
            )  # fmt: skip
        except ConfigError as e:
            log.error("reload refused, the running configuration stays: {e}", e=str(e))
            raise errors.bad_request(
                f"Configuration not reloaded, the running one stays: {e}", "invalid_config"
            ) from None
        if new.listen != self.config.listen and not self.listen_given:
            log.warn("reload: 'listen' changed; it applies at the next restart")
        new = attrs.evolve(new, listen=self.config.listen)
        _, changed, added = reload_changes(self.config, new)
        fresh = changed + added
        backends = make_backends(new, self._reactor, fresh)
        summary: dict[str, list[str]] = yield self.manager.reconfigure(new, backends)
        self.gate.configure(new.auth, new.console)
        self._site.configure(new)
        self.relay.idle_timeout = new.request_timeout
        self.watcher.follow()  # watch_config may have changed, or what the file includes
        return summary

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        """Stop children one after another, last started first.

        MultiService would stop them all at once; the order matters here: stop listening, then
        stop the backends (which answers every waiting request), then close the backend
        connection pool, and last hang up idle keep-alive clients.
        """
        Service.stopService(self)
        for child in reversed(list(self)):
            yield child.stopService()
        yield self._site.close_all(self._reactor)


def make_service(config: Config, reactor: Any = None) -> LLMSwapService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return LLMSwapService(config, reactor)
