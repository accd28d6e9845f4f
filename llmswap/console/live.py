"""Live updates for open consoles: server-sent events, fed by the event stream.

What a console sees changes with every request, so nothing is written per event: events add
rows and mark the state stale, and at most every ``INTERVAL`` seconds one payload, built once
for all consoles, carries a fresh ``state`` (models, queue) and the ``activity`` and
``timeline`` rows since the last.  Bounded twice over: at most ``PENDING`` rows wait (beyond,
the oldest are dropped and the consoles told to re-read), and each stream is a push producer of
its HTTP connection: a browser that reads slowly pauses it (Twisted calls ``pauseProducing``),
misses payloads meanwhile and is told to re-read when it resumes, so no slow reader makes
llmswap hold anything for it.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.iweb import IRequest
from zope.interface import implementer

from llmswap.config.config import Config
from llmswap.console.activity import record
from llmswap.console.timeline import change, swap
from llmswap.events import (
    EventBus,
    ModelStateChanged,
    RequestAdmitted,
    RequestEnded,
    RequestQueued,
    Subscription,
    Swap,
)
from llmswap.responses import sse_event
from llmswap.swap.snapshot import Snapshot

INTERVAL = 0.25
PENDING = 500
HEARTBEAT = 15.0  # seconds between comments that keep proxies from closing an idle stream
QUEUE_SHOWN = 200
_KINDS = (RequestQueued, RequestAdmitted, RequestEnded, ModelStateChanged, Swap)
RESYNC = sse_event(b"{}", "resync")


def state(snap: Snapshot, config: Config) -> dict[str, Any]:
    """The Models and Queue views' data."""
    models = {}
    for name, m in snap.instances.items():
        device, memory = config.footprint(name)
        sleep_device, sleep_memory = config.sleep_footprint(name) or (None, None)
        models[name] = {
            "state": m.state.value,
            "error": m.error,
            "since": m.since,
            "last_used": m.last_used,
            "last_load_seconds": m.last_load_seconds,
            "waiting": m.waiting,
            "in_flight": m.in_flight,
            "ttl": m.ttl,
            "device": device,
            "memory": memory if config.hosts[m.host].devices else None,
            "measured": m.measured,  # its peak on a probed device (bytes), None if not measured
            "linger": dict(m.linger),  # its linger now, and how often lingering paid lately
            "host": m.host,
            "sleep_device": sleep_device,
            "sleep_memory": sleep_memory,
            "backend": dict(m.backend),
        }
    return {
        "now": snap.at,
        "waiting": snap.waiting,
        "in_flight": snap.in_flight,
        "queue_capacity": snap.queue_capacity,
        "scheduler": snap.scheduler,
        "devices": {n: float(b) for n, b in config.declared().items()},
        # What the probed devices hold, by anyone (bytes), as last measured.
        "probed": {d: {"total": r.total, "used": r.used} for d, r in snap.devices.items()},
        "hosts": {n: {"engine": h.engine, "error": h.error} for n, h in snap.hosts.items()},
        "models": models,
        "pools": {n: p.document() for n, p in snap.pools.items()},
        "queue": [
            {
                "model": w.model,
                "key": w.key,
                "age": w.age,
                "priority": w.priority,
                "position": w.position,
            }
            for w in snap.queue
        ],
    }


@implementer(IPushProducer)
class LiveStream:
    """One SSE connection (a console's; the router API's ``/models/sse``); ends when its
    client goes away or llmswap stops.  A stream paused by a slow reader misses what is sent
    meanwhile and gets ``resync`` and a fresh ``catch_up`` when it resumes."""

    def __init__(
        self,
        request: IRequest,
        catch_up: Callable[[], bytes],
        on_close: Callable[[LiveStream], None],
        resync: bytes = RESYNC,
    ) -> None:
        self.request = request
        self._catch_up = catch_up
        self._on_close = on_close
        self._resync = resync
        self._paused = False
        self._missed = False

    def start(self) -> None:
        request = self.request
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.registerProducer(self, True)  # type: ignore[attr-defined]
        request.notifyFinish().addBoth(lambda _: self.stopProducing())  # type: ignore[attr-defined]
        request.write(self._catch_up())

    def send(self, payload: bytes) -> None:
        if self._paused:
            self._missed = True
        else:
            self.request.write(payload)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._missed:
            self._missed = False
            self.request.write(self._resync + self._catch_up())

    def stopProducing(self) -> None:
        self._paused = True
        self._on_close(self)


