"""The Agent llmswap sends everything to backends with (health polls and relayed requests),
and the pool of kept-alive connections under it."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol, RequestNotSent
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from llmswap.relay.body import BytesBody

_NEVER_ANSWERED = (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)


@implementer(IAgentEndpointFactory)
class Endpoints:
    """Builds each backend origin's endpoint once.

    Agent's own factory builds a new HostnameEndpoint for every request, IDNA-encoding the host
    each time: about 9% of the CPU of a relayed request (profiled).  Backends are few.  A host
    given as an address (``127.0.0.1``, as llmswap's own URLs give it) is connected to as one: a
    HostnameEndpoint resolves even an address through ``getaddrinfo`` in a pool thread, and races
    it against itself on a timer, for every new connection (every health poll of a loading
    llama-server, which closes each connection it answers 503 on).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._https = BrowserLikePolicyForHTTPS()
        self._built: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._built.get(key)
        if endpoint is None:
            endpoint = _endpoint(self._reactor, uri.host.decode("ascii"), uri.port)
            if uri.scheme == b"https":
                tls = self._https.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(tls, endpoint)
            self._built[key] = endpoint
        return endpoint


# Seconds between a name's addresses' connection attempts.  HostnameEndpoint reports a refusal
# only at its next attempt's tick, 0.3 s by default: a readiness poll of a backend named
# ``localhost`` that refuses until ready (vLLM) cost 0.3 s, where an address costs 0.5 ms.  0.1 s
# is RFC 8305's recommended least Connection Attempt Delay.
ATTEMPT_DELAY = 0.1


def _endpoint(reactor: Any, host: str, port: int) -> IStreamClientEndpoint:
    # HostnameEndpoint's default connect timeout, for all three.
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=30)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=30)
    return HostnameEndpoint(reactor, host, port, timeout=30, attemptDelay=ATTEMPT_DELAY)


def backend_agent(reactor: Any, pool: HTTPConnectionPool) -> Agent:
    """The Agent for everything sent to backends (health polls and relayed requests)."""
    agent: Agent = Agent.usingEndpointFactory(reactor, Endpoints(reactor), pool)
    return agent


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # one log line per backend connection is noise, not information


class _SentAgain:
    """A kept-alive connection taken from the pool, for one request: if the connection turns
    out closed before the backend answered a byte, the request goes once more on a new one.

    A server may close an idle kept-alive connection just as a request is written to it, and
    llama-server closes every connection after an event stream while still advertising
    ``Keep-Alive``: a request sent right after a stream (Open WebUI's title request) would
    otherwise fail as "backend unreachable".  Twisted's own retry covers only bodiless GETs;
    an inference request is as safe to send again when nothing came back, provided its body
    can be written again (bytes in memory: an upload spooled to a file is not).
    """

    def __init__(
        self, kept: HTTP11ClientProtocol, fresh: Callable[[], Deferred[HTTP11ClientProtocol]]
    ) -> None:
        self._kept = kept
        self._fresh = fresh

    def request(self, request: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._kept.request(request)

        def failed(f: Failure) -> Any:
            if not _send_again(f, request.bodyProducer):
                return f
            again = self._fresh().addCallback(lambda connection: connection.request(request))
            if f.check(ResponseNeverReceived):
                # The backend may have read it and died of it: refused now, it is answered
                # with that failure, not as a request that never reached it (which restarts
                # the model and queues the request once more: a prompt that crashes its
                # backend would crash it again).
                again.addErrback(lambda g: f if g.check(ConnectError) else g)
            return again

        return d.addErrback(failed)


def _send_again(f: Failure, body: Any) -> bool:
    if not f.check(*_NEVER_ANSWERED):
        return False
    if any(reason.check(CancelledError) for reason in getattr(f.value, "reasons", ())):
        return False  # the client went away, or a timeout gave up on it
    return body is None or isinstance(body, BytesBody)


class BackendPool(HTTPConnectionPool):
    """Persistent connections to backends, quiet in the log, and a request on a kept-alive
    connection the backend already closed is sent again on a new one (:class:`_SentAgain`)."""

    _factory = _QuietClientFactory
    maxPersistentPerHost = 32

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor, persistent=True)

    def getConnection(
        self, key: Hashable, endpoint: IStreamClientEndpoint
    ) -> Deferred[HTTP11ClientProtocol]:
        # HTTPConnectionPool.getConnection, with _SentAgain in place of Twisted's own retry.
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop(0)
            self._timeouts.pop(connection).cancel()
            if connection.state == "QUIESCENT":
                kept: Any = _SentAgain(connection, lambda: self._newConnection(key, endpoint))
                return succeed(kept)
        return self._newConnection(key, endpoint)
