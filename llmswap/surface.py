"""The HTTP surface in one place: every route's body limit, who may call it, what it reveals.

llmswap's channel (:mod:`llmswap.site`) looks a request up here as soon as its headers have
arrived, before one byte of its body is taken: a caller the route does not admit is refused
(401, 403), a ``Content-Length`` over the route's limit is refused (413), and a chunked body is
counted as it comes and cut at the limit.  So a client without a key cannot make llmswap spool a
body to disk or hold it in memory, whatever route it names.  The routes themselves
(:mod:`llmswap.resource`, :mod:`llmswap.ollama.routes`, :mod:`llmswap.console.routes`) check the
same permissions again, and the finer ones (a key's models, ``/upstream/``'s paths) that need
more than the headers.  docs/security.md explains the threat model this table serves; a test
checks that every route of the resource tree has its row here.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable
from urllib.parse import unquote, unquote_to_bytes

import attrs
from twisted.web.iweb import IRequest

from llmswap import errors
from llmswap.access import Caller, Gate
from llmswap.config.config import Config


class Body(enum.Enum):
    """How large a route's body may be."""

    SMALL = "64 KiB (admin, console and GET routes)"
    JSON = "max_body_bytes"
    FORM = "max_body_bytes; a multipart upload max_upload_bytes"
    UPLOAD = "max_upload_bytes"
    CONFIG = "1 MiB (a configuration file's text)"


SMALL_BYTES = 64 * 1024
CONFIG_BYTES = 1024 * 1024


class Shape(enum.Enum):
    """The API whose error shape a refusal takes."""

    OPENAI = "openai"
    OLLAMA = "ollama"
    ANTHROPIC = "anthropic"


@attrs.frozen
class Route:
    """``path``: exact, or with ``*`` standing for any characters."""

    path: str
    methods: tuple[str, ...]
    body: Body
    caller: Caller
    reveals: str
    shape: Shape = Shape.OPENAI
    pattern: re.Pattern[bytes] = attrs.field(init=False, repr=False)

    @pattern.default
    def _compile(self) -> re.Pattern[bytes]:
        return re.compile(b".*".join(re.escape(p.encode()) for p in self.path.split("*")) + b"$")

    def matches(self, method: bytes, path: bytes) -> bool:
        return method.decode("latin-1") in self.methods and self.pattern.match(path) is not None


_ANY = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_GET = ("GET", "HEAD")
_ANSWER = "the model's answer"
_LLAMA_CPP = ("/infill", "/completion", "/rerank", "/tokenize", "/detokenize")

