"""Writes an OpenAI-compatible backend's answer to an Ollama client, as it arrives.

A streamed answer is server-sent events; each event's chunk becomes one NDJSON object written at
once (nothing is held back but an incomplete event), and the end becomes Ollama's final
``"done": true`` object with its counts and durations.  Tool calls, which OpenAI streams in
fragments, are written whole once the model finished them, as Ollama does.  A ``stream: false``
answer is one JSON object.  A backend error becomes ``{"error": "..."}`` with the backend's
status, and a stream that breaks off ends with an ``{"error": ...}`` line, which Ollama's
clients raise; a whole answer that breaks off (nothing of it written yet) is a 502 error (504
when the backend fell silent).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from zope.interface import implementer

from llmswap import errors
from llmswap.interfaces import IAnswerWriter
from llmswap.ollama import translate

# Answers kinds: what the backend was asked, and so how its answer reads.
CHAT, GENERATE, COMPLETE, EMBED, EMBEDDINGS = "chat", "generate", "complete", "embed", "embeddings"
_ERROR_BODY_LIMIT = 64 * 1024


@implementer(IAnswerWriter)
class OllamaWriter:
    """One answer: ``kind`` (see above), ``name`` as the client called the model."""

    def __init__(
        self,
        request: IRequest,
        clock: IReactorTime,
        kind: str,
        name: str,
        stream: bool,
        started: float,
        load_seconds: float,
    ) -> None:
        self._request = request
        self._clock = clock
        self._kind = kind
        self._name = name
        self._stream = stream
        self._started = started
        self._load = load_seconds
        self._failed_status: int | None = None
        self._held = b""  # an incomplete event
        self._whole: list[bytes] = []  # the body, when not streaming or an error (bounded)
        self._whole_size = 0
        self._finish_reason: Any = None
        self._saw_done = False  # the backend's stream reached its ``data: [DONE]``
        self._said: str | None = None  # an error event of the backend's stream
        self._usage: dict[str, Any] | None = None
        self._timings: dict[str, Any] | None = None
        self._calls: dict[int, dict[str, Any]] = {}  # tool calls being streamed, by index

    # -- IAnswerWriter --------------------------------------------------------------------

    def start(self, code: int, headers: Any) -> None:
        if code >= 300:
            self._failed_status = code
            return
        self._request.setResponseCode(200)
        kind = b"application/x-ndjson" if self._stream else b"application/json"
        self._request.setHeader(b"content-type", kind)

    def data(self, chunk: bytes) -> None:
        if self._failed_status is not None or not self._stream:
            if self._whole_size < _ERROR_BODY_LIMIT or self._failed_status is None:
                self._whole.append(chunk)
                self._whole_size += len(chunk)
            return
        events = (self._held + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
        self._held = events.pop()
        for event in events:
            self._event(event)

    def end(self) -> None:
        if self._failed_status is not None:
            self._error(self._failed_status, _backend_message(b"".join(self._whole)))
        elif self._stream:
            if self._held.strip():
                self._event(self._held)
            if self._said is not None:
                self._line({"error": self._said})
                return
            if not (self._saw_done or self._finish_reason):  # cut: never a false done: true
                self.fail("it ended unfinished", 502)
                return
            self._flush_calls()
            self._line(self._final(self._base(done=True)))
        else:
            self._answer(b"".join(self._whole))

    def fail(self, reason: str, status: int) -> None:
        if self._stream and self._failed_status is None:
            self._line({"error": f"Model '{self._name}' stream interrupted: {reason}"})
        else:  # nothing went out yet: a whole answer is an error, never a 200 with no body
            self._error(status, f"Model '{self._name}' answer interrupted: {reason}")

    # -- streams --------------------------------------------------------------------------

    def _event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue  # comments, event names, ids
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self._saw_done = True
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                continue
            if isinstance(chunk, dict) and "error" in chunk:  # vLLM's, before its [DONE]
                said = chunk["error"]
                self._said = str(said.get("message") if isinstance(said, dict) else said)[:500]
            elif isinstance(chunk, dict):
                self._chunk(chunk)

    def _chunk(self, chunk: dict[str, Any]) -> None:
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self._timings = chunk["timings"]
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
            if self._kind == COMPLETE:
                text, thinking = choice.get("text"), None
            else:
                delta = choice.get("delta") or {}
                text, thinking = delta.get("content"), delta.get("reasoning_content")
                for call in delta.get("tool_calls") or ():
                    self._call_fragment(call)
            if text or thinking:
                self._line(self._piece(text or "", thinking))

    def _call_fragment(self, fragment: dict[str, Any]) -> None:
        call = self._calls.setdefault(fragment.get("index", 0), {"name": "", "arguments": ""})
        function = fragment.get("function") or {}
        call["name"] += function.get("name") or ""
        call["arguments"] += function.get("arguments") or ""

    def _flush_calls(self) -> None:
        if not self._calls:
            return
        calls = [{"function": c} for _, c in sorted(self._calls.items())]
        self._calls = {}
        message = self._piece("", None)
        message["message"]["tool_calls"] = translate.tool_calls(calls)
        self._line(message)

    # -- whole answers ----------------------------------------------------------------------

    def _answer(self, body: bytes) -> None:
        try:
            answer = json.loads(body)
        except ValueError:
            self._error(502, f"Model '{self._name}' answered with a body that is not JSON")
            return
        if not isinstance(answer, dict):
            answer = {}
        self._usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
        self._timings = answer.get("timings") if isinstance(answer.get("timings"), dict) else None
        if self._kind in (EMBED, EMBEDDINGS):
            self._embeddings(answer)
            return
        choice = (answer.get("choices") or [{}])[0]
        self._finish_reason = choice.get("finish_reason")
        if self._kind == COMPLETE:
            out = self._piece(choice.get("text") or "", None)
        else:
            message = choice.get("message") or {}
            out = self._piece(message.get("content") or "", message.get("reasoning_content"))
            if message.get("tool_calls"):
                out["message"]["tool_calls"] = translate.tool_calls(message["tool_calls"])
        out["done"] = True
        self._write_json(self._final(out))

    def _embeddings(self, answer: dict[str, Any]) -> None:
        vectors = [d.get("embedding") for d in answer.get("data") or () if isinstance(d, dict)]
        if self._kind == EMBEDDINGS:
            self._write_json({"embedding": vectors[0] if vectors else []})
            return
        out: dict[str, Any] = {"model": self._name, "embeddings": vectors}
        out.update(self._durations())
        prompt = (self._usage or {}).get("prompt_tokens")
        if isinstance(prompt, int):
            out["prompt_eval_count"] = prompt
        self._write_json(out)

    # -- objects ----------------------------------------------------------------------------

    def _base(self, done: bool) -> dict[str, Any]:
        return {"model": self._name, "created_at": translate.now_iso(), "done": done}

    def _piece(self, text: str, thinking: str | None) -> dict[str, Any]:
        out = self._base(done=False)
        if self._kind == CHAT:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            out["message"] = message
        else:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        return out

    def _final(self, out: dict[str, Any]) -> dict[str, Any]:
        if self._kind == CHAT:
            out.setdefault("message", {"role": "assistant", "content": ""})
        else:
            out.setdefault("response", "")
        out["done_reason"] = translate.done_reason(self._finish_reason)
        out.update(self._durations())
        out.update(translate.figures(self._usage, self._timings))
        return out

    def _durations(self) -> dict[str, int]:
        total = self._clock.seconds() - self._started
        return {
            "total_duration": translate.nanos(total),
            "load_duration": translate.nanos(self._load),
        }

    # -- writing ----------------------------------------------------------------------------

    def _line(self, obj: dict[str, Any]) -> None:
        self._request.write(json.dumps(obj).encode() + b"\n")

    def _write_json(self, obj: dict[str, Any]) -> None:
        self._request.write(json.dumps(obj).encode())

    def _error(self, status: int, message: str) -> None:
        self._request.setResponseCode(status)
        self._request.setHeader(b"content-type", b"application/json")
        self._request.write(json.dumps({"error": message}).encode())


def _backend_message(body: bytes) -> str:
    """The message of an OpenAI-shaped error body, else its text (capped)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return errors.quote(error["message"], 2000)
        if isinstance(error, str):
            return errors.quote(error, 2000)
    return errors.quote(body.decode("utf-8", "replace"), 2000)
