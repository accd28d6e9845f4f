"""Relay: forward one request to a ready backend and stream its answer back as it arrives.

The body goes out as the exact bytes the client sent (fields llmswap does not know, such as
``tools`` or vendor parameters, survive untouched) over a persistent connection pool.  The answer
is written to the client chunk by chunk as the backend produces it, with no parsing, so a
``"stream": true`` response reaches the client event by event.  The returned Deferred fires only
after the last byte, which is what keeps the backend's lease (and the one-model guarantee) held
for the whole stream; cancelling it (the client went away) aborts the backend connection at once.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, BinaryIO, cast

import attrs
import treq
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IRequest
from zope.interface import implementer

from llmswap import errors
from llmswap.headers import NOT_RELAYED, request_headers
from llmswap.interfaces import IAnswerWriter

log = Logger()
_DECODER = json.JSONDecoder()


class _Pipe(Protocol):
    """Copies a backend response body to the client request as it arrives.

    It exists from the moment the request is sent: its one timer measures the backend's silence
    (no response headers, or no body bytes, for ``idle_timeout``) across the whole exchange.
    """

    def __init__(
        self,
        request: IRequest,
        clock: IReactorTime,
        idle_timeout: float,
        writer: IAnswerWriter | None,
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self._request = request
        # Where the body goes: the client as it is, or a writer that translates it.
        self._write = request.write if writer is None else writer.data
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall = clock.callLater(idle_timeout, self._went_idle)
        self.unanswered: Deferred[Any] | None = None  # the request, until its headers arrive
        self.idle = False
        self.first_at: float | None = None
        # The last chunks, for the usage object at the end: kept, not parsed, per chunk.
        self.tail: deque[bytes] = deque(maxlen=4)

    def answered(self) -> None:
        self.unanswered = None
        self._timer.reset(self._idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        self._timer.reset(self._idle_timeout)
        if self.first_at is None:
            self.first_at = self._clock.seconds()
        self.tail.append(data)
        self._write(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.stop_timer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def abort(self) -> None:
        if self.unanswered is not None:
            self.unanswered.cancel()
        elif self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def stop_timer(self) -> None:
        if self._timer.active():
            self._timer.cancel()

    def _went_idle(self) -> None:
        self.idle = True
        self.abort()


@attrs.frozen
class Relayed:
    """How a relay ended: the backend's status (0: cut off mid-body), when its first body
    bytes went out, and the body's last chunks."""

    status: int
    first_byte_at: float | None = None
    tail: bytes = b""


def _last_object(tail: bytes, key: bytes) -> dict[str, Any] | None:
    """The JSON object after the last ``"key":`` in ``tail``, if it parses."""
    at = tail.rfind(b'"' + key + b'"')
    start = tail.find(b"{", at) if at >= 0 else -1
    if start < 0:
        return None
    try:
        found, _ = _DECODER.raw_decode(tail[start:].decode("utf-8", "replace"))
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def usage_from(tail: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from the last ``"usage"`` object in a response's
    ``tail`` (backends put it at the end of an answer, or in the last event of a stream);
    Anthropic's Messages API calls them input and output tokens."""
    usage = _last_object(tail, b"usage")
    if usage is None:
        return None
    if "input_tokens" in usage:
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens", 0)
    else:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def speed_from(tail: bytes) -> float | None:
    """Generated tokens per second as llama-server measured them (its ``timings``)."""
    timings = _last_object(tail, b"timings")
    speed = timings.get("predicted_per_second") if timings else None
    return float(speed) if isinstance(speed, int | float) else None


def started_writing(request: IRequest) -> bool:
    """Whether the status line and headers already went out (Request has it; IRequest not)."""
    return bool(getattr(request, "startedWriting", False))


def sse_event(payload: bytes) -> bytes:
    """One SSE event: how an error reaches a stream whose 200 already went out."""
    return b"data: " + payload + b"\n\n"


def _error_event(model: str, code: int, body: bytes) -> bytes:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "error" in parsed:
        payload = json.dumps(parsed).encode()
    else:
        text = body[:200].decode("utf-8", "replace")
        payload = errors.backend_error(f"Model '{model}' answered {code}: {text}").body()
    return sse_event(payload)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Builds each backend origin's endpoint once.

    Agent's own factory builds a new HostnameEndpoint for every request, IDNA-encoding the host
    each time: about 9% of the CPU of a relayed request (profiled).  Backends are few.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._https = BrowserLikePolicyForHTTPS()
        self._built: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._built.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(self._reactor, uri.host.decode("ascii"), uri.port)
            if uri.scheme == b"https":
                tls = self._https.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(tls, endpoint)
            self._built[key] = endpoint
        return endpoint


def backend_agent(reactor: Any, pool: HTTPConnectionPool) -> Agent:
    """The Agent for everything sent to backends (health polls and relayed requests)."""
    agent: Agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor), pool)
    return agent


