"""An upgraded connection (a WebSocket: ComfyUI's, a backend's web UI) through ``/upstream/``.

The model is made ready as for any request (queued, loaded, the key's rights checked by the
route), then the request goes to the backend on a connection of its own with llmswap's headers
(no llmswap key or session cookie, the backend's ``Host``, a remote model's own key), and from
its answer on the two connections are spliced: bytes both ways, each side a streaming producer
for the other, so a slow reader slows its writer instead of filling llmswap's memory.

Only a backend that accepts the upgrade (``101``) gets the client's connection: any other
answer is the client's error, and the backend's connection is closed, so a tunnel is never a
raw HTTP connection past ``/upstream/``'s path checks.  The lease is released once the tunnel
stands: a socket a browser tab keeps open for hours must
not hold the model against every swap (llama-swap's ``ignoreWebsockets``).  When the model is
evicted its server goes, and so does the tunnel: the client sees the socket close and
reconnects, which loads the model again.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from llmswap import errors
from llmswap.config.model import server_root
from llmswap.headers import request_headers
from llmswap.swap.queue import Lease

log = Logger()

CONNECT_TIMEOUT = 10.0
ANSWER_TIMEOUT = 30.0  # for the backend's answer to the upgrade
HEAD_BYTES = 64 * 1024  # the most an answer's status line and headers may take
MOST = 256  # tunnels open at once: each holds two descriptors, for as long as it stays open
_DONE = Failure(ConnectionDone())


def is_upgrade(request: IRequest) -> bool:
    return (
        bool(request.getHeader(b"upgrade"))
        and b"upgrade" in (request.getHeader(b"connection") or b"").lower()
    )


class _Side(Protocol):
    """One end of a tunnel: what it receives goes out of the other end."""

    peer: _Side | None = None

    def __init__(self, tunnels: Tunnels, on_lost: Callable[[Failure], None] | None = None):
        self._tunnels = tunnels
        self._on_lost = on_lost

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self._tunnels.ended(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()
        if self._on_lost is not None:
            self._on_lost(reason)


class _Backend(_Side):
    """The backend's end: its answer's head is held until it is known to accept the upgrade
    (a ``101``); only then are the connections spliced."""

    def __init__(self, tunnels: Tunnels) -> None:
        super().__init__(tunnels)
        self.answered: Deferred[bytes] | None = Deferred()
        self._head = b""

    def dataReceived(self, data: bytes) -> None:
        if self.answered is None:
            super().dataReceived(data)
            return
        self._head += data
        if b"\r\n\r\n" in self._head or len(self._head) > HEAD_BYTES:
            answered, self.answered = self.answered, None
            answered.callback(self._head)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.answered is not None:
            answered, self.answered = self.answered, None
            answered.errback(reason)
        super().connectionLost(reason)


def _status(head: bytes) -> int:
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0


class Tunnels(Service):
    """Every open tunnel; stopping llmswap closes them."""

    name = "tunnels"

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._open: set[_Side] = set()
        self._opening = 0  # queued for their model, or waiting for the backend's 101

    def room(self) -> None:
        """Refuses a tunnel beyond :data:`MOST`, open or opening (503)."""
        if len(self._open) // 2 + self._opening >= MOST:
            raise errors.too_many_tunnels(MOST)

    def open(
        self, request: IRequest, lease: Deferred[Lease], path: str, drop: frozenset[bytes]
    ) -> None:
        """Tunnel ``request`` to ``path`` on the server of the lease ``lease`` fires with;
        errors before the tunnel stands are answered OpenAI-shaped."""
        self._opening += 1
        lease.addCallback(self._connect, request, path, drop)
        lease.addErrback(self._failed, request)
        lease.addBoth(self._opened)
        request.notifyFinish().addErrback(lambda _: lease.cancel())  # type: ignore[attr-defined]

    @inlineCallbacks
    def _connect(
        self, lease: Lease, request: IRequest, path: str, drop: frozenset[bytes]
    ) -> Generator[Deferred[Any], Any, None]:
        try:
            parts = urlsplit(server_root(lease.backend_url))
            if parts.scheme != "http" or parts.hostname is None:
                raise errors.bad_request("Only a model served over plain HTTP can be tunnelled")
            backend = _Backend(self)
            endpoint = HostnameEndpoint(
                self._reactor, parts.hostname, parts.port or 80, timeout=CONNECT_TIMEOUT
            )
            yield connectProtocol(endpoint, backend)
            assert backend.transport is not None and backend.answered is not None
            try:
                backend.transport.write(_head(request, parts.netloc, path, drop, lease))
                head = yield backend.answered.addTimeout(ANSWER_TIMEOUT, self._reactor)
                status = _status(head)
                if status != 101:
                    raise errors.upgrade_refused(status)
                self._splice(request, backend, head)
            except BaseException:
                backend.transport.loseConnection()
                raise
        finally:
            lease.release()  # a tunnel does not hold its model (the module's docstring)

    def _splice(self, request: IRequest, backend: _Backend, head: bytes) -> None:
        """Hand the client's connection over from HTTP to the tunnel, the 101 first."""
        if request.finished or getattr(request, "_disconnected", False):  # type: ignore[attr-defined]
            raise CancelledError()
        channel = request.channel  # type: ignore[attr-defined]
        client = _Side(self, channel.connectionLost)  # the site counts the connection until then
        transport, channel.transport = channel.transport, None
        channel.setTimeout(None)  # an open socket is not an idle connection
        if isinstance(transport, ProtocolWrapper):  # TLS: the wrapper delivers what it reads
            transport.wrappedProtocol = client
        else:
            transport.protocol = client
        client.transport = transport
        client.peer, backend.peer = backend, client
        self._open.update((client, backend))
        assert backend.transport is not None
        transport.write(head)
        # What the client sent after its request, before the 101 (an eager client's first
        # frame), is in the channel's buffer of pipelined data: it goes on to the backend.
        early, channel._dataBuffer = b"".join(channel._dataBuffer), []
        if early:
            backend.transport.write(early)
        transport.unregisterProducer()  # the HTTP channel was its producer until now
        transport.registerProducer(backend.transport, True)
        backend.transport.registerProducer(transport, True)  # type: ignore[attr-defined]
        transport.resumeProducing()  # Twisted paused it while the request was served
        log.info("upstream: a {kind} tunnel opened", kind=request.getHeader(b"upgrade"))

    def _failed(self, failure: Failure, request: IRequest) -> None:
        gone = getattr(request, "_disconnected", False) or request.finished  # type: ignore[attr-defined]
        if failure.check(CancelledError) or gone:
            return  # the client went away: nobody to answer
        if request.channel.transport is None:  # type: ignore[attr-defined]  # tunnelled
            log.failure("upstream: a tunnel", failure)
            return
        if failure.check(errors.APIError):
            err: errors.APIError = failure.value  # type: ignore[assignment]
        elif failure.check(TimeoutError, DeferredTimeoutError):
            err = errors.gateway_timeout("The model's server did not answer the upgrade")
        else:
            log.warn("upstream: a tunnel could not open: {e}", e=failure.value)
            err = errors.backend_error("The model's server did not take the upgraded connection")
        request.write(errors.render(request, err))
        request.finish()

    def _opened(self, _: Any) -> None:
        self._opening -= 1

    def ended(self, side: _Side) -> None:
        self._open.discard(side)

    def stopService(self) -> None:
        super().stopService()
        for side in list(self._open):
            if side.transport is not None:
                side.transport.loseConnection()


def _head(request: IRequest, host: str, path: str, drop: frozenset[bytes], lease: Lease) -> bytes:
    """The request as the backend gets it: llmswap's headers (no key, no session cookie), its
    own ``Host``, a remote model's key, the upgrade asked for."""
    headers = request_headers(request, drop)
    if lease.authorization is not None:
        headers.setRawHeaders(b"authorization", [lease.authorization])
    lines = [request.method + b" " + path.encode("latin-1") + b" HTTP/1.1",
             b"Host: " + host.encode()]  # fmt: skip
    lines += [name + b": " + v for name, values in headers.getAllRawHeaders() for v in values]
    lines += [b"Connection: Upgrade", b"Upgrade: " + (request.getHeader(b"upgrade") or b"")]
    return b"\r\n".join(lines) + b"\r\n\r\n"