# First match wins.  A request no row matches (an unknown path, or a method its path does not
# take) gets a small body limit and reaches the routes, which answer 404 or 405.
ROUTES: tuple[Route, ...] = (
    Route("/", _GET, Body.SMALL, Caller.ANYONE, "that a server answers (Ollama's banner)"),
    Route("/ui", _GET, Body.SMALL, Caller.ANYONE, "a redirect to /ui/"),
    Route("/ui/*", _GET, Body.SMALL, Caller.ANYONE,
          "the console's page, script and style: no data"),
    Route("/health", _GET, Body.SMALL, Caller.HEALTH,
          "states and counts; backend details (pids, paths, URLs, output lines, engines) only to "
          "admins or with open_health: full"),
    Route("/metrics", _GET, Body.SMALL, Caller.HEALTH, "counters and states by model name; with "
          "?model= the loaded backend's own metrics, to a key that may use it"),
    Route("/slots", _GET, Body.SMALL, Caller.ADMIN, "with ?model= the loaded backend's slots "
          "(what they hold: users' prompts)"),
    Route("/v1/models", _GET, Body.SMALL, Caller.KEY, "the models the key may use"),
    Route("/v1/models/*", _GET, Body.SMALL, Caller.KEY, "a model the key may use"),
    Route("/v1/messages", ("POST",), Body.JSON, Caller.KEY, _ANSWER, Shape.ANTHROPIC),
    Route("/v1/messages/count_tokens", ("POST",), Body.JSON, Caller.KEY, _ANSWER,
          Shape.ANTHROPIC),
    Route("/v1/*", ("POST",), Body.FORM, Caller.KEY, _ANSWER),
    *(Route(p, ("POST",), Body.JSON, Caller.KEY, _ANSWER) for p in _LLAMA_CPP),
    Route("/models", _GET, Body.SMALL, Caller.KEY, "the models the key may use, their states"),
    Route("/models/sse", _GET, Body.SMALL, Caller.KEY, "state changes of the models the key "
          "may use"),
    Route("/models/load", ("POST",), Body.SMALL, Caller.ADMIN, "that a load began"),
    Route("/models/unload", ("POST",), Body.SMALL, Caller.UNLOAD, "that an unload began"),
    Route("/props", _GET, Body.SMALL, Caller.KEY,
          "llmswap's router properties; with ?model= the loaded backend's own /props (a model "
          "the key may use)"),
    Route("/api/version", _GET, Body.SMALL, Caller.ANYONE, "the Ollama API version",
          Shape.OLLAMA),
    Route("/api/tags", _GET, Body.SMALL, Caller.KEY, "the models the key may use",
          Shape.OLLAMA),
    Route("/api/ps", _GET, Body.SMALL, Caller.KEY, "which of them are loaded", Shape.OLLAMA),
    Route("/api/*", (*_GET, "POST", "DELETE"), Body.JSON, Caller.KEY, _ANSWER, Shape.OLLAMA),
    Route("/upstream/*", _ANY, Body.UPLOAD, Caller.UPSTREAM,
          "whatever the backend answers; its management routes only to admin keys; a remote "
          "model's inference routes only"),
    Route("/admin/session", ("POST",), Body.SMALL, Caller.LOGIN, "a session cookie (admin keys)"),
    Route("/admin/session", ("DELETE",), Body.SMALL, Caller.ANYONE, "nothing (a logout)"),
    Route("/admin/unload", ("POST",), Body.SMALL, Caller.UNLOAD, "the models' states"),
    Route("/admin/models/*/unload", ("POST",), Body.SMALL, Caller.UNLOAD, "the model's state"),
    Route("/admin/config/*", ("POST",), Body.CONFIG, Caller.ADMIN,
          "whether a configuration text is valid, each problem at its line (errors quote no "
          "file's text); apply: what the reload changed. Only where console.edit_config allows"),
    Route("/admin/*", _ANY, Body.SMALL, Caller.ADMIN,
          "everything: prompts in the logs and activity, every model's state; reload and load"),
)  # fmt: skip

# A backend's own routes beyond inference that change it, or show other users' prompts: admin
# keys only through /upstream/, whatever the key.  By the server that has them (a model does not
# say which server it runs, so all are refused for all); paths below the server's root, each
# with everything below it.
MANAGEMENT: dict[str, tuple[str, ...]] = {
    "llama.cpp": ("/slots", "/lora-adapters", "/props", "/models/load", "/models/unload",
                  "/v1/models/load", "/v1/models/unload"),
    "vllm": ("/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache",
             "/reset_mm_cache", "/start_profile", "/stop_profile", "/scale_elastic_ep",
             "/is_scaling_elastic_ep", "/pause", "/resume", "/update_weights",
             "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/server_info"),
    "sglang": ("/release_memory_occupation", "/resume_memory_occupation",
               "/update_weights_from_disk", "/update_weights_from_tensor",
               "/update_weights_from_distributed", "/init_weights_update_group",
               "/flush_cache", "/start_profile", "/stop_profile", "/configure_logging",
               "/abort_request", "/set_internal_state", "/slow_down", "/load_lora_adapter",
               "/unload_lora_adapter", "/start_expert_distribution_record",
               "/stop_expert_distribution_record", "/dump_expert_distribution_record",
               "/get_server_info", "/server_info"),
}  # fmt: skip
# llama-server's /props is read by anyone (its GET): only a POST changes it.
_READ_ONLY = frozenset({"/props"})

