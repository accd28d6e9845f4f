"""How each API's event stream ends, and how an error ends it instead.

A stream that stops without its last event (OpenAI's ``data: [DONE]``, Anthropic's
``message_stop``) must not look complete: a client takes a half answer for the whole.  Chunked
framing shows a cut by itself (the closing chunk never comes); a body delimited by the
connection's close does not, so the last event is what tells, for the routes whose last event
is known (a Responses API stream ends otherwise, and is left as it came).
"""

from __future__ import annotations

import json

import attrs

from llmswap import errors
from llmswap.responses import sse_event


@attrs.frozen
class StreamEnd:
    """An API's stream: how its last event starts (None: not known), and its error events."""

    last: bytes | None
    kind: str | None  # the error event's ``event:`` name (OpenAI's have none)
    shape: str  # "openai" or "anthropic": the error body's

    def complete(self, tail: bytes) -> bool:
        """Whether the stream's last bytes end with its last event."""
        if self.last is None:
            return True
        events = tail.replace(b"\r\n", b"\n").rstrip().rsplit(b"\n\n", 1)
        return events[-1].lstrip().startswith(self.last)

    def error(self, err: errors.APIError) -> bytes:
        """An error event that ends the stream instead."""
        body = errors.anthropic_body(err) if self.shape == "anthropic" else err.body()
        return sse_event(body, self.kind)

    def backend_error(self, model: str, code: int, body: bytes) -> bytes:
        """A backend's error answer as an event (the stream's 200 already went out): its own
        body when it is an error in this API's shape, else ours with its message."""
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "error" in parsed:
            if self.shape == "openai" or parsed.get("type") == "error":
                return sse_event(json.dumps(parsed).encode(), self.kind)
            said = parsed["error"]
            text = said.get("message") if isinstance(said, dict) else said
            return self.error(errors.backend_error(f"Model '{model}': {str(text)[:200]}"))
        text = body[:200].decode("utf-8", "replace")
        return self.error(errors.backend_error(f"Model '{model}' answered {code}: {text}"))


# The routes whose streams end with ``data: [DONE]`` (or, on Anthropic's, ``message_stop``).
_ENDS_KNOWN = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages"})


def ends_known(uri: str) -> bool:
    return uri.split("?", 1)[0] in _ENDS_KNOWN


OPENAI = StreamEnd(b"data: [DONE]", None, "openai")
# Other OpenAI streams (the Responses API's, llama.cpp's own routes): their end is not known.
OPENAI_OTHER = StreamEnd(None, None, "openai")
ANTHROPIC = StreamEnd(b"event: message_stop", "error", "anthropic")
