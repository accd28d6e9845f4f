"""The chaos run's clients, and what each request's end was, as its client saw it.

Each client is a thread with raw HTTP (``http.client``: it must see the exact bytes a stream
ended with) on OpenAI's, Ollama's and Anthropic's routes, streaming or not; some hang up
mid-stream, some read slowly.  A request ends one of these ways:

- ``answered``: a whole answer (a stream with its last event: ``[DONE]``, ``done: true``,
  ``message_stop``);
- ``refused``: an error status with an error body in its API's shape;
- ``error_event``: a stream that began, then ended with an error event in its API's shape;
- ``hung_up``: the client left on purpose;

or, each a violation: ``cut`` (a stream that ended without its last event or an error),
``malformed`` (an answer or error not in its API's shape) and ``lost`` (no end within the
client's timeout: a request llmswap neither answered nor refused).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from typing import Any

ROUTES = ("openai", "ollama", "anthropic")
VIOLATIONS = ("cut", "malformed", "lost")
_PATHS = {"openai": "/v1/chat/completions", "ollama": "/api/chat", "anthropic": "/v1/messages"}


def _body(route: str, model: str, stream: bool) -> bytes:
    messages = [{"role": "user", "content": "hi"}]
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    if route == "anthropic":
        body["max_tokens"] = 16
    return json.dumps(body).encode()


def _error_shaped(route: str, body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    if route == "ollama":
        return isinstance(body.get("error"), str)
    if route == "anthropic":
        error = body.get("error")
        return body.get("type") == "error" and isinstance(error, dict) and "message" in error
    error = body.get("error")
    return isinstance(error, dict) and {"message", "type", "code"} <= set(error)


def _whole(route: str, body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    if route == "ollama":
        return body.get("done") is True and "message" in body
    if route == "anthropic":
        return body.get("type") == "message"
    return bool(body.get("choices"))


class Client(threading.Thread):
    """Sends requests one after another until ``stop`` is set; counts how each ended."""

    def __init__(
        self, port: int, models: list[str], seed: int, stop: threading.Event, timeout: float
    ) -> None:
        super().__init__(name=f"client-{seed}", daemon=True)
        self._port = port
        self._models = models
        self._random = random.Random(seed)
        self._quit = stop
        self._timeout = timeout
        self.ends: Counter[tuple[str, str]] = Counter()  # (route, outcome)
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.durations: list[tuple[float, float]] = []  # (when, seconds) of whole answers
        self.examples: list[dict[str, Any]] = []  # the first few violations, for the report

    def run(self) -> None:
        while not self._quit.is_set():
            r = self._random
            route, model, stream = r.choice(ROUTES), r.choice(self._models), r.random() < 0.6
            hang_up = stream and r.random() < 0.1
            slow = stream and r.random() < 0.1
            started = time.monotonic()
            outcome, detail = self._one(route, model, stream, hang_up, slow)
            self.ends[route, outcome] += 1
            if outcome == "answered" and not stream:
                self.durations.append((started, time.monotonic() - started))
            if outcome in VIOLATIONS and len(self.examples) < 5:
                self.examples.append({"route": route, "model": model, "stream": stream,
                                      "outcome": outcome, "detail": detail[:300]})  # fmt: skip
            self._quit.wait(r.uniform(0, 0.2))

    def _one(
        self, route: str, model: str, stream: bool, hang_up: bool, slow: bool
    ) -> tuple[str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self._timeout)
        try:
            conn.request("POST", _PATHS[route], _body(route, model, stream),
                         {"Content-Type": "application/json"})  # fmt: skip
            response = conn.getresponse()
            self.statuses[route, response.status] += 1
            if response.status != 200 or not stream:
                return self._whole_answer(route, response)
            return self._stream(route, response, hang_up, slow)
        except TimeoutError as e:
            return "lost", repr(e)
        except (OSError, http.client.HTTPException) as e:
            return "cut", repr(e)  # the connection broke with no error said
        finally:
            conn.close()

    def _whole_answer(self, route: str, response: http.client.HTTPResponse) -> tuple[str, str]:
        raw = response.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return "malformed", f"{response.status} {raw[:200]!r}"
        if response.status == 200 and _whole(route, body):
            return "answered", ""
        if response.status >= 400 and _error_shaped(route, body):
            return "refused", ""
        return "malformed", f"{response.status} {raw[:200]!r}"

    def _stream(
        self, route: str, response: http.client.HTTPResponse, hang_up: bool, slow: bool
    ) -> tuple[str, str]:
        last = b""
        while True:
            line = response.readline()
            if not line:
                return "cut", f"ended after {last[:200]!r}"
            line = line.strip()
            if not line:
                continue
            last = line
            if hang_up:
                return "hung_up", ""
            if slow:
                time.sleep(0.05)
            ended = self._event(route, line)
            if ended is not None:
                return ended, "" if ended != "malformed" else repr(line[:200])

    def _event(self, route: str, line: bytes) -> str | None:
        """How a stream's line ends it, if it does."""
        if route == "ollama":
            try:
                obj = json.loads(line)
            except ValueError:
                return "malformed"
            if isinstance(obj, dict) and "error" in obj:
                return "error_event" if _error_shaped(route, obj) else "malformed"
            return "answered" if isinstance(obj, dict) and obj.get("done") is True else None
        if route == "anthropic" and line == b"event: message_stop":
            return "answered"
        if line == b"data: [DONE]":
            return "answered"
        if line.startswith(b"data: {"):
            try:
                obj = json.loads(line[6:])
            except ValueError:
                return "malformed"
            if isinstance(obj, dict) and (obj.get("type") == "error" or "error" in obj):
                return "error_event" if _error_shaped(route, obj) else "malformed"
        return None
