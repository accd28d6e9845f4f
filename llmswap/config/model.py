"""One model's settings: what they are (attrs classes) and how they are read from the file.

Macros are expanded first (:mod:`.macros`), then every key is checked by its declaration
in :mod:`.schema`; how models fit together (devices, aliases used twice, preload) is
:mod:`.config`'s business.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

from llmswap.config import macros
from llmswap.config.estimate import estimate, try_estimate
from llmswap.config.host import IMPLICIT_DEVICE, LOCAL
from llmswap.config.settings import GLOBAL, INFO, MODEL, REMOTE, SLEEP
from llmswap.config.values import ConfigError, names, text


@attrs.frozen
class ModelInfo:
    """What Ollama clients are told of a model (``/api/show``, ``/api/tags``)."""

    capabilities: tuple[str, ...] = INFO["capabilities"].default
    context_length: int | None = None
    family: str | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None


CAPABILITIES = ("completion", "tools", "vision", "embedding", "thinking", "insert")


def _info(raw: Any, where: str) -> ModelInfo:
    values = INFO.read_all(raw, where)
    capabilities = values.pop("capabilities")
    if not isinstance(capabilities, list | tuple) or not set(capabilities) <= set(CAPABILITIES):
        raise ConfigError(f"'{where}.capabilities' must list some of {', '.join(CAPABILITIES)}")
    return ModelInfo(capabilities=tuple(capabilities), **values)


@attrs.frozen
class Sleep:
    """How a model is put to sleep and woken (its backend's sleep mode), with resolved URLs."""

    kind: str
    sleep_url: str
    wake_url: str
    # Polled for ``{"is_sleeping": bool}``; None: the POST's 2xx confirms.
    status_url: str | None
    # Host memory held while asleep, on ``device``; None: not counted.
    memory: int | None = None
    device: str | None = None
    timeout: float = SLEEP["timeout"].default


def _sleep(raw: Any, where: str, backend_url: str) -> Sleep | None:
    if raw is None:
        return None
    values = SLEEP.read_all(raw, where)
    kind = values["kind"]
    if kind is None:
        raise ConfigError(f"'{where}.kind' is required: vllm, sglang or http")
    root = server_root(backend_url)
    preset = {
        "vllm": (f"{root}/sleep?level={values['level']}", f"{root}/wake_up", f"{root}/is_sleeping"),
        "sglang": (f"{root}/release_memory_occupation", f"{root}/resume_memory_occupation", None),
        "http": (None, None, None),
    }[kind]
    sleep_url = values["sleep_url"] or preset[0]
    wake_url = values["wake_url"] or preset[1]
    if sleep_url is None or wake_url is None:
        raise ConfigError(f"'{where}' of kind http needs 'sleep_url' and 'wake_url'")
    memory = values["memory"]
    return Sleep(
        kind=kind,
        sleep_url=sleep_url,
        wake_url=wake_url,
        status_url=values["status_url"] or preset[2],
        memory=memory,
        device=values["device"] or ("ram" if memory is not None else None),
        timeout=values["timeout"],
    )


@attrs.frozen
class Remote:
    """An always-on endpoint: its OpenAI base URL, and where its key is."""

    url: str
    key_env: str | None = None
    upstream: bool = REMOTE["upstream"].default  # /upstream/ may reach its inference routes

    def authorization(self) -> bytes | None:
        """The ``Authorization`` header it gets (read at each request: a rotated key applies)."""
        key = os.environ.get(self.key_env) if self.key_env else None
        return f"Bearer {key}".encode() if key else None


@attrs.frozen
class ModelConfig:
    """One model: how to reach its OpenAI-compatible server and how to start and stop it."""

    name: str
    backend_url: str
    health_url: str
    startup_timeout: float = MODEL["startup_timeout"].default
    stop_timeout: float = MODEL["stop_timeout"].default
    container_name: str | None = None
    cmd: tuple[str, ...] | None = None
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: str | None = None
    concurrency: int = MODEL["concurrency"].default
    ttl: float | None = None
    max_wait_before_swap: float = GLOBAL["max_wait_before_swap"].default
    drain_timeout: float = GLOBAL["request_timeout"].default
    device: str = IMPLICIT_DEVICE
    # Bytes on ``device``; None means the whole device.
    memory: int | None = None
    # ``memory`` is the GGUF estimate (``memory: auto``), not a figure the user wrote.
    memory_auto: bool = False
    # What llama-server will take by its GGUF (llmswap.config.estimate); None: not a llama-server
    # command, or its GGUF cannot be read.
    estimated: int | None = None
    info: ModelInfo = ModelInfo()
    sleep: Sleep | None = None
    # Weight files to read ahead; None: found in ``cmd`` (see llmswap.swap.prefetch).
    files: tuple[str, ...] | None = None
    prefetch: bool = MODEL["prefetch"].default
    aliases: tuple[str, ...] = ()
    # Alias -> its own request filters (a variant: one backend, another preset).
    presets: Mapping[str, Preset] = attrs.field(factory=dict)
    unlisted: bool = MODEL["unlisted"].default
    use_model_name: str | None = None
    strip_params: tuple[str, ...] = ()
    set_params: Mapping[str, Any] = attrs.field(factory=dict)
    loading_status: str = GLOBAL["loading_status"].default
    # What ``${PORT}`` is for this model; None: it does not use it.
    port: int | None = None
    remote: Remote | None = None
    # Where it may run; one host for each of its instances (see llmswap.config.host).
    hosts: tuple[str, ...] = (LOCAL,)

    @property
    def host(self) -> str:
        """The host of an instance (of a model that may run on several: the first)."""
        return self.hosts[0]

    def authorization(self) -> bytes | None:
        """The ``Authorization`` header its backend gets instead of the client's, if any."""
        return self.remote.authorization() if self.remote is not None else None

    @property
    def rewrites(self) -> bool:
        """Whether request bodies are rewritten for its backend (else passed as received)."""
        return bool(self.use_model_name or self.strip_params or self.set_params)

    @property
    def kind(self) -> str:
        if self.remote is not None:
            return "remote"
        return "docker" if self.container_name is not None else "process"


def server_root(backend_url: str) -> str:
    """The server's own root: llama-server, vLLM and SGLang answer ``/health``, ``/sleep``...
    beside ``/v1``."""
    parts = urlsplit(backend_url)
    path = parts.path.rstrip("/").removesuffix("/v1")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def derive_health_url(backend_url: str) -> str:
    return server_root(backend_url) + "/health"


def expanded(name: str, raw: Any, defined: Mapping[str, str]) -> dict[str, Any]:
    """A model's settings with its macros expanded, but for ``${PORT}`` and ``${MODEL_ID}``."""
    where = f"models.{name}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{where}' must be a mapping of settings, got {raw!r}")
    MODEL.check_keys(raw, where)
    own = macros.define(raw.get("macros"), f"{where}.macros", defined)
    out = dict(raw)
    for key in macros.EXPANDED:
        if key in raw:
            out[key] = macros.expand_all(raw[key], own, f"{where}.{key}")
    if out.get("backend_url") is None and macros.uses(out.get("cmd"), macros.PORT):
        out["backend_url"] = "http://127.0.0.1:${PORT}/v1"
    return out


