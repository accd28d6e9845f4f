"""The console's Config view: the running configuration, the file's text, check and apply.

Check is ``check-config``'s validation of a text not yet written (its includes read from beside
the file); apply checks again, writes the file atomically with the previous ones kept as
``<file>.bak``, ``.bak.1``, ``.bak.2``, reloads as ``POST /admin/reload`` does and says what
changed.  Secrets stay on the server (:mod:`llmswap.config.editing`).  File work runs in the
reactor's thread pool.  ``console.edit_config: false`` leaves the view read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.web.iweb import IRequest

from llmswap import errors
from llmswap.bodies import json_object
from llmswap.config import editing, secrets
from llmswap.config.config import Config
from llmswap.config.values import ConfigError
from llmswap.describe import describe
from llmswap.events import ModelState
from llmswap.responses import json_body
from llmswap.surface import CONFIG_BYTES
from llmswap.swap.manager import SwapManager

_LOADED = (ModelState.STARTING, ModelState.READY, ModelState.DRAINING, ModelState.ASLEEP)


class ConfigPage:
    def __init__(
        self,
        manager: SwapManager,
        reload: Callable[[], Deferred[dict[str, list[str]]]],
        reactor: Any,
    ) -> None:
        self._manager = manager
        self._reload = reload
        self._reactor = reactor

    @property
    def _config(self) -> Config:
        return self._manager.config

    def _in_thread(self, call: Callable[..., Any], *args: Any) -> Deferred[Any]:
        pool = self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, call, *args)

    def _read_only(self) -> str | None:
        """Why the file may not be checked or written here (None: it may).
        ``console.edit_config``: ``auth`` lets admin keys write it (so nobody without keys),
        ``true`` whoever may use the console, ``false`` nobody; and only a file."""
        config = self._config
        setting = config.console.edit_config
        if not config.from_file:
            return "this daemon runs no configuration file"
        if setting == "false" or (setting == "auth" and config.auth is None):
            alone = " and there is no auth section" if setting == "auth" else ""
            return f"console.edit_config is {setting}{alone}"
        return None

    def _writable_source(self) -> str:
        why = self._read_only()
        if why is not None:
            raise errors.forbidden("-", f"may not check or edit the configuration here ({why})",
                                   "config_read_only")  # fmt: skip
        return self._config.source

    @inlineCallbacks
    def show(self, request: IRequest) -> Generator[Deferred[Any], Any, bytes]:
        why = self._read_only()
        document = yield self._in_thread(_shown, self._config, why is None)
        return json_body(request, {**document, "read_only": why}, no_store=True)

    @inlineCallbacks
    def check(self, request: IRequest) -> Generator[Deferred[Any], Any, bytes]:
        source = self._writable_source()  # a check reads files: not where nothing may change
        text = _text(request)
        config, problems = yield self._in_thread(editing.check, text, source, self._config)
        return json_body(request, _verdict(config, problems), no_store=True)

    @inlineCallbacks
    def apply(self, request: IRequest) -> Generator[Deferred[Any], Any, bytes]:
        source = self._writable_source()
        text = _text(request)
        config, problems = yield self._in_thread(editing.check, text, source, self._config)
        if problems:  # the first, at its line (a check lists them all)
            first = problems[0]
            where = f"line {first.line}: " if first.line else ""
            message = f"Configuration not applied: {where}{first.message}"
            raise errors.bad_request(message, "invalid_config")
        try:
            backup = yield self._in_thread(editing.write, text, source)
        except (OSError, ConfigError) as e:
            raise errors.bad_request(
                f"Configuration not written: {e}", "config_not_written"
            ) from None
        loaded = {n for n in self._manager.models() if self._manager.state(n) in _LOADED}
        changes = yield self._reload()
        restarted = [n for n in changes.get("changed", []) if n in loaded]
        return json_body(request, {
            **_verdict(config, []), "applied": True, "backup": backup,
            "changes": {**changes, "restarted": restarted},
        }, no_store=True)  # fmt: skip


def _shown(config: Config, editable: bool) -> dict[str, Any]:
    """The Config view's document (in a thread: it reads the file).  The file's text only where
    it may be edited (nothing needs it elsewhere), with its secrets masked; not at all when its
    secrets cannot be found (it does not parse).  No line holds a secret value."""
    original = editing.read(config.source) if config.from_file else None
    keys = config.auth.keys if config.auth is not None else ()
    known = secrets.values(original) | {k.secret for k in keys}
    for path in config.included:  # the running configuration's, wherever they are
        known |= secrets.values(editing.read(path))
    text = secrets.masked(original) if editable and original is not None else None
    return {
        "source": config.source,
        "text": text or "",
        "editable": editable,
        "unreadable": editable and text is None,
        "included": list(config.included),
        "running": [secrets.scrubbed(line, known) for line in describe(config, config.source)],
        "keys": [{"name": k.name, "from": f"environment variable {k.env}" if k.env
                  else "the configuration file"} for k in keys],
    }  # fmt: skip


def _text(request: IRequest) -> str:
    content = request.content
    body = json_object(content.read() if content is not None else b"", CONFIG_BYTES)
    text = body.get("text")
    if not isinstance(text, str):
        raise errors.bad_request("'text' must be the configuration file's text", param="text")
    return text


def _verdict(config: Config | None, problems: list[editing.Problem]) -> dict[str, Any]:
    """What a check found: the problems at their lines, or the models it would run."""
    return {
        "ok": not problems,
        "problems": [p.document() for p in problems],
        "models": sorted(config.models) if config is not None else [],
    }
