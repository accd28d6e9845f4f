"""The listening side: llmswap's HTTP site, channel and request, and the service that listens.

What a client on the LAN can make llmswap hold is bounded here, before any route runs:

- A request is looked up in :mod:`llmswap.surface` when its headers have arrived: a caller the
  route does not admit, or a ``Content-Length`` over the route's limit, is answered at once in
  the route's API shape, and its body is never taken (no temporary file, no memory).  A chunked
  body is counted as it arrives and cut at the limit with 413.  A refused connection is closed
  after a short linger that reads and drops what the client was still sending, so the client
  reads the answer instead of a connection reset.
- A connection with no request under way is closed after ``idle_timeout``; beyond
  ``max_connections`` open at once (and a reserve of descriptors for backends' pipes and
  sockets) new connections are closed as they come; the soft descriptor limit is raised to the
  hard one at start.

Only HTTP/1.1 is spoken (no HTTP/2 over TLS): these limits live in the HTTP/1.1 channel.
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Generator
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.server import Request, Site

from llmswap import errors, surface
from llmswap.access import Gate, is_loopback
from llmswap.config.config import Config

log = Logger()

# Responses still being written get this long to finish at shutdown.
_CLOSE_GRACE = 5.0
# A refused request's connection reads (and drops) what the client still sends for this long
# before it is closed, so the client gets to read the refusal (nginx's lingering close).
LINGER = 2.0
# Descriptors kept for backends (pipes, sockets, log files) and Docker: never given to clients.
DESCRIPTOR_RESERVE = 256


def _shaped(err: errors.APIError, shape: surface.Shape) -> bytes:
    if shape is surface.Shape.OLLAMA:
        return errors.ollama_body(err)
    if shape is surface.Shape.ANTHROPIC:
        return errors.anthropic_body(err)
    return err.body()


class _Request(Request):
    """Bodies are relayed as bytes, never read as HTML forms: skip Twisted's form parsing, which
    runs every POST's content type through ``email.message`` (about 14% of the CPU at
    saturation, profiled).  A chunked body is counted against its route's limit as it comes."""

    body_limit: int | None = None
    limit_setting = "max_body_bytes"
    shape = surface.Shape.OPENAI
    _received = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, parsePOSTFormSubmission=False, **kwargs)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self.body_limit is not None and self._received > self.body_limit:
            channel = cast(_Channel, self.channel)
            channel.refuse(errors.too_large(None, self.body_limit, self.limit_setting), self.shape)
            return
        super().handleContentChunk(data)


class _Channel(HTTPChannel):
    """HTTP/1.1 with the surface's checks at the end of a request's headers."""

    site: LLMSwapSite
    _refused = False
    _linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.site.closed(self)
        if self._linger is not None and self._linger.active():
            self._linger.cancel()

    def allHeadersReceived(self) -> None:
        request: _Request = self.requests[-1]
        # What requestReceived sets later, known now: the checks read them.
        request.method, request.uri = self._command, self._path
        request.parseCookies()
        try:
            found, request.body_limit, request.limit_setting = self.site.admit(request, self.length)
        except errors.APIError as e:
            self.refuse(e, surface.route(self._command, self._path.split(b"?", 1)[0]).shape)
            return
        request.shape = found.shape
        super().allHeadersReceived()

    def refuse(self, err: errors.APIError, shape: surface.Shape) -> None:
        """Answer ``err`` now, take nothing more of this request, and close."""
        if self._refused:
            return
        self._refused = True
        transport: Any = self.transport
        body = _shaped(err, shape)
        head = [f"HTTP/1.1 {err.status} {RESPONSES.get(err.status, b'').decode()}",
                "Content-Type: application/json", f"Content-Length: {len(body)}",
                "Connection: close", *(f"{k}: {v}" for k, v in err.headers.items())]  # fmt: skip
        transport.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
        self.persistent = False
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        half_close()
        self._linger = self.callLater(LINGER, transport.abortConnection)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if not self._refused:
            super().allContentReceived()

    def lineReceived(self, line: bytes) -> None:
        if not self._refused:
            super().lineReceived(line)


