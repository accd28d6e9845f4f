"""How each API's event stream ends, and how an error ends it instead.

A stream that stops without its last event (OpenAI's ``data: [DONE]``, Anthropic's
``message_stop``) must not look complete: a client takes a half answer for the whole.  Chunked
framing shows a cut by itself (the closing chunk never comes); a body delimited by the
connection's close does not, so the last event is what tells.
"""

from __future__ import annotations

import json

import attrs

from llmswap import errors
from llmswap.responses import sse_event


@attrs.frozen
class StreamEnd:
    """An API's stream: the bytes its last event carries, and its error events."""

    marker: bytes
    kind: str | None  # the error event's ``event:`` name (OpenAI's have none)
    shape: str  # "openai" or "anthropic": the error body's

    def complete(self, tail: bytes) -> bool:
        """Whether the stream's last bytes hold its last event."""
        return self.marker in tail

    def error(self, err: errors.APIError) -> bytes:
        """An error event that ends the stream instead."""
        body = errors.anthropic_body(err) if self.shape == "anthropic" else err.body()
        return sse_event(body, self.kind)

    def backend_error(self, model: str, code: int, body: bytes) -> bytes:
        """A backend's error answer as an event (the stream's 200 already went out): its own
        body when it is an error object, else one of ours quoting the start of it."""
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "error" in parsed:
            return sse_event(json.dumps(parsed).encode(), self.kind)
        text = body[:200].decode("utf-8", "replace")
        return self.error(errors.backend_error(f"Model '{model}' answered {code}: {text}"))


OPENAI = StreamEnd(b"data: [DONE]", None, "openai")
ANTHROPIC = StreamEnd(b"message_stop", "error", "anthropic")
