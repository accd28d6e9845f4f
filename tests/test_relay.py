"""The relay on a memory reactor: what a client gets when a backend fails before its headers,
in the middle of a body, stays silent, or when the client leaves (the same paths run end to end
with real processes in test_daemon.py).  Twisted tests its own proxy this way."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web._newclient import RequestNotSent
from twisted.web.client import URI, ResponseDone, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from llmswap import errors
from llmswap.relay.agent import ATTEMPT_DELAY, Endpoints, _SentAgain
from llmswap.relay.body import BytesBody
from llmswap.relay.ending import ANTHROPIC, OPENAI_OTHER
from llmswap.relay.forward import BackendGone, Relay, Relayed
from llmswap.relay.usage import speed_from, usage_from

URL = "http://127.0.0.1:8081/v1/chat/completions"
BODY = b'{"model": "m", "messages": [], "vendor_field": 1}'


class Sink:
    """Where a body producer writes: the bytes the backend would receive."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


@implementer(IAgent)
class Backend:
    """An Agent whose answers the test gives, one request at a time."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, bytes, Headers, bytes]] = []
        self.answer: Deferred[Any] = Deferred()
        self.cancelled = False

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[Any]:
        sink = Sink()
        assert bodyProducer is not None and headers is not None
        bodyProducer.startProducing(sink)
        self.received.append((method, uri, headers, sink.data))

        def cancel(_: Deferred[Any]) -> None:
            self.cancelled = True

        self.answer = Deferred(cancel)
        return self.answer


class Response:
    """A backend's response whose body the test delivers chunk by chunk."""

    def __init__(self, code: int, content_type: bytes, phrase: bytes = b"OK") -> None:
        self.code, self.phrase = code, phrase
        self.length: int | str = UNKNOWN_LENGTH
        self.headers = Headers({b"content-type": [content_type], b"x-backend": [b"yes"]})
        self.transport = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self, reason: BaseException | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ResponseDone()))


class Client:
    """A client's request as the relay sees it, with a connection it can abort."""

    def __init__(self, committed: bool = False) -> None:
        request: Any = DummyRequest([b"v1", b"chat", b"completions"])
        request.method = b"POST"
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer llmswap-key"])
        request.requestHeaders.setRawHeaders(b"x-client", [b"kept"])
        request.channel = SimpleNamespace(transport=SimpleNamespace(abortConnection=self.abort))
        if committed:  # a 200 event stream already went out (loading comments)
            request.startedWriting = 1
        self.request = request
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    @property
    def body(self) -> bytes:
        return b"".join(self.request.written)


class RelayTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = Backend()
        self.relay = Relay(self.backend, self.clock, idle_timeout=30)
        self.client = Client()

    def forward(self, client: Client | None = None, **kw: Any) -> Deferred[Relayed]:
        client = client or self.client
        return self.relay.forward(client.request, "m", URL, BODY, **kw)

    def closed_stream(self, body: bytes, client: Client | None = None, **kw: Any) -> int:
        """An event stream ``body`` whose end is its connection's close; the relay's status
        for it (0: cut off)."""
        done = self.forward(client, **kw)
        response = Response(200, b"text/event-stream")
        self.backend.answer.callback(response)
        response.send(body)
        response.end(PotentialDataLoss())
        return self.successResultOf(done).status

    def test_the_body_goes_out_as_sent_and_the_answer_comes_back_as_it_arrives(self) -> None:
        done = self.forward(drop=frozenset({b"authorization"}))
        method, uri, headers, body = self.backend.received[0]
        self.assertEqual((method, uri, body), (b"POST", URL.encode(), BODY))
        self.assertIsNone(headers.getRawHeaders(b"authorization"))  # llmswap's key stays here
        self.assertEqual(headers.getRawHeaders(b"x-client"), [b"kept"])
        response = Response(200, b"text/event-stream")
        self.backend.answer.callback(response)
        response.send(b'data: {"a": 1}\n\n')
        self.assertEqual(self.client.body, b'data: {"a": 1}\n\n')  # before the end
        self.assertNoResult(done)
        self.clock.advance(5)
        response.send(b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n')
        response.end()
        relayed = self.successResultOf(done)
        self.assertEqual((relayed.status, relayed.first_byte_at), (200, 0))
        self.assertEqual(usage_from(relayed.tail), (3, 2))
        self.assertEqual(self.client.request.responseHeaders.getRawHeaders(b"x-backend"), [b"yes"])

    def test_a_refused_connection_is_backend_gone_so_the_request_may_be_sent_again(self) -> None:
        done = self.forward()
        self.backend.answer.errback(ConnectionRefusedError())
        failure = self.failureResultOf(done, BackendGone)
        self.assertEqual(failure.value.error.status, 502)
        self.assertEqual(self.client.body, b"")

    def test_a_backend_lost_before_its_headers_is_a_502_in_the_apis_shape(self) -> None:
        done = self.forward()
        self.backend.answer.errback(ConnectionLost("reset"))
        failure = self.failureResultOf(done, errors.APIError)
        self.assertEqual(failure.value.status, 502)
        self.assertIn("Model 'm' backend is unreachable", failure.value.message)

    def test_a_backend_urls_credentials_never_reach_the_log(self) -> None:
        logged: list[str] = []
        observer = cast(ILogObserver, lambda event: logged.append(formatEvent(event)))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        done = self.relay.forward(self.client.request, "m", "http://bob:pw-0123456789@b:9/v1/x",
                                  BODY)  # fmt: skip
        self.backend.answer.errback(ConnectionLost("reset by http://bob:pw-0123456789@b:9"))
        self.failureResultOf(done, errors.APIError)
        (line,) = [m for m in logged if "unreachable" in m]
        self.assertNotIn("pw-0123456789", line)
        self.assertIn("http://bob:(secret)@b:9/v1/x", line)

    def test_silence_before_the_headers_is_a_504_and_the_backend_request_is_cancelled(
        self,
    ) -> None:
        done = self.forward()
        self.clock.advance(29)
        self.assertNoResult(done)
        self.clock.advance(1)
        failure = self.failureResultOf(done, errors.APIError)
        self.assertEqual(failure.value.status, 504)
        self.assertIn("request_timeout (30 s)", failure.value.message)
        self.assertTrue(self.backend.cancelled)

    def test_a_stream_cut_mid_body_ends_with_an_error_event_never_a_silent_end(self) -> None:
        done = self.forward()
        response = Response(200, b"text/event-stream")
        self.backend.answer.callback(response)
        response.send(b'data: {"a": 1}\n\n')
        response.end(ConnectionLost("reset"))
        self.assertEqual(self.successResultOf(done).status, 0)  # cut off
        last = self.client.body.split(b"\n\n")[-2]
        self.assertTrue(last.startswith(b"data: "))
        error = json.loads(last[len(b"data: ") :])["error"]
        self.assertEqual(error["message"], "Model 'm' stream interrupted: the backend closed the "
                         "connection")  # fmt: skip
        self.assertFalse(self.client.aborted)

    def test_a_stream_that_ends_with_its_connection_before_done_is_cut_not_complete(
        self,
    ) -> None:
        # No length and no chunks: the body ends when the connection closes, as a dead
        # backend's does.  Only the missing [DONE] tells.
        self.assertEqual(self.closed_stream(b'data: {"a": 1}\n\n'), 0)
        last = self.client.body.split(b"\n\n")[-2]
        error = json.loads(last[len(b"data: ") :])["error"]
        self.assertIn("Model 'm' stream interrupted", error["message"])
        # The same framing with its last event is complete.
        client = Client()
        self.assertEqual(self.closed_stream(b'data: {"a": 1}\n\ndata: [DONE]\n\n', client), 200)
        self.assertTrue(client.body.endswith(b"data: [DONE]\n\n"))

    def test_a_stream_whose_end_is_not_known_is_left_as_it_came(self) -> None:
        # A Responses API stream ends with response.completed, never [DONE].
        self.assertEqual(
            self.closed_stream(
                b'event: response.completed\ndata: {"type": "response.completed"}\n\n',
                ending=OPENAI_OTHER,
            ),
            200,
        )
        self.assertNotIn(b"error", self.client.body)

    def test_done_quoted_in_an_answer_is_not_its_end(self) -> None:
        self.assertEqual(
            self.closed_stream(b'data: {"choices": [{"delta": {"content": "data: [DONE]"}}]}\n\n'),
            0,
        )
        self.assertIn(b"stream interrupted", self.client.body)

    def test_an_anthropic_stream_cut_ends_with_anthropics_error_event(self) -> None:
        self.assertEqual(
            self.closed_stream(
                b'event: message_start\ndata: {"type": "message_start"}\n\n', ending=ANTHROPIC
            ),
            0,
        )
        last = self.client.body.split(b"\n\n")[-2]
        name, data = last.split(b"\n")
        self.assertEqual(name, b"event: error")
        event = json.loads(data[len(b"data: ") :])
        self.assertEqual(event["type"], "error")
        self.assertEqual(event["error"]["type"], "api_error")
        self.assertIn("stream interrupted", event["error"]["message"])

    def test_a_silent_json_body_aborts_the_client_connection(self) -> None:
        done = self.forward()
        response = Response(200, b"application/json")
        self.backend.answer.callback(response)
        response.send(b'{"choices": [')
        self.clock.advance(30)
        self.assertTrue(response.transport.producerState == "stopped")  # backend read stopped
        response.end(ConnectionLost("aborted"))
        self.assertEqual(self.successResultOf(done).status, 0)
        # Half a JSON body must not look complete: the connection is cut, not finished.
        self.assertTrue(self.client.aborted)
        self.assertEqual(self.client.body, b'{"choices": [')

    def test_a_whole_answer_with_its_length_is_held_to_its_end_so_a_cut_is_a_502(self) -> None:
        answer = b'{"choices": [{"message": {"content": "hi"}}]}'
        for cut in (False, True):
            client = Client()
            done = self.forward(client)
            response = Response(200, b"application/json")
            response.length = len(answer)
            self.backend.answer.callback(response)
            response.send(answer[:13])
            self.assertEqual((client.body, client.request.responseCode), (b"", None))
            if cut:  # killed mid-body: nothing went out, so an error can still be said
                response.end(ConnectionLost("reset"))
                failure = self.failureResultOf(done, errors.APIError)
                self.assertEqual(failure.value.status, 502)
                self.assertIn("closed the connection before its answer was complete",
                              failure.value.message)  # fmt: skip
                self.assertFalse(client.aborted)
            else:
                response.send(answer[13:])
                response.end()
                self.assertEqual(self.successResultOf(done).status, 200)
                self.assertEqual((client.body, client.request.responseCode), (answer, 200))
                self.assertEqual(client.request.responseHeaders.getRawHeaders(b"x-backend"),
                                 [b"yes"])  # fmt: skip

    def test_a_backend_error_after_loading_comments_travels_as_an_error_event(self) -> None:
        client = Client(committed=True)
        done = self.forward(client)
        response = Response(500, b"application/json", b"Internal Server Error")
        self.backend.answer.callback(response)
        response.send(b'{"error": {"message": "out of memory", "code": 500}}')
        response.end()
        self.assertEqual(self.successResultOf(done).status, 500)
        self.assertEqual(
            client.body, b'data: {"error": {"message": "out of memory", "code": 500}}\n\n'
        )

    def test_on_anthropics_route_a_backends_openai_error_arrives_in_anthropics_shape(
        self,
    ) -> None:
        client = Client(committed=True)
        done = self.forward(client, ending=ANTHROPIC)
        response = Response(500, b"application/json", b"Internal Server Error")
        self.backend.answer.callback(response)
        response.send(b'{"error": {"message": "out of memory", "code": 500}}')
        response.end()
        self.assertEqual(self.successResultOf(done).status, 500)
        name, data = client.body.rstrip().split(b"\n")
        self.assertEqual(name, b"event: error")
        event = json.loads(data[len(b"data: ") :])
        self.assertEqual(event["type"], "error")
        self.assertEqual(event["error"]["message"], "Model 'm': out of memory")

    def test_a_backend_error_that_is_not_json_is_quoted_capped(self) -> None:
        client = Client(committed=True)
        done = self.forward(client)
        response = Response(503, b"text/html", b"Unavailable")
        self.backend.answer.callback(response)
        response.send(b"<html>" + b"x" * 5000)
        response.end()
        self.successResultOf(done)
        error = json.loads(client.body[len(b"data: ") :])["error"]
        self.assertTrue(error["message"].startswith("Model 'm' answered 503: <html>xxx"))
        self.assertLess(len(error["message"]), 300)

    def test_a_client_that_leaves_cancels_the_unanswered_request_or_stops_the_body(self) -> None:
        waiting = self.forward()
        waiting.cancel()
        self.assertTrue(self.backend.cancelled)
        self.failureResultOf(waiting, CancelledError)

        reading = self.forward(Client())
        response = Response(200, b"text/event-stream")
        self.backend.answer.callback(response)
        response.send(b"data: 1\n\n")
        reading.cancel()
        self.assertEqual(response.transport.producerState, "stopped")
        self.failureResultOf(reading, CancelledError)


def test_usage_and_speed_come_from_the_last_objects_of_the_tail() -> None:
    tail = (b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n\n'
            b'data: {"usage": {"input_tokens": 7, "output_tokens": 9}, '
            b'"timings": {"predicted_per_second": 41.5}}\n\n')  # fmt: skip
    assert usage_from(tail) == (7, 9)
    assert speed_from(tail) == 41.5
    assert usage_from(b'{"usage": {"prompt_tokens": "x"}}') is None
    assert usage_from(b'..."usage": {"prompt_tok') is None  # cut: not parsed, not guessed
    assert speed_from(b"{}") is None


class EndpointTests(unittest.TestCase):
    def test_one_endpoint_per_backend_origin_and_tls_for_https(self) -> None:
        endpoints = Endpoints(MemoryReactorClock())

        def at(url: bytes) -> object:
            return endpoints.endpointForURI(URI.fromBytes(url))

        plain = at(b"http://127.0.0.1:8081/v1/chat/completions")
        # An address is connected to as one, at once: no resolver thread, no happy-eyeballs race.
        self.assertIsInstance(plain, TCP4ClientEndpoint)
        self.assertIsInstance(at(b"http://[::1]:8081/v1/models"), TCP6ClientEndpoint)
        self.assertIsInstance(at(b"http://gpu-box.lan:8081/v1/models"), HostnameEndpoint)
        self.assertIs(at(b"http://127.0.0.1:8081/health"), plain)
        self.assertIsNot(at(b"http://127.0.0.1:8082/v1/models"), plain)
        tls = at(b"https://127.0.0.1:8081/v1/models")
        self.assertNotIsInstance(tls, HostnameEndpoint)  # a TLS wrapper around one
        self.assertIs(at(b"https://127.0.0.1:8081/v1/embeddings"), tls)

    def test_a_named_backend_that_refuses_is_known_to_refuse_within_the_attempt_delay(self) -> None:
        reactor = MemoryReactorClock()
        endpoint = Endpoints(reactor).endpointForURI(URI.fromBytes(b"http://vllm.lan:8000/health"))
        connecting = endpoint.connect(Factory.forProtocol(Protocol))
        factory = reactor.tcpClients[0][2]
        factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
        reactor.advance(ATTEMPT_DELAY)  # Twisted's default would wait 0.3 s to say so
        self.failureResultOf(connecting, ConnectionRefusedError)


class SentAgainTests(unittest.TestCase):
    """A request on a kept-alive connection that closed unanswered goes once more on a new one;
    what a refused new connection means depends on whether the backend may have read it."""

    def outcome(self, first: Exception, again: Deferred[Any]) -> Failure | Any:
        kept = SimpleNamespace(request=lambda request: fail(first))
        request = SimpleNamespace(bodyProducer=BytesBody(b"{}"))
        sent = _SentAgain(kept, lambda: again)  # type: ignore[arg-type]
        results: list[Any] = []
        sent.request(request).addBoth(results.append)
        return results[0]

    def test_never_sent_then_refused_is_refused_so_the_model_is_restarted(self) -> None:
        result = self.outcome(RequestNotSent(), fail(ConnectionRefusedError()))
        self.assertTrue(result.check(ConnectionRefusedError))

    def test_read_maybe_then_refused_is_the_first_failure_and_nothing_is_restarted(self) -> None:
        # The backend may have died of it: sending it once more after a restart could kill
        # it again.
        result = self.outcome(ResponseNeverReceived([]), fail(ConnectionRefusedError()))
        self.assertTrue(result.check(ResponseNeverReceived))

    def test_sent_again_on_a_new_connection_that_answers(self) -> None:
        fresh = SimpleNamespace(request=lambda request: succeed("answered"))
        result = self.outcome(ResponseNeverReceived([]), succeed(fresh))
        self.assertEqual(result, "answered")
