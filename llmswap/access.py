"""Access control and per-key rate limits.

Without an ``auth`` section llmswap is open, as the original proxy was.  With one, every API call
names a key (``Authorization: Bearer KEY`` or ``x-api-key: KEY``); the key decides which models
the caller may use, its scheduling priority and its limits.  Keys are compared in constant time
(all of them, every time) and never logged: logs and metrics carry the key's name.

The console and the ``/admin/`` routes need an admin key; a browser presents it once and gets
a session cookie (HttpOnly, SameSite=Strict, expiring; it holds a random token, never the key),
and a change it asks for must carry an ``X-Requested-With`` header, which no other site's page
can send without CORS, which llmswap never allows.  Without ``auth`` they answer only to
loopback clients (a backend's log holds users' prompts; unload and reload are not for the whole
LAN) unless ``console.open`` says otherwise.

The limits protect the shared queue: requests per minute (a token bucket, so short bursts are
fine) and requests queued or running at once, so one client at its limit gets 429 with
``Retry-After`` instead of filling the queue and locking everybody else out.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Callable, Iterable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from llmswap import errors
from llmswap.keys import APIKey, Auth


def _digest(secret: str | bytes) -> bytes:
    raw = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(raw).digest()


@attrs.define
class _Bucket:
    tokens: float
    updated: float


SESSION_COOKIE = b"llmswap_session"
SESSION_SECONDS = 8 * 3600


class Gate:
    """Who is calling, and may they do this now?  One per configuration."""

    def __init__(self, auth: Auth | None, clock: IReactorTime, console_open: bool = False) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._active: dict[str, int] = {}
        self._sessions: dict[str, tuple[str, float]] = {}  # token -> (key name, expiry)
        self.configure(auth, console_open)

    def configure(self, auth: Auth | None, console_open: bool = False) -> None:
        """New keys (a reload); counts of requests under way and token buckets carry over."""
        self.auth = auth
        self.console_open = console_open
        self._keys = [(_digest(k.secret), k) for k in auth.keys] if auth else []

    @property
    def enabled(self) -> bool:
        return self.auth is not None

    def identify(self, request: IRequest) -> APIKey | None:
        """The caller's key (None when auth is off); 401 when it is missing or unknown."""
        if self.auth is None:
            return None
        presented = _presented(request)
        if presented is None:
            raise errors.unauthorized(
                "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            )
        digest = _digest(presented)
        found: APIKey | None = None
        for candidate, key in self._keys:  # no early exit: timing says nothing about the keys
            if hmac.compare_digest(candidate, digest):
                found = key
        if found is None:
            raise errors.unauthorized("Invalid API key")
        return found

    def require_admin(self, request: IRequest) -> None:
        """Admin routes and the console: an admin key (or its session), or, without auth,
        a loopback client unless the console is open."""
        if self.auth is None:
            if not self.console_open and not _loopback(request):
                raise errors.not_local()
            return
        key = self._session(request)
        if key is not None:
            if request.method not in (b"GET", b"HEAD") and not request.getHeader(
                b"x-requested-with"
            ):
                raise errors.cross_site()
        else:
            key = self.identify(request)
        if key is not None and not key.admin:
            raise errors.admin_required(key.name)

    def open_session(self, request: IRequest) -> tuple[str, int]:
        """Log a browser in with the admin key it presents: (token for its cookie, seconds)."""
        key = self.identify(request)
        if key is None:
            raise errors.bad_request("This daemon has no keys: the console needs no login")
        if not key.admin:
            raise errors.admin_required(key.name)
        now = self._clock.seconds()
        self._sessions = {t: s for t, s in self._sessions.items() if s[1] > now}
        token = secrets.token_urlsafe(32)
        self._sessions[token] = (key.name, now + SESSION_SECONDS)
        return token, SESSION_SECONDS

    def close_session(self, request: IRequest) -> None:
        token = request.getCookie(SESSION_COOKIE)
        if token is not None:
            self._sessions.pop(token.decode("latin-1"), None)

    def _session(self, request: IRequest) -> APIKey | None:
        """The key of the browser's session; its current entry, so a reload can revoke it."""
        cookie = request.getCookie(SESSION_COOKIE)
        if cookie is None:
            return None
        name, expires = self._sessions.get(cookie.decode("latin-1"), ("", 0.0))
        if expires <= self._clock.seconds():
            return None
        return next((k for _, k in self._keys if k.name == name), None)

    def protect_health(self, request: IRequest) -> None:
        if self.auth is not None and not self.auth.open_health:
            self.identify(request)

    def check_model(self, key: APIKey | None, model: str) -> None:
        if key is not None and key.models is not None and model not in key.models:
            raise errors.model_not_allowed(key.name, model)

    def visible(self, key: APIKey | None, models: Iterable[str]) -> list[str]:
        return [m for m in models if key is None or key.models is None or m in key.models]

    def admit(self, key: APIKey | None) -> Callable[[], None]:
        """Count a request against the key's limits; call the result when it is done."""
        if key is None:
            return nothing_to_release
        if key.max_concurrent is not None and self._active.get(key.name, 0) >= key.max_concurrent:
            raise errors.rate_limited(
                f"API key '{key.name}' already has {key.max_concurrent} requests queued or "
                "running (max_concurrent)",
                1,
                "too_many_concurrent_requests",
            )
        if key.rpm is not None:
            self._take_token(key)
        self._active[key.name] = self._active.get(key.name, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._active[key.name] -= 1

        return release

    def _take_token(self, key: APIKey) -> None:
        assert key.rpm is not None
        now = self._clock.seconds()
        rate = key.rpm / 60.0
        bucket = self._buckets.setdefault(key.name, _Bucket(float(key.rpm), now))
        bucket.tokens = min(float(key.rpm), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            raise errors.rate_limited(
                f"API key '{key.name}' exceeded its limit of {key.rpm} requests per minute",
                (1.0 - bucket.tokens) / rate,
                "rate_limit_exceeded",
            )
        bucket.tokens -= 1.0


def nothing_to_release() -> None:
    """What an open daemon's (no keys) admission returns: no per-request closure to allocate."""


def _presented(request: IRequest) -> bytes | None:
    auth = request.getHeader(b"authorization")
    if auth is not None:
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer" and value.strip():
            return bytes(value.strip())
    key = request.getHeader(b"x-api-key")
    if key is not None and key.strip():
        return bytes(key.strip())
    return None


def _loopback(request: IRequest) -> bool:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    if host is None:  # a UNIX socket: as local as it gets
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
