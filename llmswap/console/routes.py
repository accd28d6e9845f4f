"""What the console's routes do; :mod:`llmswap.resource` routes to them.

Every data route needs :meth:`llmswap.access.Gate.require_admin`; the static files (the page
and its script, no data) are served to anyone, so that a browser without a session can show the
login form.  A stream opened with a session (the live events, a log follow) ends with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.static import File
from zope.interface import implementer

from llmswap import errors
from llmswap.access import SESSION_COOKIE, Gate
from llmswap.console.activity import Activity
from llmswap.console.configpage import ConfigPage
from llmswap.console.failures import Failures
from llmswap.console.live import LiveStreams
from llmswap.console.logs import OwnLog
from llmswap.console.timeline import Timeline
from llmswap.proxy import ANSWERED_LATER
from llmswap.responses import json_body
from llmswap.swap.manager import SwapManager

STATIC = Path(__file__).with_name("static")
_FOLLOW_PENDING = 2000  # lines a slow follower may fall behind before lines are dropped


def _arg(request: IRequest, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def _count(request: IRequest, name: str, default: int, limit: int) -> int:
    text = _arg(request, name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()):
        raise errors.bad_request(f"'{name}' must be a whole number, got {errors.quote(text)!r}")
    return min(int(text), limit)


class ConsoleAPI:
    def __init__(
        self,
        manager: SwapManager,
        gate: Gate,
        activity: Activity,
        timeline: Timeline,
        own_log: OwnLog,
        live: LiveStreams,
        failures: Failures,
        config_page: ConfigPage,
    ) -> None:
        self._manager = manager
        self._gate = gate
        self._activity = activity
        self._timeline = timeline
        self._own_log = own_log
        self._live = live
        self._failures = failures
        self._config_page = config_page
        self.static: IResource = File(str(STATIC))
        self.static.childNotFound = _NoSuchFile()  # type: ignore[attr-defined,assignment]

    def events(self, request: IRequest) -> Any:
        self._gate.require_admin(request)
        self._live.add(request)
        self._end_with_session(request)
        return ANSWERED_LATER

    def _end_with_session(self, request: IRequest) -> None:
        """A stream opened with a browser's session ends at its logout or expiry."""
        ended = self._gate.hold_open(request, lambda: _finish(request))
        request.notifyFinish().addBoth(lambda _: ended())  # type: ignore[attr-defined]

    def activity(self, request: IRequest) -> bytes:
        self._gate.require_admin(request)
        rows = self._activity.recent(
            model=_arg(request, "model"),
            key=_arg(request, "key"),
            status=_count(request, "status", 0, 999) or None,
            limit=_count(request, "limit", 1000, 100_000),
        )
        return json_body(request, {"activity": rows}, no_store=True)

    def failures(self, request: IRequest) -> bytes:
        self._gate.require_admin(request)
        rows = self._failures.recent(_count(request, "limit", 1000, 100_000))
        return json_body(request, {"failures": rows}, no_store=True)

    def config(self, request: IRequest, action: str | None) -> Any:
        """The Config view: GET shows, POST ``check`` validates, POST ``apply`` writes and
        reloads (:mod:`llmswap.console.configpage`)."""
        self._gate.require_admin(request)
        if action is None:
            return self._config_page.show(request)
        return (self._config_page.check if action == "check" else self._config_page.apply)(request)

    def timeline(self, request: IRequest) -> bytes:
        self._gate.require_admin(request)
        return json_body(request, self._timeline.since(), no_store=True)

    @inlineCallbacks
    def logs(self, request: IRequest, model: str | None) -> Any:
        """llmswap's log (``model`` None) or a backend's output, as text; ``?follow=1`` keeps
        the response open and streams new lines."""
        self._gate.require_admin(request)
        lines = _count(request, "lines", self._manager.config.console.log_lines, 100_000)
        follow: Callable[[Callable[[str], None]], Callable[[], None]]
        if model is None:
            recent = self._own_log.lines(lines)
            follow = self._own_log.follow
        else:
            if model not in self._manager.backends:  # a model's, or one of its instances'
                raise errors.model_not_found(model, list(self._manager.backends))
            backend = self._manager.backends[model]
            recent = yield backend.output(lines)
            follow = backend.follow
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        text = "".join(line + "\n" for line in recent).encode()
        if _arg(request, "follow") not in ("1", "true"):
            return text
        request.write(text)
        _Follow(request, follow).start()
        self._end_with_session(request)
        return ANSWERED_LATER

    def login(self, request: IRequest) -> bytes:
        token, seconds = self._gate.open_session(request)
        secure = "; Secure" if request.isSecure() else ""
        request.setHeader(
            b"set-cookie",
            f"{SESSION_COOKIE.decode()}={token}; HttpOnly; SameSite=Strict; Path=/; "
            f"Max-Age={seconds}{secure}".encode(),
        )
        return json_body(request, {"session": True, "expires_in": seconds}, no_store=True)

    def logout(self, request: IRequest) -> bytes:
        self._gate.close_session(request)
        request.setHeader(
            b"set-cookie", SESSION_COOKIE + b"=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
        )
        return json_body(request, {"session": False}, no_store=True)


class _NoSuchFile(Resource):
    """A missing console file: an API-shaped 404, not twisted.web's HTML page."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        path = request.path.decode("latin-1")
        return errors.render(request, errors.unknown_url(request.method.decode("latin-1"), path))


def _finish(request: IRequest) -> None:
    if not getattr(request, "finished", True) and not getattr(request, "_disconnected", True):
        request.unregisterProducer()  # type: ignore[attr-defined]
        request.finish()


@implementer(IPushProducer)
class _Follow:
    """Streams lines to one follower until it goes away; a slow one loses lines (counted)
    rather than growing llmswap's memory."""

    def __init__(
        self, request: IRequest, follow: Callable[[Callable[[str], None]], Callable[[], None]]
    ) -> None:
        self._request = request
        self._follow = follow
        self._stop: Callable[[], None] | None = None
        self._paused = False
        self._held: list[str] = []
        self._dropped = 0

    def start(self) -> None:
        self._request.registerProducer(self, True)  # type: ignore[attr-defined]
        self._stop = self._follow(self._line)
        self._request.notifyFinish().addBoth(lambda _: self.stopProducing())  # type: ignore[attr-defined]

    def _line(self, text: str) -> None:
        if self._paused:
            if len(self._held) < _FOLLOW_PENDING:
                self._held.append(text)
            else:
                self._dropped += 1
            return
        self._request.write(text.encode() + b"\n")

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        held, self._held = self._held, []
        if self._dropped:
            held.append(f"[llmswap: {self._dropped} lines dropped: this client read too slowly]")
            self._dropped = 0
        for text in held:
            self._line(text)

    def stopProducing(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None
