"""A fake OpenAI-compatible backend, run as a real process, for fault injection in tests.

It behaves like llama-server where llmswap cares (``/health`` 503 while "loading", 200 when
ready; SSE streaming; chat, completions, embeddings) and can misbehave on demand: slow start,
never ready, crash mid-stream, die while idle, ignore SIGTERM, fork a child into its group.

``--ledger FILE`` turns every instance into a witness of the one-model guarantee: each appends
its start and, while alive, watches /proc; if it ever sees another live fake backend with the
same ledger, it appends an ``overlap`` line.  Tests read the ledger: the check is made on real
OS processes, not on llmswap's bookkeeping.

``--sleep-mode`` adds vLLM's sleep API exactly as vLLM serves it (``POST /sleep?level=N``,
``POST /wake_up``, ``GET /is_sleeping``).  With ``--gpu-dir DIR`` each instance keeps a file in
DIR while it "holds GPU memory" (from its start until it is asleep or gone): one that takes the
GPU while another live instance holds it appends ``overlap``; a request that reaches a sleeping
instance appends ``request_while_asleep`` (and gets 503).

``--vram MiB`` holds GPU memory from its start, as a model's weights do: on the fake NVML device
of ``$FAKE_NVML_DIR`` (tests/fakenvml.c) a file the fake library counts, on a real NVIDIA GPU
real device memory through CUDA's driver API.  When the device has less free than that, it dies
with CUDA's out-of-memory words, as llama.cpp does.
"""

from __future__ import annotations

import argparse
import base64
import email
import email.message
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

ARGS: argparse.Namespace
READY_AT = 0.0
SIGTERMS = 0  # received (--miss-first-sigterm)
ASLEEP = False


def _ledger(event: str, **fields: Any) -> None:
    if ARGS.ledger:
        line = json.dumps(
            {"event": event, "name": ARGS.name, "pid": os.getpid(), "t": time.time(), **fields}
        )
        with open(ARGS.ledger, "a") as f:
            f.write(line + "\n")


def live_processes() -> Iterator[tuple[int, int, list[bytes]]]:
    """(pid, process group, argv) of every live process; zombies hold nothing and are skipped.

    Read straight from /proc (not from llmswap's code), so tests can use it as a witness.
    """
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z":
            yield int(pid), int(fields[2]), argv


def live_peers(ledger: str) -> list[int]:
    """Process groups of live fake backends writing to ``ledger``.

    Each backend is its own process group (llmswap's doing), so one backend with a freshly
    forked child is still one group.  Our own group is left out when called from a backend.
    """
    own, marker = os.getpgid(0), ledger.encode()
    return sorted(
        {
            pgid
            for _, pgid, argv in live_processes()
            if pgid != own and marker in argv and any(a.endswith(b"fakebackend.py") for a in argv)
        }
    )


def _watch() -> None:
    while True:
        peers = live_peers(ARGS.ledger)
        if len(peers) >= ARGS.max_peers:
            _ledger("overlap", peers=peers)
        time.sleep(0.01)


def _gpu(hold: bool) -> None:
    """Take or release the "GPU memory"; taking it while another live instance holds it is
    the overlap the one-model guarantee forbids."""
    if not ARGS.gpu_dir:
        return
    own = os.path.join(ARGS.gpu_dir, str(os.getpid()))
    if not hold:
        if os.path.exists(own):
            os.unlink(own)
        return
    holders = [int(p) for p in os.listdir(ARGS.gpu_dir) if int(p) != os.getpid()]
    alive = [p for p in holders if os.path.exists(f"/proc/{p}") and _not_zombie(p)]
    if alive:
        _ledger("overlap", holders=alive)
    with open(own, "w") as f:
        f.write(ARGS.name)


HELD: list[Any] = []  # what keeps its allocations (a real GPU's, host memory) alive


def _out_of_memory() -> None:
    """What llama.cpp prints when the device is full; it dies before it listens."""
    print("ggml_cuda_init: found 1 CUDA devices", flush=True)
    print("CUDA error: out of memory", file=sys.stderr, flush=True)
    _ledger("oom")
    os._exit(1)


