"""``/upstream/<model>/<path>``: any method and path, relayed to a model's own server.

llama-server's ``/props`` and web UI, vLLM's ``/metrics``: the model is loaded as for any
request (the same gate, queue and lease, so the key must be allowed the model), then the request
goes to the server's root as it came, its body relayed from the temporary file Twisted keeps it
in, its answer streamed back.  A request to upgrade its connection (a WebSocket: ComfyUI, a
web UI's live view) is tunnelled (:mod:`llmswap.relay.tunnel`).

It is an operator's tool (:mod:`llmswap.surface`): admin keys, or keys with ``upstream: true``.
A backend's management routes (sleep, weights, slots...) are for admin keys only, whatever the
key; a ``remote:`` model is reached only when it says ``upstream: true``, and then only on the
inference routes, since its key is the operator's whole account there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from llmswap import errors, surface
from llmswap.bodies import check_size
from llmswap.config.config import Config
from llmswap.config.keys import APIKey
from llmswap.config.model import server_root
from llmswap.headers import UPSTREAM_POLICY
from llmswap.proxy import ANSWERED_LATER, Exchange, Proxy
from llmswap.relay.forward import Relayed
from llmswap.relay.tunnel import Tunnels
from llmswap.swap.queue import Lease

PREFIX = b"/upstream/"


@attrs.frozen
class Target:
    model: str  # a model's name or an alias
    path: str  # below the server's root, with the query


def target(config: Config, uri: bytes, visible: list[str]) -> Target:
    """The model an ``/upstream/`` URI names (the longest name or alias it starts with: names
    may hold slashes) and the path after it; 404 (listing the ``visible`` models) when none."""
    rest = uri[len(PREFIX) :].decode("latin-1")
    path, _, query = rest.partition("?")
    names = sorted([*config.models, *config.aliases], key=len, reverse=True)
    for name in names:
        if path == name or path.startswith(name + "/"):
            below = path[len(name) :] or "/"
            return Target(name, below + (f"?{query}" if query else ""))
    raise errors.model_not_found(errors.quote(path.split("/")[0]), visible)


def check_reach(config: Config, found: Target, method: bytes, admin: bool) -> None:
    """403 for a backend's management route unless ``admin``; 404 for a remote model that
    did not open itself to ``/upstream/``, or for anything but its inference routes."""
    path = found.path.partition("?")[0]
    model = config.models.get(config.resolve(found.model) or "")
    remote = model.remote if model is not None else None
    if remote is not None and not (
        remote.upstream and method == b"POST" and surface.inference(path, below_v1=False)
    ):
        raise errors.unknown_url(method.decode("latin-1"), f"/upstream/{found.model}{path}")
    if not admin and surface.management(path, method):
        raise errors.management_route(path)


class UpstreamProxy(Proxy[Target]):
    """The request path with the model from the URL and the body relayed untouched; an
    upgraded connection (a WebSocket) through :attr:`tunnels`."""

    tunnels: Tunnels | None = None

    def tunnel(self, request: IRequest, found: Target) -> IResource:
        """Queue for the model like a request, then splice the connection to its server; the
        key's limits count the opening, not the hours a socket stays open."""
        assert self.tunnels is not None
        key = self._gate.identify(request)
        self.tunnels.room()
        model = self._config.resolve(found.model) or found.model
        self._gate.check_model(key, model)
        priority = self.priority_of(request, key)
        release = self._gate.admit(key)
        try:
            lease = self._manager.acquire(model, priority, key.name if key is not None else "-")
        except BaseException:  # refused at once (a full queue, crash backoff): not counted
            release()
            raise
        lease.addBoth(_after, release)
        self.tunnels.open(request, lease, found.path, self.dropped_headers())
        return ANSWERED_LATER

    comments_while_waiting = False  # the answer is the backend's, whatever it is

    def uploads(self, request: Any) -> bool:
        return True

    def parse(self, x: Exchange[Target], key: APIKey | None) -> None:
        found: Target = x.call
        assert x.upload is not None
        check_size(x.upload, self._config.max_upload_bytes)
        x.model, x.stream = found.model, False
        self.resolve(x, key)

    def check_path(self, x: Exchange[Target]) -> None:
        """The route checked its path already (:func:`check_reach`)."""

    def forward(self, x: Exchange[Target], lease: Lease) -> Deferred[Relayed]:
        assert x.upload is not None
        x.request.setHeader(b"content-security-policy", UPSTREAM_POLICY)
        url = server_root(lease.backend_url) + x.call.path
        return self._relay.forward(x.request, x.model, url, x.upload, self.dropped_headers(),
                                   authorization=lease.authorization)  # fmt: skip


def _after(result: Any, release: Callable[[], None]) -> Any:
    release()
    return result
