"""``GET /models/sse``: the router's stream of model status changes, from llmswap's events.

Each event is the router's ``data: {"model", "event": "status_change", "data": {"status"}}``,
written only when the router's word for the model's state changes (draining and stopping are
both still ``loaded``).  A stream starts with every visible model's status (the router's
clients read ``GET /models`` for that; the extra events cost them nothing), and one that a slow
reader paused gets them again when it resumes rather than what it missed.  A model that
loaded comes with its ``info`` (its object and the backend's ``meta``), as the router's does.
One subscription and one heartbeat serve every stream, and only while one is open.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from llmswap.config.config import Config
from llmswap.console.live import LiveStream, SharedStreams
from llmswap.events import EventBus, ModelStateChanged
from llmswap.llamacpp.listing import STATUS, Meta, entry, shown
from llmswap.responses import sse_event
from llmswap.swap.snapshot import Snapshot


def _event(model: str, status: str, info: dict[str, Any] | None = None) -> bytes:
    data: dict[str, Any] = {"status": status}
    if info is not None:
        data["info"] = info
    payload = {"model": model, "event": "status_change", "data": data}
    return sse_event(json.dumps(payload).encode())


log = Logger()

# The router's ``info`` of a model that loaded: its object without the listing's own keys.
_NOT_INFO = ("status", "source", "can_remove", "llmswap")


def _logged(failure: Failure) -> None:
    log.failure("router API: a model event", failure)


class ModelEvents(SharedStreams):
    """Every open ``/models/sse`` stream, with the models each may see."""

    name = "router model events"
    kinds = (ModelStateChanged,)

    def __init__(
        self,
        bus: EventBus,
        clock: IReactorTime,
        snapshot: Callable[[], Snapshot],
        config: Callable[[], Config],
        meta: Meta,
    ) -> None:
        super().__init__(bus, clock)
        self._meta = meta
        # Events leave in the order of their changes, a loaded one after its backend's meta.
        self._sent: Deferred[None] = succeed(None)
        self._snapshot = snapshot
        self._config = config
        self._said: dict[str, str] = {}  # model -> the status last written

    def add(self, request: IRequest, visible: list[str]) -> None:
        models = frozenset(visible)
        stream = LiveStream(request, lambda: self._statuses(models), self._closed, resync=b"")
        self._add(stream, models)

    def _listening(self) -> None:
        self._said = self._now()

    def _now(self) -> dict[str, str]:
        snap, config = self._snapshot(), self._config()
        return {n: STATUS[shown(snap, config, n).state] for n in config.models}

    def _statuses(self, models: frozenset[str]) -> bytes:
        return b"".join(_event(n, s) for n, s in self._now().items() if n in models)

    def _event(self, e: ModelStateChanged) -> None:
        config = self._config()
        model = next((m for m, ns in config.placements.items() if e.model in ns), None)
        if model is None:
            return
        snap = self._snapshot()
        m = shown(snap, config, model)
        status = STATUS[m.state]
        if self._said.get(model) == status:
            return
        self._said[model] = status
        if status == "loaded":
            meta = self._meta.of(config, snap, [model])

            def loaded(_: None) -> Deferred[None]:
                def send(metas: dict[str, Any]) -> None:
                    full = entry(config, model, m, int(self._clock.seconds()), metas.get(model))
                    info = {k: v for k, v in full.items() if k not in _NOT_INFO}
                    self._send_to(model, _event(model, status, info))

                return meta.addCallback(send)

            self._sent.addCallback(loaded)
        else:
            self._sent.addCallback(lambda _: self._send_to(model, _event(model, status)))
        self._sent.addErrback(_logged)

    def _send_to(self, model: str, payload: bytes) -> None:
        for stream, models in list(self._open.items()):
            if model in models:
                stream.send(payload)
