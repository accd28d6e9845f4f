"""An upgraded connection (a WebSocket: ComfyUI's, a backend's web UI) through ``/upstream/``.

The model is made ready as for any request (queued, loaded, the key's rights checked by the
route), then the request goes to the backend on a connection of its own with llmswap's headers
(no llmswap key or session cookie, the backend's ``Host``, a remote model's own key), and from
its answer on the two connections are spliced: bytes both ways, each side a streaming producer
for the other, so a slow reader slows its writer instead of filling llmswap's memory.

The lease is released once the tunnel stands: a socket a browser tab keeps open for hours must
not hold the model against every swap (llama-swap's ``ignoreWebsockets``).  When the model is
evicted its server goes, and so does the tunnel: the client sees the socket close and
reconnects, which loads the model again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from llmswap import errors
from llmswap.config.model import server_root
from llmswap.headers import request_headers
from llmswap.swap.queue import Lease

log = Logger()

CONNECT_TIMEOUT = 10.0


def is_upgrade(request: IRequest) -> bool:
    return (
        bool(request.getHeader(b"upgrade"))
        and b"upgrade" in (request.getHeader(b"connection") or b"").lower()
    )


_DONE = Failure(ConnectionDone())


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


class Tunnels(Service):
    """Every open tunnel; stopping llmswap closes them."""

    name = "tunnels"

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._open: set[_Side] = set()

    def open(
        self, request: IRequest, lease: Deferred[Lease], path: str, drop: frozenset[bytes]
    ) -> None:
        """Tunnel ``request`` to ``path`` on the server of the lease ``lease`` fires with;
        errors before the tunnel stands are answered OpenAI-shaped."""
        lease.addCallback(self._connect, request, path, drop)
        lease.addErrback(self._failed, request)
        request.notifyFinish().addErrback(lambda _: lease.cancel())  # type: ignore[attr-defined]

    def _connect(
        self, lease: Lease, request: IRequest, path: str, drop: frozenset[bytes]
    ) -> Deferred[None]:
        parts = urlsplit(server_root(lease.backend_url))
        if parts.scheme != "http" or parts.hostname is None:
            lease.release()
            raise errors.bad_request("Only a model served over plain HTTP can be tunnelled")
        port = parts.port or 80
        backend = _Side(self)
        endpoint = HostnameEndpoint(self._reactor, parts.hostname, port, timeout=CONNECT_TIMEOUT)
        d: Deferred[None] = connectProtocol(endpoint, backend)
        d.addCallback(lambda _: self._splice(request, backend, parts.netloc, path, drop, lease))
        d.addBoth(_released, lease)
        return d

    def _splice(
        self, request: IRequest, backend: _Side, host: str, path: str, drop: frozenset[bytes],
        lease: Lease,
    ) -> None:  # fmt: skip
        if request.finished or getattr(request, "_disconnected", False):  # type: ignore[attr-defined]
            backend.transport.loseConnection()  # type: ignore[union-attr]
            return
        headers = request_headers(request, drop)
        if lease.authorization is not None:
            headers.setRawHeaders(b"authorization", [lease.authorization])
        lines = [
            request.method + b" " + path.encode("latin-1") + b" HTTP/1.1",
            b"Host: " + host.encode(),
        ]
        lines += [
            name + b": " + value for name, values in headers.getAllRawHeaders() for value in values
        ]
        lines += [b"Connection: Upgrade", b"Upgrade: " + (request.getHeader(b"upgrade") or b"")]
        channel = request.channel  # type: ignore[attr-defined]
        client = _Side(self, channel.connectionLost)  # the site counts the connection until then
        transport, channel.transport = channel.transport, None
        channel.setTimeout(None)  # an open socket is not an idle connection
        transport.protocol = client
        client.transport = transport
        client.peer, backend.peer = backend, client
        self._open.update((client, backend))
        assert backend.transport is not None
        backend.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        transport.unregisterProducer()  # the HTTP channel was its producer until now
        transport.registerProducer(backend.transport, True)
        backend.transport.registerProducer(transport, True)  # type: ignore[attr-defined]
        transport.resumeProducing()  # Twisted paused it while the request was served
        log.info("upstream: a {kind} tunnel to {path} opened", kind=request.getHeader(b"upgrade"),
                 path=errors.printable(path))  # fmt: skip

    def _failed(self, failure: Failure, request: IRequest) -> None:
        if failure.check(errors.APIError):
            err: errors.APIError = failure.value  # type: ignore[assignment]
        elif failure.check(Exception) and not request.finished:  # type: ignore[attr-defined]
            log.warn("upstream: a tunnel could not open: {e}", e=failure.value)
            err = errors.backend_error("The model's server did not take the upgraded connection")
        else:
            return
        gone = getattr(request, "_disconnected", False) or request.finished  # type: ignore[attr-defined]
        if gone or request.channel.transport is None:  # type: ignore[attr-defined]  # tunnelled
            log.failure("upstream: a tunnel", failure)
            return
        request.write(errors.render(request, err))
        request.finish()

    def ended(self, side: _Side) -> None:
        self._open.discard(side)

    def stopService(self) -> None:
        super().stopService()
        for side in list(self._open):
            if side.transport is not None:
                side.transport.loseConnection()


def _released(result: Any, lease: Lease) -> Any:
    lease.release()
    return result
