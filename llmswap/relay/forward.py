"""Relay: forward one request to a ready backend and stream its answer back as it arrives.

The body goes out as the exact bytes the client sent (fields llmswap does not know, such as
``tools`` or vendor parameters, survive untouched) over a persistent connection pool.  The answer
is written to the client chunk by chunk as the backend produces it, with no parsing, so a
``"stream": true`` response reaches the client event by event.  The returned Deferred fires only
after the last byte, which is what keeps the backend's lease (and the one-model guarantee) held
for the whole stream; cancelling it (the client went away) aborts the backend connection at once.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import attrs
import treq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IRequest

from llmswap import errors
from llmswap.config import secrets
from llmswap.headers import NOT_RELAYED, request_headers
from llmswap.interfaces import IAnswerWriter
from llmswap.relay.body import BytesBody
from llmswap.relay.ending import OPENAI, StreamEnd
from llmswap.relay.pipe import Pipe

log = Logger()


@attrs.frozen
class Relayed:
    """How a relay ended: the backend's status (0: cut off mid-body), when its first body
    bytes went out, and the body's last chunks."""

    status: int
    first_byte_at: float | None = None
    tail: bytes = b""


def started_writing(request: IRequest) -> bool:
    """Whether the status line and headers already went out (Request has it; IRequest not)."""
    return bool(getattr(request, "startedWriting", False))


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
        ending: StreamEnd = OPENAI,
    ) -> Deferred[Relayed]:
        """Relay ``body`` to ``url``; fires with how it went after the last byte.

        A file ``body`` (an upload Twisted kept in a temporary file) is sent from its start in
        chunks, never read whole into memory.

        ``drop`` names request headers not to forward (llmswap's own API keys); ``writer``,
        when given, writes the answer instead of passing the backend's bytes on;
        ``authorization`` replaces the client's key (a remote model's own); ``ending`` is how
        the route's API ends a stream, and its error events.

        Fails with an APIError only while nothing was written to the client yet; once the
        backend's headers went out, a failure ends the response instead (an error event for an
        SSE stream, an aborted connection otherwise, so it never looks like a complete answer).
        """
        assert self._agent is not None
        pipe = Pipe(request, self._clock, self.idle_timeout, writer)
        if isinstance(body, bytes):
            producer: Any = BytesBody(body)
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

                def written(b: bytes) -> Relayed:
                    request.write(ending.backend_error(model, response.code, b))
                    return Relayed(response.code, tail=b[-4096:])

                return body.addCallback(written)
            if writer is not None:
                writer.start(response.code, response.headers)
            elif not committed:
                if _held(response):
                    pipe.hold()
                else:
                    _answer(response)
            response.deliverBody(pipe)
            if pipe.held is not None:  # the headers and the body go out once it has all come
                pipe.done.addCallback(lambda _: _answer(response))
            return pipe.done.addCallback(ended, response.code)

        def _answer(response: Any) -> None:
            request.setResponseCode(response.code, response.phrase)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in NOT_RELAYED:
                    request.responseHeaders.setRawHeaders(name, values)
            for data in pipe.held or ():
                request.write(data)

        def ended(_: None, code: int) -> Relayed:
            tail = b"".join(pipe.tail)
            if writer is not None:
                writer.end()
            elif (
                not pipe.framed
                and _is_stream(request.responseHeaders)
                and not ending.complete(tail)
            ):
                # Delimited by the connection's close, which a dead backend closes too.
                self._mid_body(request, model, pipe, None, ending)
                return Relayed(0, pipe.first_at)
            return Relayed(code, pipe.first_at, tail)

        def failed(f: Failure) -> None:
            pipe.stop_timer()
            if result.called:
                return
            if pipe.transport is None or pipe.held is not None:  # nothing reached the client
                result.errback(self._before_headers(f, pipe, model, url))
                return
            self._mid_body(request, model, pipe, writer, ending)
            result.callback(Relayed(0, pipe.first_at))

        def finished(relayed: Relayed) -> None:
            if not result.called:
                result.callback(relayed)

        sent.addCallback(got_response).addCallbacks(finished, failed)
        return result

    def _before_headers(self, f: Failure, pipe: Pipe, model: str, url: str) -> Failure:
        if pipe.idle:
            return Failure(
                errors.gateway_timeout(
                    f"Model '{model}' sent no response within request_timeout "
                    f"({self.idle_timeout:g} s)"
                )
            )
        if f.check(CancelledError, errors.APIError):
            return f
        # A URL's credentials are the operator's secret: not in the log (the console shows it).
        url, why = secrets.scrubbed(url, ()), secrets.scrubbed(f.getErrorMessage(), ())
        if pipe.held is not None:
            log.warn("{model}: backend at {url} closed mid-answer: {e}", model=model, url=url,
                     e=why)  # fmt: skip
            return Failure(errors.backend_error(f"Model '{model}' backend closed the connection "
                                                "before its answer was complete"))  # fmt: skip
        log.warn("{model}: backend at {url} unreachable: {e}", model=model, url=url,
                 e=why)  # fmt: skip
        err = errors.backend_error(f"Model '{model}' backend is unreachable")
        return Failure(BackendGone(err) if f.check(ConnectError) else err)

    def _mid_body(
        self,
        request: IRequest,
        model: str,
        pipe: Pipe,
        writer: IAnswerWriter | None,
        ending: StreamEnd,
    ) -> None:
        why = (
            f"no data for request_timeout ({self.idle_timeout:g} s)"
            if pipe.idle
            else "the backend closed the connection"
        )
        if writer is not None:
            writer.fail(why, 504 if pipe.idle else 502)
            return
        if _is_stream(request.responseHeaders):
            request.write(
                ending.error(errors.backend_error(f"Model '{model}' stream interrupted: {why}"))
            )
        else:
            transport = getattr(request, "channel", None)
            if transport is not None and transport.transport is not None:
                transport.transport.abortConnection()


# A whole answer up to this size is held until its last byte (llama-server's and vLLM's
# non-streamed answers come with their length, in one piece once generated, so holding them costs
# no latency); larger ones, and any without a length, pass through as they arrive.
HOLD_LIMIT = 4 * 1024 * 1024


def _held(response: Any) -> bool:
    """Whether an answer is held whole: not an event stream, its length known and small."""
    length = response.length
    return not _is_stream(response.headers) and isinstance(length, int) and length <= HOLD_LIMIT


def _is_stream(headers: Headers) -> bool:
    content_type: bytes = headers.getRawHeaders(b"content-type", [b""])[0]
    return content_type.startswith(b"text/event-stream")