# The inference routes below an OpenAI base URL (``/v1``): all that a remote model answers
# through llmswap, whose key there is the operator's whole account.
INFERENCE = frozenset({
    "/chat/completions", "/completions", "/embeddings", "/responses", "/audio/transcriptions",
    "/audio/translations", "/audio/speech", "/images/generations", "/images/edits",
    "/images/variations", "/rerank", "/messages", "/messages/count_tokens",
})  # fmt: skip


def normalized(path: str) -> str:
    """A path as a backend's router may see it: percent-decoded (until nothing changes),
    lower case, without empty and dot segments."""
    while True:
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    parts: list[str] = []
    for part in path.lower().split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/" + "/".join(parts)


def management(path: str, method: bytes = b"POST") -> bool:
    """Whether ``path`` (below a server's root) is one of a backend's management routes."""
    path = normalized(path)
    for prefixes in MANAGEMENT.values():
        for prefix in prefixes:
            if path == prefix or path.startswith(prefix + "/"):
                if prefix in _READ_ONLY and method in (b"GET", b"HEAD"):
                    continue
                return True
    return False


def inference(path: str, below_v1: bool = True) -> bool:
    """Whether ``path`` is an inference route: below ``/v1`` (a relayed ``/v1/...`` request's
    endpoint), or below the server's root (``/upstream/``)."""
    path = normalized(path)
    if not below_v1:
        if not path.startswith("/v1/"):
            return False
        path = path[3:]
    return path in INFERENCE


def check_relayed(request: IRequest, remote: bool, admin: Callable[[], bool]) -> None:
    """A path relayed to a backend as it came must be plain (no encoded, dot or empty segments
    its router would resolve elsewhere); a backend's management routes (``/v1/load_lora_adapter``
    ...) are for ``admin`` callers only, as through ``/upstream/``; a remote model, whose key is
    the operator's whole account there, is reached on its inference routes only (else 404)."""
    path = request.path.decode("latin-1")
    if "%" in path or normalized(path) != path.lower():
        raise errors.bad_request(f"Invalid path {errors.quote(path)!r}", "invalid_url")
    if management(path) and not admin():
        raise errors.management_route(path)
    if remote and not (path.startswith("/v1/") and inference(path[3:])):
        raise errors.unknown_url(request.method.decode("latin-1"), path)


UNKNOWN = Route("*", _ANY, Body.SMALL, Caller.ANYONE, "an error: no such route")


@functools.lru_cache(maxsize=1024)  # a client's paths are few; the table walk is not free
def route(method: bytes, path: bytes) -> Route:
    for r in ROUTES:
        if r.matches(method, path):
            return r
    return UNKNOWN


def limit(r: Route, request: IRequest, config: Config) -> tuple[int, str]:
    """The most bytes ``request``'s body may have on route ``r``, and the setting that says so."""
    if r.body is Body.SMALL:
        return SMALL_BYTES, "the fixed limit of this route"
    if r.body is Body.CONFIG:
        return CONFIG_BYTES, "the fixed limit of this route"
    if r.body is Body.UPLOAD:
        return config.max_upload_bytes, "max_upload_bytes"
    if r.body is Body.FORM:
        content_type = request.getHeader(b"content-type") or b""
        if content_type.lower().startswith(b"multipart/form-data"):
            return config.max_upload_bytes, "max_upload_bytes"
    return config.max_body_bytes, "max_body_bytes"


def admit(
    gate: Gate, config: Config, request: IRequest, length: int | None
) -> tuple[Route, int, str]:
    """At a request's headers: its route, body limit and the setting behind it, or the refusal
    (an APIError): the caller first (401/403), then a declared length over the limit (413)."""
    path = request.uri.split(b"?", 1)[0]
    r = route(request.method, path)
    try:
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise errors.bad_request("The URL's path is not UTF-8", "invalid_url") from None
    gate.authorize(request, r.caller)
    most, setting = limit(r, request, config)
    if length is not None and length > most:
        raise errors.too_large(length, most, setting)
    return r, most, setting