class SharedStreams(Service):
    """SSE streams fed by the event stream: one subscription to ``kinds`` and one heartbeat
    serve them all, and exist only while a stream is open (nobody watching costs nothing)."""

    kinds: tuple[type[Any], ...] = ()

    def __init__(self, bus: EventBus, clock: IReactorTime) -> None:
        self._bus = bus
        self._clock = clock
        # Each open stream, with what its reader may see (None: everything).
        self._open: dict[LiveStream, Any] = {}
        self._subscription: Subscription | None = None
        self._heartbeat: LoopingCall | None = None

    def _add(self, stream: LiveStream, sees: Any = None) -> None:
        if self._subscription is None:
            self._listening()
            self._subscription = self._bus.subscribe_all(self.kinds, self._event)
            self._heartbeat = LoopingCall(self._send, b": idle\n\n")
            self._heartbeat.clock = self._clock
            self._heartbeat.start(HEARTBEAT, now=False)
        self._open[stream] = sees
        stream.start()

    def _listening(self) -> None:
        """The first stream opens: what the streams share is set up."""

    def _event(self, e: Any) -> None:
        raise NotImplementedError

    def _send(self, payload: bytes) -> None:
        for stream in list(self._open):
            stream.send(payload)

    def _closed(self, stream: LiveStream) -> None:
        self._open.pop(stream, None)
        if not self._open:
            self._quiet()

    def _quiet(self) -> None:
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None

    def stopService(self) -> None:
        super().stopService()
        for stream in list(self._open):
            stream.request.unregisterProducer()  # type: ignore[attr-defined]
            stream.request.finish()
        self._open.clear()
        self._quiet()


class LiveStreams(SharedStreams):
    """Every open console's stream, and the one subscription and timer they share."""

    name = "live consoles"
    kinds = _KINDS

    def __init__(
        self,
        bus: EventBus,
        clock: IReactorTime,
        snapshot: Callable[[int], Snapshot],
        config: Callable[[], Config],
    ) -> None:
        super().__init__(bus, clock)
        self._snapshot = snapshot
        self._config = config
        self._rows: deque[tuple[str, dict[str, Any]]] = deque(maxlen=PENDING)
        self._dropped = False
        self._flush: IDelayedCall | None = None

    def add(self, request: IRequest) -> None:
        self._add(LiveStream(request, self._catch_up, self._closed))

    def _catch_up(self) -> bytes:
        return sse_event(
            json.dumps(state(self._snapshot(QUEUE_SHOWN), self._config())).encode(), "state"
        )

    def _event(self, e: Any) -> None:
        row: tuple[str, dict[str, Any]] | None = None
        if isinstance(e, RequestEnded):
            row = ("activity", record(e))
        elif isinstance(e, ModelStateChanged):
            row = ("timeline", {"change": change(e)})
        elif isinstance(e, Swap):
            row = ("timeline", {"swap": swap(e)})
        if row is not None:  # a queued or admitted request only changes the state
            if len(self._rows) == self._rows.maxlen:
                self._dropped = True
            self._rows.append(row)
        if self._flush is None:
            self._flush = self._clock.callLater(INTERVAL, self._write)

    def _write(self) -> None:
        """One payload for every console: built once, written to each."""
        self._flush = None
        rows, self._rows = list(self._rows), deque(maxlen=PENDING)
        out = [RESYNC] if self._dropped else []
        self._dropped = False
        out.append(self._catch_up())
        for kind in ("activity", "timeline"):
            batch = [row for k, row in rows if k == kind]
            if batch:
                out.append(sse_event(json.dumps(batch).encode(), kind))
        self._send(b"".join(out))

    def _quiet(self) -> None:
        super()._quiet()
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        self._rows.clear()