@implementer(IBodyProducer)
class _Body:
    """The request body, written in one go: it is already in memory.

    (treq would wrap it in a FileBodyProducer, which writes from a cooperator task on a later
    reactor turn: measurable latency on every request.)
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class BackendGone(Exception):
    """The backend refused the connection: the request never reached it, so it may be sent
    again once the backend is back.  ``error`` is what the client gets if it is not."""

    def __init__(self, error: errors.APIError) -> None:
        super().__init__(error.message)
        self.error = error


class Relay:
    """Sends requests to backends through one ``Agent`` (and its persistent connection pool).

    The hot path uses the Agent directly rather than treq: no URL object per request, no
    cooperator for the body.
    """

    def __init__(self, agent: IAgent | None, clock: IReactorTime, idle_timeout: float) -> None:
        self._agent = agent
        self._clock = clock
        self.idle_timeout = idle_timeout

    def forward(
        self,
        request: IRequest,
        model: str,
        url: str,
        body: bytes | BinaryIO,
        drop: frozenset[bytes] = frozenset(),
        writer: IAnswerWriter | None = None,
        authorization: bytes | None = None,
    ) -> Deferred[Relayed]:
        """Relay ``body`` to ``url``; fires with how it went after the last byte.

        A file ``body`` (an upload Twisted kept in a temporary file) is sent from its start in
        chunks, never read whole into memory.

        ``drop`` names request headers not to forward (llmswap's own API keys); ``writer``,
        when given, writes the answer instead of passing the backend's bytes on;
        ``authorization`` replaces the client's key (a remote model's own).

        Fails with an APIError only while nothing was written to the client yet; once the
        backend's headers went out, a failure ends the response instead (an error event for an
        SSE stream, an aborted connection otherwise, so it never looks like a complete answer).
        """
        assert self._agent is not None
        pipe = _Pipe(request, self._clock, self.idle_timeout, writer)
        if isinstance(body, bytes):
            producer: Any = _Body(body)
        else:
            body.seek(0)
            producer = FileBodyProducer(body)
        headers = request_headers(request, drop)
        if authorization is not None:
            headers.removeHeader(b"x-api-key")
            headers.setRawHeaders(b"authorization", [authorization])
        sent = self._agent.request(request.method, url.encode("latin-1"), headers, producer)
        if not sent.called:
            pipe.unanswered = sent
        result: Deferred[Relayed] = Deferred(lambda _: pipe.abort())
        committed = started_writing(request)

        def got_response(response: Any) -> Deferred[Any]:
            pipe.answered()
            if committed and response.code >= 300:
                # A 200 event stream already went out (queue keep-alive comments): the
                # backend's error can only travel as an error event.
                pipe.stop_timer()
                body: Deferred[bytes] = treq.content(response)
                body.addTimeout(self.idle_timeout, self._clock)
                body.addCallback(lambda b: request.write(_error_event(model, response.code, b)))
                return body.addCallback(lambda _: Relayed(response.code))
            if writer is not None:
                writer.start(response.code, response.headers)
            elif not committed:
                request.setResponseCode(response.code, response.phrase)
                for name, values in response.headers.getAllRawHeaders():
                    if name.lower() not in NOT_RELAYED:
                        request.responseHeaders.setRawHeaders(name, values)
            response.deliverBody(pipe)
            return pipe.done.addCallback(ended, response.code)

        def ended(_: None, code: int) -> Relayed:
            if writer is not None:
                writer.end()
            return Relayed(code, pipe.first_at, b"".join(pipe.tail))

        def failed(f: Failure) -> None:
            pipe.stop_timer()
            if result.called:
                return
            if pipe.transport is None:  # no body was being relayed: nothing reached the client
                result.errback(self._before_headers(f, pipe, model, url))
                return
            self._mid_body(request, model, pipe, writer)
            result.callback(Relayed(0, pipe.first_at))

        def finished(relayed: Relayed) -> None:
            if not result.called:
                result.callback(relayed)

        sent.addCallback(got_response).addCallbacks(finished, failed)
        return result

    def _before_headers(self, f: Failure, pipe: _Pipe, model: str, url: str) -> Failure:
        if pipe.idle:
            return Failure(
                errors.gateway_timeout(
                    f"Model '{model}' sent no response within request_timeout "
                    f"({self.idle_timeout:g} s)"
                )
            )
        if f.check(CancelledError, errors.APIError):
            return f
        log.warn("{model}: backend at {url} unreachable: {e}", model=model, url=url,
                 e=f.getErrorMessage())  # fmt: skip
        err = errors.backend_error(f"Model '{model}' backend is unreachable")
        return Failure(BackendGone(err) if f.check(ConnectError) else err)

    def _mid_body(
        self, request: IRequest, model: str, pipe: _Pipe, writer: IAnswerWriter | None
    ) -> None:
        why = (
            f"no data for request_timeout ({self.idle_timeout:g} s)"
            if pipe.idle
            else "the backend closed the connection"
        )
        if writer is not None:
            writer.fail(f"Model '{model}' stream interrupted: {why}")
            return
        content_type = request.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
        if content_type.startswith(b"text/event-stream"):
            err = errors.backend_error(f"Model '{model}' stream interrupted: {why}")
            request.write(sse_event(err.body()))
        else:
            transport = getattr(request, "channel", None)
            if transport is not None and transport.transport is not None:
                transport.transport.abortConnection()
