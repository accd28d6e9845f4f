"""Configuration: load and validate ``llmswap.yaml`` into immutable attrs classes.

A file written for the original proxy (top-level ``queue_size`` and ``request_timeout``; per model
``container_name``, ``backend_url``, ``health_url``, ``startup_timeout``) loads unchanged.  Every
key is declared once in :mod:`llmswap.schema` (type, default, unit, help), which checks it: a typo
is an error naming the key's full path and the closest valid spelling, because a silently
ignored ``startup_timout`` costs a user a 180 s mystery.  This module knows how the settings fit
together (exactly one of ``cmd`` and ``container_name``, models that fit their devices...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import yaml

from llmswap.keys import Auth, parse_auth
from llmswap.schema import CONSOLE, DEVICE, DOCKER, GLOBAL, INFO, MODEL, SLEEP
from llmswap.values import ConfigError, known_model, size

__all__ = ["Config", "ConfigError", "ModelConfig", "load", "parse"]

# The device every model occupies in full when no devices are declared: one model at a time.
IMPLICIT_DEVICE = "default"
G, M = GLOBAL, MODEL


@attrs.frozen
class DockerEngine:
    """Where the Docker engine is: ``None`` means ``DOCKER_HOST`` or the local socket."""

    base_url: str | None = DOCKER["base_url"].default
    timeout: float = DOCKER["timeout"].default
    stop_on_exit: bool = DOCKER["stop_on_exit"].default


@attrs.frozen
class Console:
    """The web console: who may use it without keys, and how much it remembers."""

    open: bool = CONSOLE["open"].default
    activity: int = CONSOLE["activity"].default
    history: str | None = None
    history_days: float = CONSOLE["history_days"].default
    log_lines: int = CONSOLE["log_lines"].default


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
class ModelConfig:
    """One model: how to reach its OpenAI-compatible server and how to start and stop it."""

    name: str
    backend_url: str
    health_url: str
    startup_timeout: float = M["startup_timeout"].default
    stop_timeout: float = M["stop_timeout"].default
    container_name: str | None = None
    cmd: tuple[str, ...] | None = None
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: str | None = None
    concurrency: int = M["concurrency"].default
    ttl: float | None = None
    max_wait_before_swap: float = G["max_wait_before_swap"].default
    drain_timeout: float = G["request_timeout"].default
    device: str = IMPLICIT_DEVICE
    # Bytes on ``device``; None means the whole device.
    memory: int | None = None
    info: ModelInfo = ModelInfo()
    sleep: Sleep | None = None
    # Weight files to read ahead; None: found in ``cmd`` (see llmswap.prefetch).
    files: tuple[str, ...] | None = None
    prefetch: bool = M["prefetch"].default

    @property
    def kind(self) -> str:
        return "docker" if self.container_name is not None else "process"


@attrs.frozen
class Config:
    models: Mapping[str, ModelConfig]
    listen: str = G["listen"].default
    queue_size: int = G["queue_size"].default
    request_timeout: float = G["request_timeout"].default
    health_interval: float = G["health_interval"].default
    max_body_bytes: int = G["max_body_bytes"].default
    log_dir: str | None = None
    docker: DockerEngine = DockerEngine()
    console: Console = Console()
    scheduler: str = G["scheduler"].default
    priority_header: str | None = None
    keepalive_interval: float = G["keepalive_interval"].default
    linger: float = G["linger"].default
    linger_bound: bool = G["linger_bound"].default
    preload: tuple[str, ...] = ()
    # Device name -> memory budget in bytes; empty means one implicit device, one model.
    devices: Mapping[str, int] = attrs.field(factory=dict)
    auth: Auth | None = None
    access_log: bool = G["access_log"].default
    prefetch_reserve: int = G["prefetch_reserve"].default
    source: str = "<built-in>"

    def footprint(self, model: str) -> tuple[str, float]:
        """The device a model occupies and the share of it, for the scheduler."""
        m = self.models[model]
        if not self.devices:
            return IMPLICIT_DEVICE, 1.0
        return m.device, float(m.memory if m.memory is not None else self.devices[m.device])

    def sleep_footprint(self, model: str) -> tuple[str, float] | None:
        """The device and share a model holds while asleep; None when nothing is counted."""
        sleep = self.models[model].sleep
        if sleep is None or sleep.memory is None or sleep.device is None:
            return None
        return sleep.device, float(sleep.memory)

    def capacities(self) -> dict[str, float]:
        if not self.devices:
            return {IMPLICIT_DEVICE: 1.0}
        return {name: float(size) for name, size in self.devices.items()}


def server_root(backend_url: str) -> str:
    """The server's own root: llama-server, vLLM and SGLang answer ``/health``, ``/sleep``...
    beside ``/v1``."""
    parts = urlsplit(backend_url)
    path = parts.path.rstrip("/").removesuffix("/v1")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def derive_health_url(backend_url: str) -> str:
    return server_root(backend_url) + "/health"


def _model(name: str, raw: Any, defaults: Mapping[str, Any]) -> ModelConfig:
    where = f"models.{name}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{where}' must be a mapping of settings, got {raw!r}")
    M.check_keys(raw, where)
    if raw.get("backend_url") is None:
        raise ConfigError(f"'{where}.backend_url' is required (e.g. http://127.0.0.1:8081/v1)")
    backend_url = M["backend_url"].read(raw, where)
    health_url = M["health_url"].read(raw, where) or derive_health_url(backend_url)
    container = M["container_name"].read(raw, where)
    cmd = M["cmd"].read(raw, where)
    if (container is None) == (cmd is None):
        raise ConfigError(
            f"'{where}' needs exactly one of 'container_name' (a Docker container) "
            "or 'cmd' (a local process)"
        )
    if container is not None and ("env" in raw or "cwd" in raw):
        raise ConfigError(f"'{where}': 'env' and 'cwd' apply to 'cmd' models, not containers")
    memory = M["memory"].read(raw, where)
    return ModelConfig(
        name=name,
        backend_url=backend_url,
        health_url=health_url,
        startup_timeout=M["startup_timeout"].read(raw, where),
        stop_timeout=M["stop_timeout"].read(raw, where),
        container_name=container,
        cmd=cmd,
        env=M["env"].read(raw, where) or {},
        cwd=M["cwd"].read(raw, where),
        concurrency=M["concurrency"].read(raw, where),
        ttl=M["ttl"].read(raw, where),
        max_wait_before_swap=M["max_wait_before_swap"].read(
            raw, where, defaults["max_wait_before_swap"]
        ),
        drain_timeout=M["drain_timeout"].read(raw, where, defaults["drain_timeout"]),
        device=M["device"].read(raw, where) or IMPLICIT_DEVICE,
        memory=memory,
        info=_info(raw.get("info"), f"{where}.info"),
        sleep=_sleep(raw.get("sleep"), f"{where}.sleep", backend_url),
        files=M["files"].read(raw, where),
        prefetch=M["prefetch"].read(raw, where),
    )


def parse(data: Any, source: str = "<string>") -> Config:
    """Validate an already-parsed YAML document."""
    if not isinstance(data, Mapping):
        raise ConfigError("the configuration must be a mapping with a 'models' key")
    G.check_keys(data, "")
    models_raw = data.get("models")
    if not isinstance(models_raw, Mapping) or not models_raw:
        raise ConfigError("'models' must map at least one model name to its settings")
    request_timeout = G["request_timeout"].read(data, "")
    defaults = {
        "max_wait_before_swap": G["max_wait_before_swap"].read(data, ""),
        "drain_timeout": G["drain_timeout"].read(data, "", request_timeout),
    }
    models: dict[str, ModelConfig] = {}
    for name, raw in models_raw.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"model names must be non-empty strings, got {name!r}")
        models[name] = _model(name, raw, defaults)
    devices = _devices(data.get("devices"), models)
    preload = _preload(data.get("preload"), models)

    config = Config(
        models=models,
        listen=G["listen"].read(data, ""),
        queue_size=G["queue_size"].read(data, ""),
        request_timeout=request_timeout,
        health_interval=G["health_interval"].read(data, ""),
        max_body_bytes=G["max_body_bytes"].read(data, ""),
        log_dir=G["log_dir"].read(data, ""),
        docker=DockerEngine(**DOCKER.read_all(data.get("docker"), "docker")),
        console=Console(**CONSOLE.read_all(data.get("console"), "console")),
        scheduler=G["scheduler"].read(data, ""),
        priority_header=G["priority_header"].read(data, ""),
        keepalive_interval=G["keepalive_interval"].read(data, ""),
        linger=G["linger"].read(data, ""),
        linger_bound=G["linger_bound"].read(data, ""),
        preload=preload,
        devices=devices,
        auth=parse_auth(data.get("auth"), models),
        access_log=G["access_log"].read(data, ""),
        prefetch_reserve=G["prefetch_reserve"].read(data, ""),
        source=source,
    )
    _check_preload_fits(config)
    return config


def _devices(raw: Any, models: dict[str, ModelConfig]) -> dict[str, int]:
    """Validate memory budgets: every model must fit its device on its own."""
    if raw is None:
        for m in models.values():
            if m.memory is not None or m.device != IMPLICIT_DEVICE:
                raise ConfigError(
                    f"'models.{m.name}' declares 'memory'/'device' but no 'devices' are declared "
                    "(e.g. devices: {gpu0: {memory: 24GiB}})"
                )
            if m.sleep is not None and m.sleep.memory is not None:
                raise ConfigError(
                    f"'models.{m.name}.sleep.memory' is counted on a device, but no 'devices' "
                    "are declared (e.g. devices: {gpu0: {memory: 24GiB}, ram: {memory: 64GiB}})"
                )
        return {}
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("'devices' must map device names to {memory: SIZE}")
    devices: dict[str, int] = {}
    for name, spec in raw.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"'devices.{name}' must be a mapping like {{memory: 24GiB}}")
        DEVICE.check_keys(spec, f"devices.{name}")
        if "memory" not in spec:
            raise ConfigError(f"'devices.{name}.memory' is required (e.g. 24GiB)")
        devices[str(name)] = size(spec["memory"], f"devices.{name}.memory")
    # Devices that only count sleepers (host memory) are never a model's default device.
    sleepers = {m.sleep.device for m in models.values() if m.sleep is not None and m.sleep.device}
    runnable = [d for d in devices if d not in sleepers] or list(devices)
    only = runnable[0] if len(runnable) == 1 else None
    for name, m in list(models.items()):
        if m.sleep is not None and m.sleep.device is not None:
            _fits(f"models.{name}.sleep", m.sleep.memory, m.sleep.device, devices)
        device = m.device
        if device == IMPLICIT_DEVICE:
            if only is None:
                raise ConfigError(
                    f"'models.{name}.device' is required when several devices are declared "
                    f"({', '.join(runnable)})"
                )
            device = only
        _fits(f"models.{name}", m.memory, device, devices)
        models[name] = attrs.evolve(m, device=device)
    return devices


def _fits(where: str, memory: int | None, device: str, devices: Mapping[str, int]) -> None:
    if device not in devices:
        raise ConfigError(
            f"'{where}.device' names unknown device {device!r}; declared: {', '.join(devices)}"
        )
    if memory is not None and memory > devices[device]:
        raise ConfigError(
            f"'{where}.memory' ({memory / 2**30:.1f} GiB) exceeds device "
            f"'{device}' ({devices[device] / 2**30:.1f} GiB): it can never be loaded"
        )


def _preload(raw: Any, models: Mapping[str, ModelConfig]) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise ConfigError("'preload' must be a list of model names")
    for name in raw:
        known_model(name, models, "preload")
    return tuple(dict.fromkeys(raw))


def _check_preload_fits(config: Config) -> None:
    """The preloaded models must fit together, by the same accounting the scheduler uses."""
    free = config.capacities()
    for name in config.preload:
        device, memory = config.footprint(name)
        free[device] -= memory
        if free[device] < 0:
            raise ConfigError(
                f"'preload' models do not fit together on device '{device}' "
                "(without 'devices' only one model can be loaded at a time)"
            )


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML file; every failure is a ConfigError with a readable message."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    try:
        return parse(data, source=str(p))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
