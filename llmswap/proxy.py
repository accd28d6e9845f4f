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

import sys
from collections.abc import Callable, Generator
from functools import partial
from typing import Any, BinaryIO, Generic, TypeVar

import attrs
from klein.interfaces import IKleinRequest
from twisted.application.service import MultiService
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

from llmswap import errors, filters, surface
from llmswap.access import Caller, Gate, nothing_to_release
from llmswap.bodies import form_model, parse_body
from llmswap.config.config import Config
from llmswap.config.keys import APIKey
from llmswap.config.model import Preset, server_root
from llmswap.events import EventBus, ModelState, RequestEnded, failed
from llmswap.headers import KEY_HEADERS, client_of, from_console, header_priority
from llmswap.heartbeat import Heartbeat, say_waiting
from llmswap.relay.ending import OPENAI, OPENAI_OTHER, StreamEnd, ends_known
from llmswap.relay.forward import BackendGone, Relay, Relayed, started_writing
from llmswap.relay.usage import speed_from, usage_from
from llmswap.swap.manager import SwapManager
from llmswap.swap.queue import Lease

log = Logger()

CLIENT_CLOSED = 499  # nginx's convention for "client went away before the answer"


def internal_error(failure: Failure, request: IRequest) -> errors.APIError:
    path = errors.printable(request.path.decode("latin-1"))
    log.failure("unexpected error handling {path}", failure, path=path)
    return errors.internal()


_NOT_RELAYED = Relayed(0)
# What an API's route read of a request before the proxy takes it (Ollama's call, /upstream/'s
# target; None for OpenAI's and Anthropic's, whose bodies the proxy reads itself).
CallT = TypeVar("CallT")


@attrs.define(eq=False)
class Exchange(Generic[CallT]):
    """One proxied request, from admission to its RequestEnded event."""

    request: IRequest
    started: float
    call: CallT
    body: bytes = b""
    model: str = "-"
    stream: bool = False
    key_name: str = "-"
    # Who asks, when the request says (OpenAI's ``user``, Open WebUI's forwarded user header):
    # a lone user's requests tell the scheduler nobody else waits for its model.
    client: str | None = None
    release_key: Callable[[], None] = nothing_to_release
    waited: float | None = None
    relayed: Relayed = _NOT_RELAYED
    status: int = 0
    error: str | None = None  # llmswap's own, when it answered one
    gone: bool = False  # the client hung up
    answering: Deferred[Any] | None = None  # the chain that answers it
    priority: int = 0
    # A body relayed from the temporary file Twisted keeps it in (a multipart upload), not
    # read into memory.
    upload: BinaryIO | None = None
    # The filters of the alias asked for (a variant), over the model's own.
    preset: Preset | None = None
    pool: str | None = None  # the pool asked for, whose member serves


