"""How llmswap writes answers of its own: JSON bodies and Server-Sent Events.

One place for the framing, so every route's JSON carries its content type and every SSE event
(an error in a relayed stream, a loading comment's data, the console's live events) is framed
alike.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest


def json_body(request: IRequest, payload: Any, status: int = 200, no_store: bool = False) -> bytes:
    """``payload`` as the response's JSON body; ``no_store``: never cached (live figures)."""
    if status != 200:
        request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    if no_store:
        request.setHeader(b"cache-control", b"no-store")
    return json.dumps(payload).encode()


def sse_event(data: bytes, kind: str | None = None) -> bytes:
    """One SSE event (``kind``: its ``event:`` name; None: a plain ``data:`` event)."""
    head = b"" if kind is None else b"event: " + kind.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"