class LLMSwapSite(Site):
    """The HTTP site.  It counts its connections (the cap) and remembers them, so that shutdown
    can hang up idle keep-alive clients."""

    noisy = False
    displayTracebacks = False

    def __init__(self, resource: Any, gate: Gate, config: Callable[[], Config]) -> None:
        super().__init__(resource, requestFactory=_Request, timeout=config().idle_timeout)
        self._gate = gate
        self._config = config
        self._open: set[_Channel] = set()
        self.capacity = config().max_connections
        self.refused = 0  # connections closed at once: over capacity

    def protocol(self) -> _Channel:  # type: ignore[override]
        return _Channel()

    def buildProtocol(self, addr: Any) -> Any:
        if len(self._open) >= self.capacity:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                log.warn(
                    "{n} connection(s) refused so far: {open} are open (max_connections, "
                    "bounded by the descriptor limit)",
                    n=self.refused,
                    open=len(self._open),
                )
            return None
        return super().buildProtocol(addr)

    def opened(self, channel: _Channel) -> None:
        self._open.add(channel)

    def closed(self, channel: _Channel) -> None:
        self._open.discard(channel)

    def admit(self, request: _Request, length: int | None) -> tuple[surface.Route, int, str]:
        return surface.admit(self._gate, self._config(), request, length)

    def configure(self, config: Config) -> None:
        """A reload: new connections get the new idle timeout and cap."""
        self.timeOut = config.idle_timeout
        self.capacity = min(config.max_connections, connection_room())

    def log(self, request: Any) -> None:
        """Skip the access log: the resource logs a richer line (model, queue wait)."""

    def _connected(self) -> list[Any]:
        """The transports of the open connections."""
        return [p.transport for p in self._open if getattr(p.transport, "connected", False)]

    @inlineCallbacks
    def close_all(self, clock: Any) -> Generator[Deferred[Any], Any, None]:
        for transport in self._connected():
            transport.loseConnection()
        deadline = clock.seconds() + _CLOSE_GRACE
        while self._connected() and clock.seconds() < deadline:
            yield deferLater(clock, 0.01, lambda: None)
        for transport in self._connected():
            transport.abortConnection()


def raise_descriptor_limit() -> None:
    """The soft limit on open descriptors up to the hard one (systemd leaves it at 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warn("cannot raise the descriptor limit from {soft}: {e}", soft=soft, e=e)
        return
    log.info("descriptor limit raised from {soft} to {hard}", soft=soft, hard=hard)


def connection_room() -> int:
    """Client connections the descriptor limit leaves room for, after the backends' reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(16, soft - DESCRIPTOR_RESERVE)


class HTTPService(Service):
    """Listens on a strports endpoint; like strports.service, but it keeps the bound port.

    A failure to listen (port in use) is raised from startService, so ``twistd`` exits with
    the reason instead of running a daemon nobody can reach.  At start it raises the descriptor
    limit, fits the connection cap under it, and warns when it listens beyond loopback
    without keys.
    """

    def __init__(self, config: Config, site: LLMSwapSite, reactor: Any) -> None:
        self._endpoint = endpoints.serverFromString(reactor, config.listen)
        self._config = config
        self._site = site
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        raise_descriptor_limit()
        self._site.configure(self._config)
        if self._site.capacity < self._config.max_connections:
            log.warn(
                "max_connections {want} does not fit the descriptor limit: at most {cap} "
                "client connections",
                want=self._config.max_connections,
                cap=self._site.capacity,
            )
        d = self._endpoint.listen(self._site)
        failures: list[Failure] = []
        d.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        host = getattr(port.getHost(), "host", None)
        if host is not None and self._config.auth is None and not is_loopback(host):
            log.warn(
                "listening on {host} beyond loopback without an auth section: anyone on the "
                "network may use every model (see docs/security.md)",
                host=host,
            )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return port.stopListening()  # type: ignore[no-any-return]
