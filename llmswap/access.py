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
LAN) unless ``console.open`` says otherwise, and only to requests no other site made: an
``Origin`` other than the request's own host (CSRF) or a ``Host`` that is a name of someone
else's (DNS rebinding) is refused.  Unloading and ``/upstream/`` are permissions of their own
(``unload: true``, ``upstream: true``).  docs/security.md is the threat model.

The limits protect the shared queue: requests per minute (a token bucket, so short bursts are
fine) and requests queued or running at once, so one client at its limit gets 429 with
``Retry-After`` instead of filling the queue and locking everybody else out.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Callable, Iterable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.iweb import IRequest

from llmswap import errors
from llmswap.config.config import Config, Console
from llmswap.config.keys import APIKey, Auth


def _digest(secret: str | bytes) -> bytes:
    raw = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(raw).digest()


@attrs.define
class _Bucket:
    tokens: float
    updated: float


NO_CONSOLE = Console()  # the console's default settings
SESSION_COOKIE = b"llmswap_session"
SESSION_SECONDS = 8 * 3600


class Caller(enum.Enum):
    """Who may call a route (:mod:`llmswap.surface` gives each route one)."""

    ANYONE = "anyone"
    HEALTH = "anyone while auth.open_health is on, else a key"
    KEY = "a key (its models checked by the route)"
    LOGIN = "a key (an admin's gets a session)"
    UNLOAD = "an admin key or session, or a key with unload: true"
    UPSTREAM = "an admin key or session, or a key with upstream: true"
    ADMIN = "an admin key or session"


# What a key needs beyond being valid, and how a refusal says it.
_NEEDS: dict[Caller, tuple[Callable[[APIKey], bool], str, str]] = {
    Caller.ADMIN: (lambda k: k.admin, "may not use admin endpoints", "admin_required"),
    Caller.UNLOAD: (lambda k: k.may_unload, "may not unload models (unload: true)",
                    "unload_not_allowed"),
    Caller.UPSTREAM: (lambda k: k.admin or k.upstream, "may not use /upstream/ (upstream: true)",
                      "upstream_not_allowed"),
}  # fmt: skip
_LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost")


@attrs.define(eq=False)
class _Session:
    """A browser's login: the digest of the key it presented (a rotated secret ends it), its
    expiry, and the long answers it holds open (closed when it ends)."""

    digest: bytes
    expires: float
    # Each held answer's close, and the timer that closes it at the session's expiry.
    streams: dict[Callable[[], None], IDelayedCall] = attrs.field(factory=dict)

    def end(self) -> None:
        streams, self.streams = self.streams, {}
        for close, expiry in streams.items():
            if expiry.active():
                expiry.cancel()
            close()


