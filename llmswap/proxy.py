"""The request path of a relayed API call: admit, wait, serve, end, account.

Only ``model`` and ``stream`` are read from a request body; the body itself is forwarded as the
bytes received.  A request passes the gate (key, model, limits), waits for a lease from the swap
manager (a stream gets keep-alive comments meanwhile), is relayed, and ends as one
:class:`~llmswap.events.RequestEnded` event, which metrics and the access log count and write.

The route handing a request over returns at once, and the request's life goes on as callbacks
on its queue ticket's Deferred: a request waiting in the queue holds its ticket and one
callback, not a suspended Klein route (Klein keeps about 4 KB of render state per pending route,
an ``async def`` route 1.5 KB more; docs/benchmarks.md counts what a waiting request holds).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any

import attrs
from klein.interfaces import IKleinRequest
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    inlineCallbacks,
    maybeDeferred,
    passthru,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from llmswap import errors
from llmswap.access import Gate, nothing_to_release
from llmswap.config import Config
from llmswap.events import EventBus, RequestEnded
from llmswap.keepalive import KeepAlive
from llmswap.keys import APIKey
from llmswap.relay import Relay, Relayed, speed_from, sse_event, started_writing, usage_from
from llmswap.swap.manager import SwapManager
from llmswap.swap.queue import Lease
from llmswap.swap.state import ModelState

log = Logger()

CLIENT_CLOSED = 499  # nginx's convention for "client went away before the answer"
# llmswap's own keys are not the backend's business.
_KEY_HEADERS = frozenset({b"authorization", b"x-api-key"})


def json_object(body: bytes, max_bytes: int, empty_ok: bool = False) -> dict[str, Any]:
    """A request body that must be a JSON object (``{}`` when empty and ``empty_ok``)."""
    if len(body) > max_bytes:
        raise errors.too_large(len(body), max_bytes)
    if empty_ok and not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.invalid_json(str(e)) from None
    except RecursionError:  # nested deeper than Python's parser recurses
        raise errors.invalid_json("nested too deeply") from None
    if not isinstance(data, dict):
        raise errors.bad_request("Request body must be a JSON object", "invalid_json")
    return data


def parse_body(body: bytes, max_bytes: int) -> tuple[str, bool]:
    """Read ``model`` and ``stream`` from a JSON request body, rejecting anything unusable."""
    data = json_object(body, max_bytes)
    model = data.get("model")
    if model is None:
        raise errors.bad_request(
            "Missing required parameter: 'model'", "missing_required_parameter", "model"
        )
    if not isinstance(model, str) or not model:
        raise errors.bad_request("'model' must be a non-empty string", "invalid_type", "model")
    return model, data.get("stream") is True


def internal_error(failure: Failure, request: IRequest) -> errors.APIError:
    log.failure("unexpected error handling {path}", failure, path=request.path)
    return errors.internal()


_NOT_RELAYED = Relayed(0)


@attrs.define(eq=False)
class Exchange:
    """One proxied request, from admission to its RequestEnded event."""

    request: IRequest
    started: float
    body: bytes = b""
    model: str = "-"
    stream: bool = False
    key_name: str = "-"
    release_key: Callable[[], None] = nothing_to_release
    waited: float | None = None
    relayed: Relayed = _NOT_RELAYED
    status: int = 0
    gone: bool = False  # the client hung up
    answering: Deferred[Any] | None = None  # the chain that answers it
    call: Any = None  # what another API's route read of the request (see Proxy's hooks)


class Proxy:
    """Carries relayed requests through the gate, the queue and the relay.

    This class speaks the OpenAI API; another API subclasses it and overrides the hooks
    :meth:`parse`, :meth:`forward`, :meth:`served` and :meth:`render_error`.
    """

    # A stream that waits gets SSE comments (``: loading gemma3, 10 s``).
    comments_while_waiting = True

    def __init__(
        self, manager: SwapManager, relay: Relay, gate: Gate, bus: EventBus, clock: IReactorTime
    ) -> None:
        self._manager = manager
        self._relay = relay
        self._gate = gate
        self._bus = bus
        self._clock = clock
        # A Service: the daemon's service tree stops its timer.
        self.keepalive: KeepAlive[Exchange] = KeepAlive(
            clock, lambda: self._config.keepalive_interval, self._still_waiting
        )
        self._on_lease = self._serve
        self._on_failure = self._ended

    @property
    def _config(self) -> Config:
        return self._manager.config

    def handle(self, request: IRequest, call: Any = None) -> IResource:
        """Take over ``request``; what the route returns (it is answered later)."""
        x = Exchange(request, self._clock.seconds())
        if call is not None:
            x.call = call
        d: Deferred[Any] = maybeDeferred(self._admit, x)
        if not d.called:  # it waits in the queue
            _forget_routing(request)
            if x.stream and self.comments_while_waiting:
                self.keepalive.add(x)  # until _serve or _ended
        # The callbacks share one arguments tuple, the bound methods are made once, no kwargs
        # dicts: what a waiting request holds is counted in bytes.
        args = (x,)
        d.addCallbacks(self._on_lease, self._on_failure, callbackArgs=args, errbackArgs=args)
        x.answering = d
        finished = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addCallbacks(passthru, _hung_up, errbackArgs=args)
        return ANSWERED_LATER

    def _admit(self, x: Exchange) -> Deferred[Lease]:
        """Check the request and queue it; fires with a lease on the model's backend."""
        request = x.request
        key = self._gate.identify(request)
        x.key_name = key.name if key is not None else "-"
        content = request.content
        assert content is not None
        x.body = content.read()
        # Kept as bytes from here; the request's own copy (a temporary file, open, above 100
        # KB) goes now rather than when the answer ends, maybe minutes of queueing later.
        content.close()
        request.content = None
        self.parse(x, key)
        if x.model not in self._config.models:
            raise errors.model_not_found(x.model, self._gate.visible(key, self._manager.models()))
        x.model = sys.intern(x.model)  # a configured name: one string, not one per request
        self._gate.check_model(key, x.model)
        priority = key.priority if key is not None else self._priority(request)
        x.release_key = self._gate.admit(key)
        return self._manager.acquire(x.model, priority, x.key_name)

    @inlineCallbacks
    def _serve(self, lease: Lease, x: Exchange) -> Any:
        """Relay the request to the backend its lease names; release the lease after it."""
        failure = None
        try:
            self.keepalive.discard(x)
            request = x.request
            x.waited = lease.waited
            if not started_writing(request):
                request.setHeader(b"x-llmswap-queue-position", str(lease.position).encode())
                request.setHeader(b"x-llmswap-queue-wait", f"{lease.waited:.3f}".encode())
            x.relayed = yield self.forward(x, lease)
            x.status = x.relayed.status
        except Exception:  # CancelledError included: the client went away
            failure = Failure()
        finally:
            lease.release()
        if failure is None:
            self.served(x)
        self._ended(failure, x)

    # -- the hooks another API overrides ---------------------------------------------------

    def parse(self, x: Exchange, key: APIKey | None) -> None:
        """Read the request body (``x.body``) of ``key``'s caller: set ``x.model`` and
        ``x.stream``."""
        x.model, x.stream = parse_body(x.body, self._config.max_body_bytes)

    def forward(self, x: Exchange, lease: Lease) -> Deferred[Relayed]:
        """Send the request to the backend the lease names; fires after the answer's end."""
        request = x.request
        url = lease.backend_url + request.uri[len(b"/v1") :].decode("latin-1")
        return self._relay.forward(request, x.model, url, x.body, self.dropped_headers())

    def served(self, x: Exchange) -> None:
        """The answer was relayed and the lease released."""

    def render_error(self, request: IRequest, err: errors.APIError) -> bytes:
        return errors.render(request, err)

    def dropped_headers(self) -> frozenset[bytes]:
        """Request headers not forwarded: llmswap's own API keys are not the backend's."""
        return _KEY_HEADERS if self._gate.enabled else frozenset()

    def _ended(self, failure: Failure | None, x: Exchange) -> None:
        """Answer what stopped the request, if anything; finish it; account for it.

        The end of every request's chain, so it logs what it cannot handle rather than raise.
        """
        self.keepalive.discard(x)
        request = x.request
        try:
            if failure is not None:
                self._answer_failure(failure, x)
            if not x.gone:
                request.finish()
        except Exception:
            internal_error(Failure(), request)
        x.release_key()
        duration = self._clock.seconds() - x.started
        # The answer leaves on the reactor's next poll (Twisted buffers writes until then), so
        # accounting now would hold it back by its cost.  A callLater(0) still runs before that
        # poll; the call it schedules runs after it.
        self._clock.callLater(0, self._clock.callLater, 0, self._account, x, duration)

    def _account(self, x: Exchange, duration: float) -> None:
        """Publish the ended request: metrics count it, the access log writes its line."""
        relayed = x.relayed
        first = relayed.first_byte_at - x.started if x.stream and relayed.first_byte_at else None
        tail = relayed.tail
        usage = usage_from(tail) if tail else None
        request = x.request
        self._bus.publish(
            RequestEnded(
                at=self._clock.seconds(),
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                model=errors.quote(x.model),
                configured=x.model in self._config.models,
                key=x.key_name,
                stream=x.stream,
                status=x.status,
                queue_wait=x.waited,
                duration=duration,
                first_byte=first,
                prompt_tokens=usage[0] if usage else None,
                completion_tokens=usage[1] if usage else None,
                tokens_per_second=speed_from(tail) if usage else None,
            )
        )

    def _answer_failure(self, failure: Failure, x: Exchange) -> None:
        """OpenAI-shaped, or an event in a stream already committed by "loading" comments."""
        if x.gone and failure.check(CancelledError):  # nobody is left to answer
            x.status = CLIENT_CLOSED
            return
        if isinstance(failure.value, errors.APIError):
            err = failure.value
        else:
            err = internal_error(failure, x.request)
        x.status = err.status
        if started_writing(x.request):
            x.request.write(sse_event(err.body()))
        else:
            x.request.write(self.render_error(x.request, err))

    def _priority(self, request: IRequest) -> int:
        header = self._config.priority_header
        if header is None:
            return 0
        value = request.getHeader(header)
        if value is None:
            return 0
        try:
            return int(value)
        except ValueError:
            raise errors.invalid_priority(header, value) from None

    def _still_waiting(self, x: Exchange) -> None:
        """An SSE comment while a stream waits, so clients and proxies keep the connection."""
        request = x.request
        if not started_writing(request):
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
        loading = self._manager.state(x.model) is ModelState.STARTING
        what = "loading" if loading else "queued for"
        waited = self._clock.seconds() - x.started
        request.write(f": {what} {x.model}, {waited:.0f} s\n\n".encode())


def _forget_routing(request: IRequest) -> None:
    """Drop what Klein keeps on a request for its route (a werkzeug URL map adapter with the
    URL's parts, about 0.6 KB): nothing reads it once the route has returned, and a request may
    wait in the queue for minutes."""
    if isinstance(request, Componentized):
        with contextlib.suppress(KeyError):  # a Klein that keeps nothing there
            request.unsetComponent(IKleinRequest)


def _hung_up(failure: Failure, x: Exchange) -> None:
    x.gone = True
    if x.answering is not None:
        x.answering.cancel()  # drops a waiting ticket, or aborts the backend request


class _AnsweredLater(Resource):
    """What a route that answers later returns: Klein renders it, and twisted.web leaves the
    request open (NOT_DONE_YET) for callbacks to answer and finish."""

    isLeaf = True

    def render(self, request: IRequest) -> object:
        return NOT_DONE_YET


ANSWERED_LATER = _AnsweredLater()
