"""``twistd llmswap``: command-line options and makeService for the twistd plugin."""

from __future__ import annotations

import ctypes
import gc
import signal
from typing import Any

import attrs
from twisted.application.service import IService, Service
from twisted.logger import Logger
from twisted.python import usage

from llmswap.config.config import Config, load
from llmswap.config.values import ConfigError
from llmswap.errors import APIError
from llmswap.service import LLMSwapService, make_service

log = Logger()
_PR_SET_DUMPABLE = 4  # linux/prctl.h


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT] [--watch-config]"
    longdesc = (
        "Serve an OpenAI-compatible API that starts and stops local model backends so that "
        "only one runs at a time. Without --config, serves built-in llama.cpp models."
    )
    optFlags = [
        ["watch-config", "w", "Reload when the configuration file (or one it includes) changes."],
    ]
    optParameters = [
        ["config", "c", None, "Configuration file (YAML). Default: the built-in llama.cpp models."],
        ["listen", "l", None, "strports endpoint to listen on (default: the config's, tcp:8888)."],
    ]

    def postOptions(self) -> None:
        try:
            config = self._load()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["listen"]:
            config = attrs.evolve(config, listen=self["listen"])
        self["loaded"] = config

    def _load(self) -> Config:
        if self["config"]:
            return load(self["config"])
        from llmswap.config.defaults import default_config

        return default_config()


class _HangupService(Service):
    """SIGHUP reloads the configuration (systemd's ExecReload) and reopens the backends' log
    files (logrotate's convention) instead of killing us.

    Without a handler SIGHUP's default action ends the process without any cleanup.
    """

    def __init__(self, daemon: LLMSwapService, reactor: Any) -> None:
        self._daemon = daemon
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)

    def _hangup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._reload)

    def _reload(self) -> None:
        log.info("SIGHUP: reopening backend log files and reloading the configuration")
        for backend in self._daemon.backends.values():
            reopen = getattr(backend, "reopen_log", None)
            if reopen is not None:
                reopen()
        # A refused reload (a bad file, or no file: the built-in models) answers APIError with
        # its reason; a bad file's is logged by reload itself.
        self._daemon.reload().addErrback(lambda f: f.trap(APIError))


def _not_dumpable() -> None:
    """Backends run as llmswap's user; without this they could read llmswap's environment
    (the keys' variables) and memory through /proc.  Not dumpable, those files are root's."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError) as e:
        log.warn("cannot hide llmswap's memory and environment from its backends: {e}", e=e)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    _not_dumpable()
    config: Config = options["loaded"]
    daemon = make_service(config, reactor)
    daemon.watcher.forced = bool(options["watch-config"])
    daemon.listen_given = bool(options["listen"])
    _HangupService(daemon, reactor).setServiceParent(daemon)
    # What exists once the daemon runs (modules, configuration) lives as long as the process.
    # Frozen, it is no longer re-scanned by every full garbage collection: those pauses were
    # the p99 latency at concurrency 32 (38 ms, 19 ms frozen; docs/benchmarks.md).
    reactor.callWhenRunning(gc.freeze)
    log.info(
        "llmswap: {n} models from {source}, listening on {listen}",
        n=len(config.models),
        source=config.source,
        listen=config.listen,
    )
    return daemon