def model(
    name: str,
    raw: dict[str, Any],
    defaults: Mapping[str, Any],
    port: int | None,
    host: str = LOCAL,
    address: str = "127.0.0.1",
) -> ModelConfig:
    """One model's settings on ``host`` (whose ``address`` is its ``${HOST}``)."""
    where = f"models.{name}"
    fixed = {macros.MODEL_ID: name, macros.HOST: address}
    if port is not None:
        fixed[macros.PORT] = str(port)
    for key in macros.EXPANDED:
        if key in raw:
            raw[key] = macros.expand_all(raw[key], fixed, f"{where}.{key}")
    remote = _remote(raw.get("remote"), f"{where}.remote")
    if remote is not None:
        local = [
            k for k in ("backend_url", "ttl", "sleep", "files", "device", "memory") if k in raw
        ]
        if local:
            raise ConfigError(
                f"'{where}.{local[0]}' does not apply to a remote model (its URL is 'remote.url'; "
                "llmswap never loads or unloads it)"
            )
        raw = {**raw, "backend_url": remote.url}
    if raw.get("backend_url") is None:
        raise ConfigError(
            f"'{where}.backend_url' is required (e.g. http://127.0.0.1:8081/v1), unless "
            "'cmd' uses ${PORT}"
        )
    backend_url = MODEL["backend_url"].read(raw, where)
    health_url = MODEL["health_url"].read(raw, where) or derive_health_url(backend_url)
    container = MODEL["container_name"].read(raw, where)
    cmd = MODEL["cmd"].read(raw, where)
    if [container, cmd, remote].count(None) != 2:
        raise ConfigError(
            f"'{where}' needs exactly one of 'container_name' (a Docker container), 'cmd' (a "
            "local process) and 'remote' (an always-on endpoint)"
        )
    if container is not None and ("env" in raw or "cwd" in raw):
        raise ConfigError(f"'{where}': 'env' and 'cwd' apply to 'cmd' models, not containers")
    auto = raw.get("memory") == "auto"
    if auto and cmd is None:
        raise ConfigError(f"'{where}.memory: auto' estimates a llama-server 'cmd' from its GGUF")
    env = MODEL["env"].read(raw, where) or {}
    try:
        estimated = estimate(cmd, env).total if auto else try_estimate(cmd, env)
    except ConfigError as e:
        raise ConfigError(f"'{where}': {e}") from None
    memory = estimated if auto else MODEL["memory"].read(raw, where)
    aliases, presets = _aliases(raw.get("aliases"), f"{where}.aliases")
    return ModelConfig(
        name=name,
        backend_url=backend_url,
        health_url=health_url,
        startup_timeout=MODEL["startup_timeout"].read(raw, where),
        stop_timeout=MODEL["stop_timeout"].read(raw, where),
        container_name=container,
        cmd=cmd,
        env=env,
        cwd=MODEL["cwd"].read(raw, where),
        concurrency=MODEL["concurrency"].read(raw, where),
        ttl=MODEL["ttl"].read(raw, where),
        max_wait_before_swap=MODEL["max_wait_before_swap"].read(
            raw, where, defaults["max_wait_before_swap"]
        ),
        drain_timeout=MODEL["drain_timeout"].read(raw, where, defaults["drain_timeout"]),
        device=MODEL["device"].read(raw, where) or IMPLICIT_DEVICE,
        memory=memory,
        memory_auto=auto,
        estimated=estimated,
        info=_info(raw.get("info"), f"{where}.info"),
        sleep=_sleep(raw.get("sleep"), f"{where}.sleep", backend_url),
        files=MODEL["files"].read(raw, where),
        prefetch=MODEL["prefetch"].read(raw, where),
        aliases=aliases,
        presets=presets,
        unlisted=MODEL["unlisted"].read(raw, where),
        use_model_name=MODEL["use_model_name"].read(raw, where),
        strip_params=_params(raw.get("strip_params"), f"{where}.strip_params"),
        set_params=_set_params(raw.get("set_params"), f"{where}.set_params"),
        loading_status=MODEL["loading_status"].read(raw, where, defaults["loading_status"]),
        port=port,
        remote=remote,
        hosts=(host,),
    )