def _vram(mib: int) -> None:
    want = mib * 2**20
    fake = os.environ.get("FAKE_NVML_DIR")
    if fake:
        import pynvml  # loads the fake library: $LD_LIBRARY_PATH names its directory

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free < want:
            _out_of_memory()
        own = os.path.join(fake, f"alloc.{os.getpid()}")
        with open(own + ".new", "w") as f:
            f.write(str(want))
        os.replace(own + ".new", own)
        return
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    device, context, pointer = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    for call in (
        lambda: cuda.cuInit(0),
        lambda: cuda.cuDeviceGet(ctypes.byref(device), 0),
        lambda: cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device),
    ):
        if call() != 0:
            sys.exit("fakebackend: CUDA did not start")
    if cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(want)) != 0:
        _out_of_memory()
    HELD.extend((cuda, context, pointer))


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _switch(asleep: bool) -> None:
    global ASLEEP
    if asleep == ASLEEP:
        return
    if asleep:
        time.sleep(ARGS.sleep_delay)
        _gpu(False)
    else:
        time.sleep(ARGS.wake_delay)
        _gpu(True)
    ASLEEP = asleep
    _ledger("sleep" if asleep else "wake")


OPEN: set[Any] = set()  # client connections, closed by --close-after


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        OPEN.add(self.connection)
        self.answered = 0

    def handle_one_request(self) -> None:
        if ARGS.drop_kept_alive and self.answered:
            # What a server whose keep-alive timeout fires as a request arrives does (and
            # llama-server after every event stream): the connection closes, nothing answered.
            if cast(Any, self.rfile).peek(1):  # buffered: wait for the request
                _ledger("dropped")
            self.close_connection = True
            return
        super().handle_one_request()
        self.answered += 1

    def finish(self) -> None:
        OPEN.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"fake {ARGS.name}: {format % args}\n")

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _witness(self) -> None:
        """``--log-requests``: every request's method, path and cookies go to the ledger."""
        if ARGS.log_requests:
            _ledger("request", method=self.command, path=self.path,
                    cookie=self.headers.get("Cookie"))  # fmt: skip

    def do_GET(self) -> None:
        self._witness()
        if self.path == "/health":
            held = ARGS.ready_when is not None and not os.path.exists(ARGS.ready_when)
            if ARGS.never_ready or held or time.time() < READY_AT:
                self._send(
                    503,
                    {
                        "error": {
                            "code": 503,
                            "message": "Loading model",
                            "type": "unavailable_error",
                        }
                    },
                )
            else:
                self._send(200, {"status": "ok"})
        elif self.path == "/is_sleeping" and ARGS.sleep_mode:
            self._send(200, {"is_sleeping": ASLEEP})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": ARGS.name, "object": "model"}]})
        elif self.path.startswith("/ws") and self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket()
        else:
            self._send(404, {"error": {"message": "not found"}})

    def _websocket(self) -> None:
        """A WebSocket (RFC 6455) that answers each text message with the backend's name, the
        path and query it was opened on, the Host it was sent to and the message."""
        accept = base64.b64encode(hashlib.sha1(
            self.headers["Sec-WebSocket-Key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        ).digest()).decode()  # fmt: skip
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        seen = {"host": self.headers.get("Host"), "path": self.path, "name": ARGS.name,
                "authorization": self.headers.get("Authorization")}  # fmt: skip
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(self.rfile.read(2), "big")
            elif length == 127:
                length = int.from_bytes(self.rfile.read(8), "big")
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:  # close: answer it, and end
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                return
            reply = json.dumps({**seen, "message": data.decode()}).encode()
            size = (
                bytes([len(reply)]) if len(reply) < 126 else b"\x7e" + len(reply).to_bytes(2, "big")
            )
            self.wfile.write(b"\x81" + size + reply)
            self.wfile.flush()

    def do_POST(self) -> None:
        self._witness()
        path = self.path.split("?")[0]
        if ARGS.sleep_mode and path in ("/sleep", "/wake_up"):
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            _switch(path == "/sleep")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if ASLEEP:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            _ledger("request_while_asleep", path=self.path)
            self._send(503, {"error": {"message": "asleep", "type": "unavailable_error"}})
            return
        begin = time.time()
        try:
            self._post()
        finally:
            _ledger("served", begin=begin, end=time.time())

    def _post(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        digest = hashlib.sha256(raw).hexdigest()
        extra = {
            "X-Body-SHA256": digest,
            "X-Backend-Name": ARGS.name,
            "X-Backend-Pid": str(os.getpid()),
            "X-Got-Api-Key": "yes"
            if self.headers.get("Authorization") or self.headers.get("x-api-key")
            else "no",
            "X-Got-Authorization": self.headers.get("Authorization", ""),
        }
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            self._send(200, _form_echo(raw, content_type, digest, dict(self.headers)), extra)
            return
        try:
            req = json.loads(raw)
        except ValueError:  # not JSON (an /upstream/ request): say what arrived
            self._send(200, {"path": self.path, "sha256": digest, "bytes": len(raw)}, extra)
            return
        if "fake_status" in req:
            self._send(
                req["fake_status"],
                {"error": {"message": "fake failure", "type": "fake", "code": "teapot"}},
                extra,
            )
            return
        if req.get("fake_sleep"):
            time.sleep(req["fake_sleep"])
        if self.path == "/v1/messages":
            self._anthropic(req, extra)
        elif self.path == "/v1/chat/completions":
            if req.get("stream"):
                self._stream(req, extra)
            elif _last_words(req) == "fake cut":
                self._cut(extra)
            else:
                message = _answer(req)
                self._send(
                    200,
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": ARGS.name,
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "tool_calls"
                                if "tool_calls" in message
                                else "stop",
                                "message": message,
                            }
                        ],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
                    },
                    extra,
                )
        elif self.path == "/v1/completions":
            self._send(
                200,
                {
                    "id": "cmpl-fake",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": ARGS.name,
                    "choices": [
                        {
                            "index": 0,
                            "text": f" completed by {ARGS.name}",
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                },
                extra,
            )
        elif self.path == "/v1/embeddings":
            self._send(
                200,
                {
                    "object": "list",
                    "model": ARGS.name,
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.25, 0.5, 0.75]}],
                    "usage": {"prompt_tokens": 1, "total_tokens": 1},
                },
                extra,
            )
        else:
            self._send(200, {"path": self.path, "sha256": digest, "name": ARGS.name}, extra)

    def _anthropic(self, req: dict[str, Any], extra: dict[str, str]) -> None:
        """Anthropic's Messages API: the request itself as the answer's text."""
        text = json.dumps(req)
        usage = {"input_tokens": 3, "output_tokens": 2}
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": ARGS.name,
                   "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": usage}  # fmt: skip
        if not req.get("stream"):
            self._send(200, message, extra)
            return
        self._start_stream(extra)
        half = len(text) // 2
        events = [
            ("message_start", {"type": "message_start", "message": {**message, "content": []}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            *[("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": piece}})
              for piece in (text[:half], text[half:])],
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 2},
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None}}),
            ("message_stop", {"type": "message_stop"}),
        ]  # fmt: skip
        for name, data in events:
            self._chunk(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _cut(self, extra: dict[str, str]) -> None:
        """A whole answer that breaks off: its headers and half a JSON object, then the
        connection closes (no length, so only the missing end of the chunks tells)."""
        self._start_stream(extra, "application/json")
        self._chunk(b'{"id": "chatcmpl-fake", "choices": [{"index": 0, "mess')
        self.close_connection = True

    def _start_stream(self, extra: dict[str, str], kind: str = "text/event-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()

    def _stream(self, req: dict[str, Any], extra: dict[str, str]) -> None:
        self._start_stream(extra)
        message = _answer(req)
        if ARGS.echo or "tool_calls" in message:
            self._stream_answer(req, message)
            return
        tokens = req.get("max_tokens") or ARGS.tokens
        for i in range(tokens):
            if ARGS.crash_after is not None and i >= ARGS.crash_after:
                os._exit(3)
            event = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": ARGS.name,
                "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
                "generated_at": time.time(),  # lets tests order arrival against generation
            }
            self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            time.sleep(ARGS.token_delay)
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _stream_answer(self, req: dict[str, Any], message: dict[str, Any]) -> None:
        """An answer in chunks as OpenAI streams it: content in two pieces, each tool call's
        arguments in two fragments, then the finish reason, usage and llama.cpp's timings."""

        def event(delta: dict[str, Any], finish: str | None = None, **more: Any) -> None:
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "model": ARGS.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **more,
            }
            self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        content = message.get("content") or ""
        half = len(content) // 2
        for piece in (content[:half], content[half:]):
            if piece:
                event({"content": piece})
        for i, call in enumerate(message.get("tool_calls", [])):
            arguments = call["function"]["arguments"]
            head = {"id": call["id"], "type": "function"}
            function = {"name": call["function"]["name"], "arguments": arguments[:5]}
            event({"tool_calls": [{"index": i, **head, "function": function}]})
            rest = {"arguments": arguments[5:]}
            event({"tool_calls": [{"index": i, "function": rest}]})
        timings = {"prompt_n": 3, "prompt_ms": 1.5, "predicted_n": 2, "predicted_ms": 2.5}
        event({}, "tool_calls" if message.get("tool_calls") else "stop", timings=timings)
        if (req.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            chunk = {"id": "chatcmpl-fake", "choices": [], "usage": usage}
            self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")


def _second_sigterm_exits(*_: Any) -> None:
    global SIGTERMS
    SIGTERMS += 1
    if SIGTERMS > 1:
        _exit("sigterm", 1)
    _ledger("sigterm_missed")


def _exit(event: str, code: int) -> None:
    """Leave as a process does on a signal: the ledger and the GPU witness know first."""
    _ledger(event)
    _gpu(False)
    os._exit(code)


def _form_echo(raw: bytes, content_type: str, digest: str, headers: dict[str, str]) -> Any:
    """A multipart request as received: its fields, each file's size and digest, the body's
    digest; ``text`` makes it an OpenAI transcription."""
    form = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    fields: dict[str, str] = {}
    files: dict[str, dict[str, Any]] = {}
    parts: list[email.message.Message] = form.get_payload()  # type: ignore[assignment]
    for part in parts:
        name = str(part.get_param("name", header="content-disposition"))
        data = cast(bytes, part.get_payload(decode=True) or b"")
        if part.get_filename():
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        else:
            fields[name] = data.decode()
    return {"text": f"heard {ARGS.name}", "fields": fields, "files": files, "sha256": digest,
            "bytes": len(raw), "headers": headers}  # fmt: skip


def _last_words(req: dict[str, Any]) -> Any:
    return ((req.get("messages") or [{}])[-1] or {}).get("content")


def _answer(req: dict[str, Any]) -> dict[str, Any]:
    """The assistant message: the request itself (``--echo``), a call of the first tool
    offered, what a tool answered (with the id it answers), or a greeting."""
    if ARGS.echo:
        return {"role": "assistant", "content": json.dumps(req)}  # in the order received
    last = (req.get("messages") or [{}])[-1]
    if last.get("role") == "tool":
        content = f"the tool said {last.get('content')} for {last.get('tool_call_id')}"
        return {"role": "assistant", "content": content}
    if req.get("tools"):
        name = req["tools"][0]["function"]["name"]
        arguments = json.dumps({"city": "Paris", "days": 2})
        call = {
            "id": "call_fake_0",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        return {"role": "assistant", "content": "", "tool_calls": [call]}
    return {"role": "assistant", "content": f"Hello from {ARGS.name}"}


def _say_ready() -> None:
    """Print a line once /health says ready, as llama-server's "model loaded" (llmswap polls
    at once on a line a starting backend prints)."""
    if ARGS.never_ready:
        return
    while time.time() < READY_AT or (ARGS.ready_when and not os.path.exists(ARGS.ready_when)):
        time.sleep(0.005)
    print("fake: model loaded", flush=True)


def main() -> None:
    global ARGS, READY_AT
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="the address it binds (a box's ${HOST})")
    p.add_argument("--name", default="fake")
    p.add_argument("--startup-delay", type=float, default=0.0)
    p.add_argument("--bind-late", action="store_true", help="refuse connections while loading")
    p.add_argument("--never-ready", action="store_true")
    p.add_argument("--token-delay", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=5)
    p.add_argument("--crash-after", type=int, default=None)
    p.add_argument("--ready-when", default=None, help="not ready until this file exists")
    p.add_argument(
        "--oom",
        choices=("beside-peers", "always"),
        default=None,
        help="fail the load with CUDA's out-of-memory words (beside-peers: while another lives)",
    )
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--miss-first-sigterm", action="store_true")
    p.add_argument("--child", action="store_true", help="fork a child process into our group")
    p.add_argument("--ledger", default=None)
    p.add_argument("--log-requests", action="store_true", help="ledger every request's path")
    p.add_argument("--echo", action="store_true", help="answer chats with the body received")
    p.add_argument(
        "--drop-kept-alive", action="store_true",
        help="close a connection unanswered at its second request",
    )  # fmt: skip
    p.add_argument(
        "--max-peers", type=int, default=1, help="how many other backends may live beside us"
    )
    p.add_argument("--sleep-mode", action="store_true", help="serve vLLM's sleep API")
    p.add_argument("--sleep-delay", type=float, default=0.05)
    p.add_argument("--wake-delay", type=float, default=0.05)
    p.add_argument("--gpu-dir", default=None, help="witness of who holds the GPU")
    p.add_argument("--vram", type=int, default=0, help="MiB of GPU memory it holds (see above)")
    p.add_argument("--hold-ram", type=int, default=0, help="MiB of host memory it holds, touched")
    ARGS = p.parse_args()
    if ARGS.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif ARGS.miss_first_sigterm:  # as llama-server whose shutdown missed its wake-up
        signal.signal(signal.SIGTERM, _second_sigterm_exits)
    else:
        signal.signal(signal.SIGTERM, lambda *_: _exit("sigterm", 0))
    _ledger("start")
    if ARGS.oom == "always" or (ARGS.oom and ARGS.ledger and live_peers(ARGS.ledger)):
        _out_of_memory()
    if ARGS.vram:
        _vram(ARGS.vram)
    HELD.append(b"\1" * (ARGS.hold_ram << 20))  # written, so resident
    _gpu(True)
    if ARGS.ledger:
        peers = live_peers(ARGS.ledger)
        if len(peers) >= ARGS.max_peers:
            _ledger("overlap", peers=peers)
        threading.Thread(target=_watch, daemon=True).start()
    if ARGS.child:
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(1000)", "fake-child", ARGS.ledger or ""]
        )
    # A test decides when a backend fails, by signal, instead of racing a timer:
    # SIGUSR1 is a crash (exit code 7); SIGUSR2 closes the port while the process lives on.
    signal.signal(signal.SIGUSR1, lambda *_: _exit("crash", 7))
    READY_AT = time.time() + ARGS.startup_delay
    if ARGS.bind_late:
        time.sleep(ARGS.startup_delay)
    server = ThreadingHTTPServer((ARGS.host, ARGS.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=_say_ready, daemon=True).start()
    # shutdown() waits for serve_forever(), which this (the main) thread runs: not from here.
    signal.signal(signal.SIGUSR2, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    # SIGUSR2: the port refuses connections from now on, the process lives on.
    server.server_close()
    for connection in list(OPEN):
        connection.shutdown(socket.SHUT_RDWR)
    _ledger("closed")
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
