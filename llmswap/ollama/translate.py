"""Ollama requests to OpenAI bodies, and OpenAI answers back to Ollama's fields.

Pure functions: no I/O, no clock.  What is translated and what is ignored is listed in the
README ("Ollama API").  Durations in Ollama's answers are nanoseconds.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from llmswap import errors

# Ollama options with an OpenAI (or llama.cpp/vLLM extension) field of the same meaning.
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",  # llama.cpp and vLLM extension
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
    "repeat_penalty": "repeat_penalty",  # llama.cpp and vLLM extension
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "min_p": "min_p",  # llama.cpp and vLLM extension
}
_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_FOREVER = 100 * 365 * 86400.0  # seconds: Ollama clients mean "keep it loaded"
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Base64 openings of the image formats vision models take.
_IMAGE_TYPES = {
    "iVBOR": "image/png",
    "/9j/": "image/jpeg",
    "R0lG": "image/gif",
    "UklG": "image/webp",
}
LATEST = ":latest"


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def nanos(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1e9)


def tagged(name: str) -> str:
    """A configured model's Ollama name: ``gemma3`` is ``gemma3:latest``."""
    return name if ":" in name else name + LATEST


def resolve(name: Any, lookup: Callable[[str], str | None], listed: Collection[str]) -> str:
    """The model an Ollama name means (``gemma3`` and ``gemma3:latest`` alike; ``lookup``
    knows models and aliases); when none, 404 listing ``listed`` (what the caller may see)."""
    if not isinstance(name, str) or not name:
        raise errors.bad_request("model is required", "missing_required_parameter", "model")
    bare = name[: -len(LATEST)] if name.endswith(LATEST) else None
    for candidate in (name, bare):
        if candidate and (model := lookup(candidate)) is not None:
            return model
    raise errors.model_not_found(name, [tagged(m) for m in listed])


def keep_alive(value: Any) -> float | None:
    """Seconds a model stays loaded after the request; None: the default (the model's ttl).

    Ollama takes a number of seconds or a Go duration ("5m", "1h30m", "0"); a negative value
    keeps the model loaded (returned as ``float("inf")``).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise errors.bad_request(f"keep_alive must be a duration, got {value!r}", "invalid_type")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text.replace("+", ""):
                raise errors.bad_request(
                    f"keep_alive must be a duration like 5m or 300, got {errors.quote(value)!r}",
                    "invalid_type",
                ) from None
            seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        raise errors.bad_request("keep_alive must be a duration like 5m or 300", "invalid_type")
    if math.isnan(seconds):
        raise errors.bad_request("keep_alive must be a duration like 5m or 300", "invalid_type")
    # Negative (Ollama's "forever") and beyond a century alike: kept until the room is needed.
    return float("inf") if seconds < 0 or seconds > _FOREVER else seconds


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise errors.bad_request(f"{what} must be a JSON object", "invalid_type")
    return data


def _sampling(request: Mapping[str, Any], body: dict[str, Any]) -> None:
    """``options``, ``format`` and ``think`` into the OpenAI body."""
    options = request.get("options") or {}
    for name, value in _object(options, "options").items():
        if name in OPTIONS and value is not None:
            body[OPTIONS[name]] = value
    fmt = request.get("format")
    if fmt == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": fmt},
        }
    elif fmt not in (None, ""):
        raise errors.bad_request('format must be "json" or a JSON schema', "invalid_type")
    think = request.get("think")
    if isinstance(think, bool):
        body["chat_template_kwargs"] = {"enable_thinking": think}
    elif isinstance(think, str):
        body["reasoning_effort"] = think


def _image_part(data: Any) -> dict[str, Any]:
    if not isinstance(data, str):
        raise errors.bad_request("images must be base64 strings", "invalid_type")
    kind = next((t for head, t in _IMAGE_TYPES.items() if data.startswith(head)), "image/png")
    return {"type": "image_url", "image_url": {"url": f"data:{kind};base64,{data}"}}


def _content(text: Any, images: Any) -> Any:
    if not images:
        return text or ""
    if not isinstance(images, list):
        raise errors.bad_request("images must be a list of base64 strings", "invalid_type")
    return [{"type": "text", "text": text or ""}, *(_image_part(i) for i in images)]


def _messages(raw: Any) -> list[dict[str, Any]]:
    """Ollama messages to OpenAI's; tool calls get ids, and tool results the id they answer."""
    if not isinstance(raw, list):
        raise errors.bad_request("messages must be a list", "invalid_type")
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, function name) of calls not yet answered
    for n, m in enumerate(raw):
        m = _object(m, "each message")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise errors.bad_request(f"messages[{n}].role must be system, user, assistant or tool")
        msg: dict[str, Any] = {"role": role, "content": _content(m.get("content"), m.get("images"))}
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise errors.bad_request(f"messages[{n}].tool_calls must be a list", "invalid_type")
        if role == "assistant" and calls:
            msg["tool_calls"] = []
            for i, call in enumerate(calls):
                function = _object(_object(call, "a tool call").get("function"), "a tool call")
                call_id = f"call_{n}_{i}"
                pending.append((call_id, str(function.get("name", ""))))
                arguments = function.get("arguments", {})
                msg["tool_calls"].append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": function.get("name", ""),
                            "arguments": arguments
                            if isinstance(arguments, str)
                            else json.dumps(arguments),
                        },
                    }
                )
        if role == "tool":
            name = m.get("tool_name") or m.get("name")
            match = next((p for p in pending if name is None or p[1] == name), None)
            if match is not None:
                pending.remove(match)
                msg["tool_call_id"] = match[0]
            if name:
                msg["name"] = name
        out.append(msg)
    return out


