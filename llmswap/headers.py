"""Which headers cross llmswap between a client and a backend.

Hop-by-hop headers describe one connection, never the message.  llmswap's own credentials are
not the backend's business: its API keys (dropped by the request path when keys are on) and its
console's session cookie (always: a logged-in browser's requests through ``/upstream/`` would
otherwise hand it to a model's server, a remote one included).
"""

from __future__ import annotations

import sys

from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from llmswap import errors
from llmswap.access import SESSION_COOKIE

# Per RFC 9110 these describe one connection, not the message; the rest pass through.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length"}
# A backend's answer never sets cookies on llmswap's origin: one could replace the console's
# session, or plant one for a page it serves through /upstream/.
NOT_RELAYED = HOP_BY_HOP | {b"set-cookie", b"content-security-policy"}
# What a page a backend serves through /upstream/ runs under: scripts in an opaque origin, never
# llmswap's (whose console holds an admin's session).
UPSTREAM_POLICY = b"sandbox allow-scripts allow-forms allow-popups"
# llmswap's own API keys: dropped whenever keys are on (a remote model gets its own instead).
KEY_HEADERS = frozenset({b"authorization", b"x-api-key"})
CONSOLE_REQUEST = b"llmswap-console"  # the X-Requested-With of the console's own requests


def request_headers(request: IRequest, drop: frozenset[bytes]) -> Headers:
    """The headers a backend gets of ``request``, without those named in ``drop``."""
    out = Headers()
    for name, values in request.requestHeaders.getAllRawHeaders():
        lowered = name.lower()
        if lowered == b"cookie":
            values = _without_session(values)
        if lowered not in _NOT_FORWARDED and lowered not in drop and values:
            out.setRawHeaders(name, values)
    return out


def _without_session(values: list[bytes]) -> list[bytes]:
    """Cookie headers without llmswap's own session (a console login is not the backend's)."""
    kept = []
    for value in values:
        pairs = [p for p in value.split(b";") if not p.strip().startswith(SESSION_COOKIE + b"=")]
        if any(p.strip() for p in pairs):
            kept.append(b";".join(pairs).strip())
    return kept


# Open WebUI's user id, sent with ENABLE_FORWARD_USER_INFO_HEADERS.
OPEN_WEBUI_USER = b"x-openwebui-user-id"
CLIENT_CHARS = 128  # of a client's identity kept


def client_of(request: IRequest, said: str | None) -> str | None:
    """Who asks, when the request says: Open WebUI's forwarded user, else the body's own
    (OpenAI's ``user``, ``said``); None when it does not.  Never the address or the key: one
    Open WebUI serves many users from one of each."""
    forwarded = request.getHeader(OPEN_WEBUI_USER)
    who = forwarded.decode("latin-1") if forwarded else said
    return sys.intern(who[:CLIENT_CHARS]) if who else None


def header_priority(request: IRequest, header: str | None) -> int:
    """A keyless request's priority, from ``priority_header`` when it is set (0 otherwise);
    a value that is not a whole number is the client's error."""
    value = request.getHeader(header) if header is not None else None
    if header is None or value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        raise errors.invalid_priority(header, value) from None


def from_console(request: IRequest) -> bool:
    """Whether the console's playground sent it: its header, and no key but the session's (a
    label in the activity: a client with a key of its own is that client)."""
    said = request.getHeader(b"x-requested-with") == CONSOLE_REQUEST
    return said and not any(request.getHeader(name) for name in KEY_HEADERS)
