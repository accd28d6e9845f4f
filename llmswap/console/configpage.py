"""The console's Config view: the running configuration, the file's text, check and apply.

Check is ``check-config``'s validation of a text not yet written (its includes read from beside
the file); apply checks again, writes the file atomically with the previous one kept as
``<file>.bak``, reloads as ``POST /admin/reload`` does and says what changed.  Secrets stay on
the server (:mod:`llmswap.config.editing`).  File work runs in the reactor's thread pool.
``console.edit_config: false`` leaves the view read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.web.iweb import IRequest

from llmswap import errors
from llmswap.bodies import json_object
from llmswap.config import editing
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

    def _editable(self) -> bool:
        """``console.edit_config``: ``auth`` lets admin keys write the file (so nobody without
        keys), ``true`` whoever may use the console, ``false`` nobody; and only a file."""
        config = self._config
        setting = config.console.edit_config
        on = setting == "true" or (setting == "auth" and config.auth is not None)
        return on and not config.source.startswith("<")

    def _writable_source(self) -> str:
        if not self._editable():
            setting = self._config.console.edit_config
            why = ("this daemon runs no configuration file" if self._config.source.startswith("<")
                   else f"console.edit_config is {setting}"
                   + (" and there is no auth section" if setting == "auth" else ""))  # fmt: skip
            raise errors.forbidden("-", f"check or edit the configuration ({why})",
                                   "config_read_only")  # fmt: skip
        return self._config.source

    @inlineCallbacks
    def show(self, request: IRequest) -> Generator[Deferred[Any], Any, bytes]:
        config = self._config
        editable = self._editable()
        # The file's text only where it may be edited: it is the same secrets masked, but
        # nothing needs it where it cannot be changed here.
        text = (yield self._in_thread(editing.read_masked, config.source)) if editable else ""
        running = yield self._in_thread(describe, config, config.source)
        keys = config.auth.keys if config.auth is not None else ()
        return json_body(request, {
            "source": config.source,
            "text": text,
            "editable": editable,
            "included": list(config.included),
            "running": [editing.redacted(line) for line in running],
            "keys": [{"name": k.name, "from": f"environment variable {k.env}" if k.env
                      else "the configuration file"} for k in keys],
        }, no_store=True)  # fmt: skip

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
        if problems:  # an error in the API's shape, with every problem at its line
            first = problems[0]
            where = f"line {first.line}: " if first.line else ""
            refused = {
                "error": {
                    "message": f"Configuration not applied: {where}{first.message}",
                    "type": "invalid_request_error",
                    "code": "invalid_config",
                }
            }
            return json_body(request, {**refused, **_verdict(config, problems)}, status=400,
                             no_store=True)  # fmt: skip
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