class Proxy(MultiService, Generic[CallT]):
    """Carries relayed requests through the gate, the queue and the relay.

    A Service: the timer of its waiting streams (:attr:`heartbeat`) is its child, so adding
    the proxy to the daemon's tree starts and stops it.

    This class speaks the OpenAI API; another API subclasses it and overrides the hooks
    :meth:`parse`, :meth:`forward`, :meth:`served` and :meth:`render_error`.
    """

    # A stream that waits gets SSE comments (``: loading gemma3, 10 s``).
    comments_while_waiting = True
    # How the API's streams end, and its error events.
    ending: StreamEnd = OPENAI

    def __init__(
        self, manager: SwapManager, relay: Relay, gate: Gate, bus: EventBus, clock: IReactorTime
    ) -> None:
        self._manager = manager
        self._relay = relay
        self._gate = gate
        self._bus = bus
        self._clock = clock
        super().__init__()
        self.heartbeat: Heartbeat[Exchange[CallT]] = Heartbeat(
            clock, lambda: self._config.keepalive_interval, self._still_waiting
        )
        self.heartbeat.setServiceParent(self)
        self._on_lease = self._serve
        self._on_failure = self._ended

    @property
    def _config(self) -> Config:
        return self._manager.config

    def handle(self, request: IRequest, call: CallT) -> IResource:
        """Take over ``request``; what the route returns (it is answered later)."""
        x = Exchange(request, self._clock.seconds(), call)
        d: Deferred[Any] = maybeDeferred(self._admit, x)
        if not d.called:  # it waits in the queue
            _forget_routing(request)
            if x.stream and self.comments_while_waiting:
                self.heartbeat.add(x)  # until _serve or _ended
                if self._reasoning(x):  # a chat client shows it at once, not in 5 s
                    self._still_waiting(x)
        # The callbacks share one arguments tuple, the bound methods are made once, no kwargs
        # dicts: what a waiting request holds is counted in bytes.
        args = (x,)
        d.addCallbacks(self._on_lease, self._on_failure, callbackArgs=args, errbackArgs=args)
        x.answering = d
        finished = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addCallbacks(passthru, _hung_up, errbackArgs=args)
        return ANSWERED_LATER

    def _admit(self, x: Exchange[CallT]) -> Deferred[Lease]:
        """Check the request and queue it; fires with a lease on the model's backend."""
        request = x.request
        key = self._gate.identify(request)
        x.key_name = key.name if key is not None else "-"
        content = request.content
        assert content is not None
        if self.uploads(request):
            x.upload = content
        else:
            x.body = content.read()
            # Kept as bytes from here; the request's own copy (a temporary file, open, above
            # 100 KB) goes now rather than when the answer ends, maybe minutes later.
            content.close()
            request.content = None
        self.parse(x, key)
        self._gate.check_model(key, x.model)
        self.check_path(x)
        x.priority = self.priority_of(request, key)
        x.release_key = self._gate.admit(key)
        x.client = client_of(request, x.client)
        return self._manager.acquire(x.model, x.priority, x.key_name, x.client)

    @inlineCallbacks
    def _serve(self, lease: Lease, x: Exchange[CallT]) -> Generator[Deferred[Any], Any, None]:
        """Relay the request to the backend its lease names; release the lease after it."""
        failure = None
        try:
            self.heartbeat.discard(x)
            request = x.request
            x.waited = lease.waited
            if not started_writing(request):
                request.setHeader(b"x-llmswap-queue-position", str(lease.position).encode())
                request.setHeader(b"x-llmswap-queue-wait", f"{lease.waited:.3f}".encode())
                request.setHeader(b"x-llmswap-model", x.model.encode())
            try:
                x.relayed = yield self.forward(x, lease)
            except BackendGone as gone:
                lease = yield self._once_more(lease, x, gone)
                x.relayed = yield self.forward(x, lease)
            x.status = x.relayed.status
        except Exception:  # CancelledError included: the client went away
            failure = Failure()
        finally:
            lease.release()
        if failure is None:
            self.served(x)
        self._ended(failure, x)

    def _once_more(self, lease: Lease, x: Exchange[CallT], gone: BackendGone) -> Deferred[Lease]:
        """The model's backend refused the connection (it or its engine died unnoticed): it is
        restarted and the request, which never reached it, queued once more, not twice."""
        lease.release()
        if not self._manager.backend_gone(lease.instance, gone.error.message):
            raise gone  # a reload removed the model while it answered
        log.warn("{model}: {e}; restarting it for the request", model=x.model, e=gone)
        return self._manager.acquire(x.model, x.priority, x.key_name, x.client)

    # -- the hooks another API overrides ---------------------------------------------------

    def uploads(self, request: IRequest) -> bool:
        """Whether the body is relayed from its file rather than read: a multipart form."""
        content_type = request.getHeader(b"content-type") or b""
        return content_type.lower().startswith(b"multipart/form-data")

    def parse(self, x: Exchange[CallT], key: APIKey | None) -> None:
        """Read the request body (``x.body``, or the ``x.upload`` file) of ``key``'s caller:
        set ``x.model`` (:meth:`resolve`d) and ``x.stream``."""
        if x.upload is not None:
            x.model = form_model(x.request, x.upload, self._config.max_upload_bytes)
        else:
            x.model, x.stream, x.client = parse_body(x.body, self._config.max_body_bytes)
        self.resolve(x, key)

    def resolve(self, x: Exchange[CallT], key: APIKey | None) -> None:
        """``x.model``, the name asked, becomes its model (an alias's: one queue, one backend;
        a pool's: the member chosen now), and ``x.preset`` the asked alias's filters."""
        config = self._config
        found = self._manager.resolve(x.model, partial(self._gate.allows, key))
        if found is None:
            raise errors.model_not_found(x.model, self._gate.names(key, config))
        model, asked = found
        if x.model in config.pools:
            x.pool = x.model
        x.model = sys.intern(model)  # a configured name: one string, not one per request
        x.preset = config.preset(model, asked)

    def forward(self, x: Exchange[CallT], lease: Lease) -> Deferred[Relayed]:
        """Send the request to the backend the lease names; fires after the answer's end."""
        request = x.request
        uri = request.uri.decode("latin-1")
        # /v1/... below the backend's OpenAI base; llama.cpp's own routes below its root.
        if uri.startswith("/v1/"):
            url = lease.backend_url + uri[3:]
        else:
            url = server_root(lease.backend_url) + uri
        body: bytes | BinaryIO
        if x.upload is not None:
            body = x.upload
        else:
            body = filters.body_for(x.body, self._config.models[x.model], x.preset)
        drop, key = self.dropped_headers(), lease.authorization
        ending = self.ending if ends_known(uri) else OPENAI_OTHER
        return self._relay.forward(request, x.model, url, body, drop, None, key, ending)

    def served(self, x: Exchange[CallT]) -> None:
        """The answer was relayed and the lease released."""

    def check_path(self, x: Exchange[CallT]) -> None:
        """What the relayed path may reach (:func:`llmswap.surface.check_relayed`)."""
        remote = self._config.models[x.model].remote is not None
        surface.check_relayed(
            x.request, remote, lambda: self._gate.permits(x.request, Caller.ADMIN)
        )

    def render_error(self, request: IRequest, err: errors.APIError) -> bytes:
        return errors.render(request, err)

    def dropped_headers(self) -> frozenset[bytes]:
        """Request headers not forwarded: llmswap's own API keys are not the backend's."""
        return KEY_HEADERS if self._gate.enabled else frozenset()

    def _ended(self, failure: Failure | None, x: Exchange[CallT]) -> None:
        """Answer what stopped the request, if anything; finish it; account for it.

        The end of every request's chain, so it logs what it cannot handle rather than raise.
        """
        self.heartbeat.discard(x)
        if x.upload is not None:
            x.upload.close()
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

    def _account(self, x: Exchange[CallT], duration: float) -> None:
        """Publish the ended request: metrics count it, the access log writes its line."""
        relayed = x.relayed
        first = relayed.first_byte_at - x.started if x.stream and relayed.first_byte_at else None
        tail = relayed.tail
        usage = usage_from(tail) if tail else None
        request = x.request
        kept = failed(x.status)  # the console keeps what it needs to see why
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
                pool=x.pool,
                error=x.error,
                sent=x.body if kept else b"",
                answer=tail if kept else b"",
                console=from_console(request),
            )
        )

    def _answer_failure(self, failure: Failure, x: Exchange[CallT]) -> None:
        """OpenAI-shaped, or an event in a stream already committed by "loading" comments."""
        if x.gone and failure.check(CancelledError):  # nobody is left to answer
            x.status = CLIENT_CLOSED
            return
        if isinstance(failure.value, errors.APIError):
            err = failure.value
        elif isinstance(failure.value, BackendGone):
            err = failure.value.error
        else:
            err = internal_error(failure, x.request)
        x.status, x.error = err.status, err.message
        if started_writing(x.request):
            x.request.write(self.ending.error(err))
        else:
            x.request.write(self.render_error(x.request, err))

    def priority_of(self, request: IRequest, key: APIKey | None) -> int:
        """Its key's priority, else the ``priority_header``'s (0 without either)."""
        if key is not None:
            return key.priority
        return header_priority(request, self._config.priority_header)

    def _reasoning(self, x: Exchange[CallT]) -> bool:
        """Whether a waiting chat stream is told its model's progress as reasoning."""
        model = self._config.models.get(x.model)
        return (
            model is not None
            and model.loading_status == "reasoning"
            and x.request.path == b"/v1/chat/completions"
        )

    def _still_waiting(self, x: Exchange[CallT]) -> None:
        """While a stream waits: a comment, or the model's progress as reasoning."""
        loading = self._manager.state(x.model) is ModelState.STARTING
        usual = self._manager.last_load_seconds(x.model)
        now = self._clock.seconds()
        say_waiting(x.request, x.model, loading, now - x.started, usual, self._reasoning(x), now)


def _forget_routing(request: IRequest) -> None:
    """Drop what Klein keeps on a request for its route (a werkzeug URL map adapter with the
    URL's parts, about 0.6 KB): nothing reads it once the route has returned, and a request may
    wait in the queue for minutes."""
    if isinstance(request, Componentized):
        # A KeyError: this Klein keeps it elsewhere (test_api.py finds that out first).
        request.unsetComponent(IKleinRequest)


def _hung_up(failure: Failure, x: Exchange[CallT]) -> None:
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
