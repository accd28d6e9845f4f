"""WebSockets through ``/upstream/``: the model loaded as for a request, the connection spliced
to its server (the real ``websocket-client`` against a fake backend that speaks RFC 6455), and
the model still free to be swapped out while the socket stays open."""

from __future__ import annotations

import json
import socket
from typing import Any

import websocket
from twisted.internet.defer import inlineCallbacks

from tests.support import wait_for
from tests.test_daemon import DaemonTestCase, starts


class TunnelTests(DaemonTestCase):
    def connect(self, path: str, **kw: Any) -> Any:
        url = self.daemon.url.replace("http://", "ws://") + path
        return self.in_thread(websocket.create_connection, url, timeout=30, **kw)

    @inlineCallbacks
    def test_a_websocket_loads_its_model_and_does_not_hold_it(self) -> Any:
        daemon = self.start({"a": self.fake("a"), "b": self.fake("b")})
        ws = yield self.connect("/upstream/a/ws?client=1", cookie="llmswap_session=secret")
        yield self.in_thread(ws.send, "hello")
        seen = json.loads((yield self.in_thread(ws.recv)))
        port = daemon.service.config.models["a"].backend_url.split(":")[2].split("/")[0]
        self.assertEqual(seen, {"name": "a", "path": "/ws?client=1", "message": "hello",
                                "host": f"127.0.0.1:{port}", "authorization": None})  # fmt: skip
        self.assertEqual(starts(self.ledger), ["a"])
        tunnels = daemon.service.tunnels
        self.assertEqual(len(tunnels._open), 2)  # its two ends
        # The open socket does not hold the model: a request for b swaps it out, which closes
        # the socket; b is served meanwhile.
        answer = yield self.chat("b")
        self.assertEqual(answer.choices[0].message.content, "Hello from b")
        # Its server stopped: the socket ends (no close frame from a stopped process).
        with self.assertRaises(websocket.WebSocketConnectionClosedException):
            yield self.in_thread(ws.recv)
        yield wait_for(lambda: not tunnels._open)
        self.assert_one_at_a_time()
        # A socket for an unknown model, or to a path the server refuses, is answered as HTTP.
        for path, status in (("/upstream/nope/ws", 404), ("/upstream/a/other", 404)):
            with self.assertRaises(websocket.WebSocketBadStatusException) as refused:
                yield self.connect(path)
            self.assertEqual(refused.exception.status_code, status)


class EagerClientTests(DaemonTestCase):
    @inlineCallbacks
    def test_a_frame_sent_with_the_upgrade_request_reaches_the_backend(self) -> Any:
        """A client that does not wait for the 101: its first frame, in the same segment as its
        request, was in llmswap's buffer when the connection was handed over."""
        self.start({"a": self.fake("a")})
        port = self.daemon.port

        def eager() -> bytes:
            payload, mask = b"early", b"\x01\x02\x03\x04"
            frame = b"\x81" + bytes([0x80 | len(payload)]) + mask + bytes(
                b ^ mask[i % 4] for i, b in enumerate(payload)
            )  # fmt: skip
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                raw.sendall(b"GET /upstream/a/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                            b"Sec-WebSocket-Version: 13\r\n\r\n" + frame)  # fmt: skip
                seen = b""
                while b'"early"' not in seen:
                    chunk = raw.recv(65536)
                    if not chunk:
                        break
                    seen += chunk
                return seen

        seen = yield self.in_thread(eager)
        self.assertTrue(seen.startswith(b"HTTP/1.1 101"), seen[:100])
        self.assertIn(b'"message": "early"', seen)
