"""The router's model objects, as ``llama-server --models-dir`` writes them, from llmswap's
picture: ``status.value`` in the router's words (``unloaded``, ``loading``, ``loaded``,
``sleeping``; a failed model ``unloaded`` with ``failed`` and ``exit_code``), ``meta`` (the
backend's own, ``n_ctx`` included) while loaded, and under ``llmswap`` what the router cannot
say: llmswap's state and error, the queue, the footprint.

``status.args`` is the router's command line for the model; llmswap's would carry whatever the
command holds (an ``--api-key`` expanded from the environment), so it is always empty.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Mapping
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime

from llmswap.config.config import Config
from llmswap.events import ModelState
from llmswap.interfaces import BackendHTTP, BackendResponse
from llmswap.relay import capped
from llmswap.swap.snapshot import ModelSnapshot, Snapshot

STATUS = {
    ModelState.STOPPED: "unloaded",
    ModelState.STARTING: "loading",
    ModelState.READY: "loaded",
    # Still serving until it is gone: loaded, as the router says of a model it is stopping.
    ModelState.DRAINING: "loaded",
    ModelState.STOPPING: "loaded",
    ModelState.ASLEEP: "sleeping",
    ModelState.FAILED: "unloaded",
}
_META_TIMEOUT = 2.0
_EXIT_CODE = re.compile(r"code (-?\d+)")


def shown(snap: Snapshot, config: Config, model: str) -> ModelSnapshot:
    """A model's instance that says most: its resident one, else its first."""
    instances = [snap.instances[n] for n in config.placements[model]]
    return next((m for m in instances if m.state.resident), instances[0])


def status(m: ModelSnapshot) -> dict[str, Any]:
    out: dict[str, Any] = {"value": STATUS[m.state], "args": [], "preset": ""}
    if m.state is ModelState.FAILED:
        code = m.backend.get("exit_code")
        if not isinstance(code, int):
            found = _EXIT_CODE.search(m.error or "")
            code = int(found.group(1)) if found else 1
        out.update(exit_code=code, failed=True)
    return out


def entry(
    config: Config, model: str, m: ModelSnapshot, created: int, meta: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``model``'s object in ``GET /models``."""
    cfg = config.models[model]
    inputs = ["text"] + (["image"] if "vision" in cfg.info.capabilities else [])
    out: dict[str, Any] = {
        "id": model,
        "aliases": list(cfg.aliases),
        "tags": [],
        "object": "model",
        "owned_by": "local",
        "created": created,
        "status": status(m),
        "architecture": {"input_modalities": inputs, "output_modalities": ["text"]},
        "source": "preset",  # declared in a configuration file, as the router's presets
        "can_remove": False,
        "llmswap": {
            "state": m.state.value,
            "error": m.error,
            "waiting": m.waiting,
            "in_flight": m.in_flight,
            "footprint": m.measured or m.declared or m.estimated,
            "host": m.host,
        },
    }
    if meta is not None:
        out["meta"] = dict(meta)
    return out


class Meta:
    """What a loaded backend says of its model (llama-server's ``meta``: ``n_ctx``, ``n_params``
    ...), asked once per load and shared by whoever asks meanwhile; a backend that does not
    answer within :data:`_META_TIMEOUT`, whole, has none.  The router shows it while the model
    is loaded."""

    def __init__(self, http: BackendHTTP, clock: IReactorTime) -> None:
        self._http = http
        self._clock = clock
        # Instance -> (when it became ready, its meta or None when it has none).
        self._known: dict[str, tuple[float, dict[str, Any] | None]] = {}
        # Instance -> (when it became ready, who waits for the answer being fetched).
        self._asking: dict[str, tuple[float, list[Deferred[Any]]]] = {}

    def of(self, config: Config, snap: Snapshot, models: list[str]) -> Deferred[dict[str, Any]]:
        """Model -> its meta, for those of ``models`` that are loaded (and have one)."""
        asked = {}
        for model in models:
            m = shown(snap, config, model)
            if STATUS[m.state] == "loaded" and config.instances[m.name].remote is None:
                asked[model] = self._meta(config, m)
        d = gatherResults(list(asked.values()))
        return d.addCallback(lambda metas: {n: x for n, x in zip(asked, metas, strict=True) if x})

    def _meta(self, config: Config, m: ModelSnapshot) -> Deferred[Any]:
        known = self._known.get(m.name)
        if known is not None and known[0] == m.since:
            return succeed(known[1])
        waiter: Deferred[Any] = Deferred()
        asking = self._asking.get(m.name)
        if asking is not None and asking[0] == m.since:
            asking[1].append(waiter)
            return waiter
        # (Waiters for an earlier load of it, if any, get this answer: none is left waiting.)
        self._asking[m.name] = (m.since, [*(asking[1] if asking else []), waiter])
        cfg = config.instances[m.name]
        d = self._fetch(cfg.backend_url).addTimeout(_META_TIMEOUT, self._clock)
        d.addErrback(lambda _: None)  # not llama-server, or it did not answer: no meta
        d.addCallback(self._answered, config, m)
        return waiter

    @inlineCallbacks
    def _fetch(self, backend_url: str) -> Generator[Deferred[Any], Any, Any]:
        response: BackendResponse = yield self._http.get(backend_url + "/models")
        raw = yield capped.read(response)
        body = json.loads(raw) if response.code == 200 else None
        for each in body.get("data", []) if isinstance(body, dict) else []:
            if isinstance(each, dict) and isinstance(each.get("meta"), dict):
                return each["meta"]
        return None

    def _answered(self, meta: Any, config: Config, m: ModelSnapshot) -> None:
        context = config.instances[m.name].info.context_length
        if meta is None and context:
            meta = {"n_ctx": context}
        if len(self._known) > 4 * len(config.instances):  # instances a reload removed
            self._known.clear()
        self._known[m.name] = (m.since, meta)
        _, waiters = self._asking.pop(m.name, (0.0, []))
        for waiter in waiters:
            waiter.callback(meta)