def _remote(raw: Any, where: str) -> Remote | None:
    if raw is None:
        return None
    values = REMOTE.read_all(raw, where)
    if values["url"] is None:
        raise ConfigError(f"'{where}.url' is required (e.g. https://box2.lan:8888/v1)")
    key_env = values["key_env"]
    if key_env is not None and not os.environ.get(key_env):
        raise ConfigError(f"'{where}.key_env' names {key_env}, which is not set")
    return Remote(values["url"], key_env, values["upstream"])


def _params(raw: Any, where: str) -> tuple[str, ...]:
    """Field names; llama-swap's comma-separated string too."""
    if isinstance(raw, str):
        raw = [p.strip() for p in raw.split(",") if p.strip()]
    fields = names(raw, where)
    if "model" in fields:
        raise ConfigError(f"'{where}' cannot remove 'model': it routes the request")
    return fields


def _set_params(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        raise ConfigError(f"'{where}' must map field names to values")
    if "model" in raw:
        raise ConfigError(f"'{where}' cannot set 'model' (use 'use_model_name')")
    return dict(raw)


@attrs.frozen
class Preset:
    """An alias's own request filters, applied after its model's: a variant served by the same
    backend (llama-swap's ``setParamsByID``), so asking for it never swaps."""

    strip_params: tuple[str, ...] = ()
    set_params: Mapping[str, Any] = attrs.field(factory=dict)


def _aliases(raw: Any, where: str) -> tuple[tuple[str, ...], dict[str, Preset]]:
    """``aliases``: names, each may carry ``set_params``/``strip_params`` (a list entry
    ``{name: {...}}``, or the whole list as a mapping)."""
    if isinstance(raw, Mapping):
        raw = [{k: v} if v else k for k, v in raw.items()]
    if raw is None:
        return (), {}
    if not isinstance(raw, list):
        raise ConfigError(f"'{where}' must be a list of names (each may map to its presets)")
    found: list[str] = []
    presets: dict[str, Preset] = {}
    for i, entry in enumerate(raw):
        here = f"{where}[{i}]"
        if isinstance(entry, Mapping):
            if len(entry) != 1:
                raise ConfigError(f"'{here}' must be a name, or one name mapped to its presets")
            [(name, spec)] = entry.items()
            name = text(name, here, "a non-empty name")
            if not isinstance(spec, Mapping) or set(spec) - {"set_params", "strip_params"}:
                raise ConfigError(
                    f"'{here}.{name}' may only have set_params and strip_params, got {spec!r}"
                )
            presets[name] = Preset(
                _params(spec.get("strip_params"), f"{here}.{name}.strip_params"),
                _set_params(spec.get("set_params"), f"{here}.{name}.set_params"),
            )
        else:
            name = text(entry, here, "a non-empty name")
        if name in found:
            raise ConfigError(f"'{where}' names '{name}' twice")
        found.append(name)
    return tuple(found), presets


def model_aliases(models: Mapping[str, ModelConfig]) -> dict[str, str]:
    """Alias -> model; a name used twice is an error naming both places."""
    where: dict[str, str] = {name: f"models.{name}" for name in models}
    aliases: dict[str, str] = {}
    for name, m in models.items():
        for alias in m.aliases:
            here = f"models.{name}.aliases"
            if alias in where:
                raise ConfigError(f"'{here}' names '{alias}', which is already '{where[alias]}'")
            where[alias] = f"{here}"
            aliases[alias] = name
    return aliases