class Gate:
    """Who is calling, and may they do this now?  One per configuration."""

    def __init__(
        self, auth: Auth | None, clock: IReactorTime, console: Console = NO_CONSOLE
    ) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._active: dict[str, int] = {}
        self._sessions: dict[str, _Session] = {}
        self.configure(auth, console)

    def configure(self, auth: Auth | None, console: Console = NO_CONSOLE) -> None:
        """New keys (a reload); counts of requests under way and token buckets carry over.
        A session whose key is gone, changed its secret or is no longer an admin's ends."""
        self.auth = auth
        self.console = console
        self._keys = [(_digest(k.secret), k) for k in auth.keys] if auth else []
        for token, session in list(self._sessions.items()):
            key = self._key_of(session.digest)
            if key is None or not key.admin:
                del self._sessions[token]
                session.end()

    @property
    def enabled(self) -> bool:
        return self.auth is not None

    def identify(self, request: IRequest) -> APIKey | None:
        """The caller's key (None when auth is off); 401 when it is missing or unknown."""
        if self.auth is None:
            return None
        presented = _presented(request)
        if presented is None:
            # The console's playground: an admin's browser session, on a request only the
            # console's own page can make (X-Requested-With needs CORS elsewhere).
            key = self._session(request) if request.getHeader(b"x-requested-with") else None
            if key is not None:
                self._same_origin(request)
                return key
            raise errors.unauthorized(
                "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            )
        found = self._key_of(_digest(presented))
        if found is None:
            raise errors.unauthorized("Invalid API key")
        return found

    def _key_of(self, digest: bytes) -> APIKey | None:
        found: APIKey | None = None
        for candidate, key in self._keys:  # no early exit: timing says nothing about the keys
            if hmac.compare_digest(candidate, digest):
                found = key
        return found

    def authorize(self, request: IRequest, caller: Caller) -> APIKey | None:
        """Raise unless ``request`` may call a route open to ``caller``; the caller's key."""
        if caller is Caller.ANYONE:
            return None
        if caller is Caller.HEALTH:
            self.protect_health(request)
            return None
        if caller in (Caller.KEY, Caller.LOGIN):
            return self.identify(request)
        return self.require(request, caller)

    def require_admin(self, request: IRequest) -> APIKey | None:
        return self.require(request, Caller.ADMIN)

    def require(self, request: IRequest, caller: Caller) -> APIKey | None:
        """Admin routes, the console, unloads and ``/upstream/``: a key (or an admin's session)
        with the permission ``caller`` names; without auth, a client on this machine (unless
        the console is open) whose request no other site's page or name made."""
        if self.auth is None:
            if not self.console.open and not self._loopback(request):
                raise errors.not_local()
            self._same_site(request)
            return None
        # A key presented in a header is the caller's (no other site's page can send one);
        # else a browser's session.
        key = None if _presented(request) is not None else self._session(request)
        if key is not None:
            # A browser's: a change must carry X-Requested-With (no other site's page can
            # send it without CORS, which llmswap never allows), and no other origin's page
            # may ask at all.
            self._same_origin(request)
            if request.method not in (b"GET", b"HEAD") and not request.getHeader(
                b"x-requested-with"
            ):
                raise errors.cross_site()
        else:
            key = self.identify(request)
        assert key is not None
        allowed, refusal, code = _NEEDS[caller]
        if not allowed(key):
            raise errors.forbidden(key.name, refusal, code)
        return key

    def permits(self, request: IRequest, caller: Caller) -> bool:
        """Whether ``request``'s caller has ``caller``'s permission (without keys: a client on
        this machine, unless the console is open, whose request no other site made)."""
        try:
            self.require(request, caller)
        except errors.APIError:
            return False
        return True

    def may(self, key: APIKey | None, caller: Caller) -> bool:
        """Whether an identified caller (None: auth is off) has ``caller``'s permission."""
        return key is None or _NEEDS[caller][0](key)

    def _loopback(self, request: IRequest) -> bool:
        address = request.getClientAddress()
        host = getattr(address, "host", None)
        if host is None:  # a UNIX socket: maybe a reverse proxy serving the whole LAN
            return self.console.unix_is_loopback
        return is_loopback(host)

    def _same_site(self, request: IRequest) -> None:
        """Without keys, a browser on this machine is the attack path: a page of another site
        (CSRF) sends its ``Origin``; a DNS-rebinding page reaches us under its own name."""
        host = _host_name(request.getHeader(b"host"))  # None: no browser sent it
        if host is not None and not (
            _is_address(host) or host in _LOOPBACK_NAMES or host.endswith(".localhost")
            or host in self.console.hosts
        ):  # fmt: skip
            raise errors.foreign_host(errors.quote(host))
        self._same_origin(request)

    def _same_origin(self, request: IRequest) -> None:
        origin = request.getHeader(b"origin")
        if origin is None:
            return
        host = request.getHeader(b"host") or b""
        _, _, authority = origin.partition(b"://")
        if authority.lower() != host.lower():
            raise errors.foreign_origin(errors.quote(origin.decode("latin-1")))

    def open_session(self, request: IRequest) -> tuple[str, int]:
        """Log a browser in with the admin key it presents: (token for its cookie, seconds).
        Only a key opens one: a session does not renew itself."""
        if self.auth is not None and _presented(request) is None:
            raise errors.unauthorized("Log in with an admin key: 'Authorization: Bearer <key>'")
        key = self.identify(request)
        if key is None:
            raise errors.bad_request("This daemon has no keys: the console needs no login")
        if not key.admin:
            raise errors.forbidden(key.name, *_NEEDS[Caller.ADMIN][1:])
        now = self._clock.seconds()
        for token in [t for t, s in self._sessions.items() if s.expires <= now]:
            self._sessions.pop(token).end()
        token = secrets.token_urlsafe(32)
        self._sessions[token] = _Session(_digest(key.secret), now + SESSION_SECONDS)
        return token, SESSION_SECONDS

    def close_session(self, request: IRequest) -> None:
        token = request.getCookie(SESSION_COOKIE)
        if token is not None:
            session = self._sessions.pop(token.decode("latin-1"), None)
            if session is not None:
                session.end()

    def hold_open(self, request: IRequest, close: Callable[[], None]) -> Callable[[], None]:
        """A long answer (the events, a log follow) opened with a session ends with it: at
        logout, at its expiry, or when its key changes.  Returns what to call when the answer
        ends first."""
        token = request.getCookie(SESSION_COOKIE)
        session = self._sessions.get(token.decode("latin-1")) if token else None
        if session is None:
            return nothing_to_release
        expiry = self._clock.callLater(max(0.0, session.expires - self._clock.seconds()), close)
        session.streams[close] = expiry

        def ended() -> None:
            session.streams.pop(close, None)
            if expiry.active():
                expiry.cancel()

        return ended

    def _session(self, request: IRequest) -> APIKey | None:
        """The key of the browser's session, as configured now: a reload can revoke it."""
        cookie = request.getCookie(SESSION_COOKIE)
        if cookie is None:
            return None
        session = self._sessions.get(cookie.decode("latin-1"))
        if session is None or session.expires <= self._clock.seconds():
            return None
        return self._key_of(session.digest)

    def protect_health(self, request: IRequest) -> None:
        if self.auth is not None and self.auth.open_health == "false":
            self.identify(request)

    def health_details(self, request: IRequest) -> bool:
        """Whether ``/health`` may show backend details (pids, paths, URLs, output lines,
        engine addresses): to admins, or to anyone with ``open_health: full``."""
        if self.auth is not None and self.auth.open_health == "full":
            return True
        return self.permits(request, Caller.ADMIN)

    def check_model(self, key: APIKey | None, model: str) -> None:
        if not self.allows(key, model):
            assert key is not None
            raise errors.model_not_allowed(key.name, model)

    @staticmethod
    def allows(key: APIKey | None, model: str) -> bool:
        return key is None or key.models is None or model in key.models

    def visible(self, key: APIKey | None, models: Iterable[str]) -> list[str]:
        return [m for m in models if self.allows(key, m)]

    def names(self, key: APIKey | None, config: Config) -> list[str]:
        """The models ``key`` may use, then the pools with a member it may use."""
        pools = [
            name
            for name, pool in config.pools.items()
            if any(self.allows(key, config.resolve(m) or m) for m in pool.members)
        ]
        return self.visible(key, config.models) + pools

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


def _host_name(header: bytes | None) -> str | None:
    """The name of a ``Host`` header, without its port (an IPv6 address without brackets)."""
    if not header:
        return None
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    return text.rpartition(":")[0] if text.count(":") == 1 else text


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (a name is not: it may resolve anywhere)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_address(name: str) -> bool:
    """An IP address: no DNS name, so no DNS rebinding."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
