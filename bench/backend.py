"""A fast OpenAI-shaped backend for benchmarks: answers at once, so what is measured is the proxy.

Plain asyncio (no framework) so it is never the bottleneck.  ``POST /v1/...`` answers a small
chat completion, or with ``"stream": true`` a chunked SSE stream of ``"events"`` events (default 8)
each carrying the time it was generated (``"t"``), ``"interval"`` seconds apart (default: as fast
as possible), then ``data: [DONE]``.  ``"hold": S`` makes the
answer wait S seconds (to keep a model busy while requests queue).  ``GET /health`` answers 200.

    python -m bench.backend --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time

_CHAT = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "bench",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
_HEALTH = b'{"status":"ok"}'
_EVENTS = re.compile(rb'"events"\s*:\s*(\d+)')
_HOLD = re.compile(rb'"hold"\s*:\s*([0-9.]+)')
_INTERVAL = re.compile(rb'"interval"\s*:\s*([0-9.]+)')
_STREAM = re.compile(rb'"stream"\s*:\s*true')


def _response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


class Backend(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""
        self.busy = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        method = head.split(b" ", 1)[0]
        if method == b"GET":
            self.transport.write(_response(b"200 OK", _HEALTH))
            self._next()
            return
        self.busy = True
        self.task = asyncio.ensure_future(self._answer(body))

    async def _answer(self, body: bytes) -> None:
        hold = _HOLD.search(body)
        if hold:
            await asyncio.sleep(float(hold.group(1)))
        if _STREAM.search(body):
            found = _EVENTS.search(body)
            interval = _INTERVAL.search(body)
            await self._stream(
                int(found.group(1)) if found else 8, float(interval.group(1)) if interval else 0.0
            )
        else:
            self.transport.write(_response(b"200 OK", _CHAT))
        self.busy = False
        self._next()

    async def _stream(self, events: int, interval: float) -> None:
        w = self.transport.write
        w(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        w(b"transfer-encoding: chunked\r\n\r\n")
        for i in range(events):
            event = b'data: {"i": %d, "t": %.6f}\n\n' % (i, time.time())
            w(b"%x\r\n%s\r\n" % (len(event), event))
            if interval:
                await asyncio.sleep(interval)
            elif i % 64 == 63:  # let the loop flush and serve others now and then
                await asyncio.sleep(0)
        done = b"data: [DONE]\n\n"
        w(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(Backend, "127.0.0.1", args.port))
    try:
        loop.run_until_complete(server.serve_forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
