"""What an answer says of itself at its end: token counts and generation speed.

Read from the last chunks of a relayed body (kept, not parsed, as they pass), so a relayed
answer is never parsed whole: backends put ``usage`` at the end of an answer or in the last
event of a stream, and llama-server its ``timings``.
"""

from __future__ import annotations

import json
from typing import Any

_DECODER = json.JSONDecoder()


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