def chat(request: Mapping[str, Any], model: str, stream: bool) -> dict[str, Any]:
    """An Ollama ``/api/chat`` request as an OpenAI chat completion request."""
    body: dict[str, Any] = {"model": model, "messages": _messages(request.get("messages", []))}
    if request.get("tools"):
        body["tools"] = request["tools"]
    _sampling(request, body)
    return _streaming(body, stream)


def generate(request: Mapping[str, Any], model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """An Ollama ``/api/generate`` request: (backend path, OpenAI body).

    ``raw`` prompts and ``suffix`` (fill-in-the-middle) go to ``/completions`` as they are;
    others become a chat with the model's own template (``system`` as the system message).
    """
    prompt = request.get("prompt") or ""
    if not isinstance(prompt, str):
        raise errors.bad_request("prompt must be a string", "invalid_type")
    body: dict[str, Any] = {"model": model}
    if request.get("raw") or request.get("suffix"):
        body["prompt"] = prompt
        if request.get("suffix"):
            body["suffix"] = request["suffix"]
        path = "/completions"
    else:
        messages = []
        if request.get("system"):
            messages.append({"role": "system", "content": request["system"]})
        messages.append({"role": "user", "content": _content(prompt, request.get("images"))})
        body["messages"] = messages
        path = "/chat/completions"
    _sampling(request, body)
    return path, _streaming(body, stream)


def _streaming(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # token counts for the last object
    return body


def embed(request: Mapping[str, Any], model: str, legacy: bool) -> dict[str, Any]:
    """``/api/embed`` (``input``: a string or a list) or ``/api/embeddings`` (``prompt``)."""
    value = request.get("prompt") if legacy else request.get("input")
    ok = isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )
    if not ok:
        field = "prompt" if legacy else "input"
        raise errors.bad_request(
            f"{field} must be a string" + ("" if legacy else " or a list of strings"),
            "invalid_type",
            field,
        )
    body: dict[str, Any] = {"model": model, "input": value}
    if isinstance(request.get("dimensions"), int):
        body["dimensions"] = request["dimensions"]
    return body


def tool_calls(calls: Any) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments as a JSON string) as Ollama's (arguments as an object)."""
    out = []
    for call in calls or []:
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = {"_raw": arguments}  # a model that wrote no valid JSON: kept, not lost
        out.append({"function": {"name": function.get("name", ""), "arguments": parsed}})
    return out


def done_reason(finish_reason: Any) -> str:
    return "length" if finish_reason == "length" else "stop"


def figures(usage: Mapping[str, Any] | None, timings: Mapping[str, Any] | None) -> dict[str, int]:
    """Ollama's counts and durations from OpenAI's ``usage`` and llama.cpp's ``timings``."""
    out: dict[str, int] = {}
    usage = usage or {}
    timings = timings or {}
    prompt = usage.get("prompt_tokens", timings.get("prompt_n"))
    completion = usage.get("completion_tokens", timings.get("predicted_n"))
    if isinstance(prompt, int):
        out["prompt_eval_count"] = prompt
    if isinstance(completion, int):
        out["eval_count"] = completion
    for ours, theirs in (("prompt_eval_duration", "prompt_ms"), ("eval_duration", "predicted_ms")):
        ms = timings.get(theirs)
        if isinstance(ms, int | float):
            out[ours] = int(ms * 1e6)
    return out
