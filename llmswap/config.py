"""Configuration: load and validate ``llmswap.yaml`` into immutable attrs classes.

A file written for the original proxy (top-level ``queue_size`` and ``request_timeout``; per model
``container_name``, ``backend_url``, ``health_url``, ``startup_timeout``) loads unchanged.  Every
key is declared once in :mod:`llmswap.schema` (type, default, unit, help), which checks it: a typo
is an error naming the key's full path and the closest valid spelling, because a silently
ignored ``startup_timout`` costs a user a 180 s mystery.  This module knows how the settings fit
together (models that fit their devices, ``${PORT}``s, a name used twice...); one model's own
settings are :mod:`llmswap.modelconfig`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml

from llmswap import macros
from llmswap.keys import Auth, parse_auth
from llmswap.modelconfig import (
    IMPLICIT_DEVICE,
    ModelConfig,
    ModelInfo,
    Sleep,
    derive_health_url,
    expanded,
    model,
    model_aliases,
    server_root,
)
from llmswap.schema import CONSOLE, DEVICE, DOCKER, DOCKER_TLS, GLOBAL
from llmswap.values import ConfigError, known_model, size

__all__ = [
    "IMPLICIT_DEVICE", "Config", "ConfigError", "ModelConfig", "ModelInfo", "Sleep",
    "derive_health_url", "load", "parse", "server_root",
]  # fmt: skip
G = GLOBAL
REMOTE_DEVICE = "remote"


@attrs.frozen
class DockerTLS:
    """Client certificates for an engine that verifies them (``dockerd --tlsverify``)."""

    ca: str
    cert: str
    key: str


@attrs.frozen
class DockerEngine:
    """Where the Docker engine is: ``None`` means ``DOCKER_HOST`` or the local socket."""

    base_url: str | None = DOCKER["base_url"].default
    timeout: float = DOCKER["timeout"].default
    stop_on_exit: bool = DOCKER["stop_on_exit"].default
    tls: DockerTLS | None = None
    insecure: bool = DOCKER["insecure"].default


def _docker(raw: Any) -> DockerEngine:
    values = DOCKER.read_all(raw, "docker")
    tls = values.pop("tls")
    if tls is not None:
        files = DOCKER_TLS.read_all(tls, "docker.tls")
        for key, path in files.items():
            if path is None or not os.path.isfile(path):
                raise ConfigError(f"'docker.tls.{key}' must name a PEM file, got {path!r}")
        tls = DockerTLS(**files)
    engine = DockerEngine(tls=tls, **values)
    url = urlsplit(engine.base_url or "")
    if url.scheme == "tcp" and tls is None and not engine.insecure:
        if url.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(
                f"'docker.base_url' {engine.base_url} is plain TCP to another box: that socket "
                "is root there, for anyone who reaches it. Give 'docker.tls' (the engine "
                "started with --tlsverify), use ssh://, or set 'docker.insecure: true'"
            )
    return engine


@attrs.frozen
class Console:
    """The web console: who may use it without keys, and how much it remembers."""

    open: bool = CONSOLE["open"].default
    activity: int = CONSOLE["activity"].default
    history: str | None = None
    history_days: float = CONSOLE["history_days"].default
    log_lines: int = CONSOLE["log_lines"].default


@attrs.frozen
class Config:
    models: Mapping[str, ModelConfig]
    listen: str = G["listen"].default
    queue_size: int = G["queue_size"].default
    request_timeout: float = G["request_timeout"].default
    health_interval: float = G["health_interval"].default
    max_body_bytes: int = G["max_body_bytes"].default
    max_upload_bytes: int = G["max_upload_bytes"].default
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
    start_port: int = G["start_port"].default
    list_aliases: bool = G["list_aliases"].default
    loading_status: str = G["loading_status"].default
    # Alias -> the model it names.
    aliases: Mapping[str, str] = attrs.field(factory=dict)
    source: str = "<built-in>"

    def resolve(self, name: str) -> str | None:
        """The model a request's ``name`` (a model's or an alias) means; None: no such."""
        return name if name in self.models else self.aliases.get(name)

    @property
    def ports(self) -> dict[str, int]:
        """Each model's ``${PORT}``, for the next reload to keep."""
        return {n: m.port for n, m in self.models.items() if m.port is not None}

    def footprint(self, model: str) -> tuple[str, float]:
        """The device a model occupies and the share of it, for the scheduler."""
        m = self.models[model]
        if m.remote is not None:  # none of ours: a device of its own that never fills
            return REMOTE_DEVICE, 0.0
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
        out = {name: float(size) for name, size in self.devices.items()}
        if not self.devices:
            out = {IMPLICIT_DEVICE: 1.0}
        if any(m.remote is not None for m in self.models.values()):
            out[REMOTE_DEVICE] = float("inf")
        return out


def parse(
    data: Any, source: str = "<string>", previous_ports: Mapping[str, int] | None = None
) -> Config:
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
        "loading_status": G["loading_status"].read(data, ""),
    }
    # ${PORT} and ${MODEL_ID} stay until each model's port is known.
    later = {macros.PORT: "${PORT}", macros.MODEL_ID: "${MODEL_ID}"}
    defined = macros.define(data.get("macros"), "macros", later)
    expanded_models: dict[str, dict[str, Any]] = {}
    for name, raw in models_raw.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"model names must be non-empty strings, got {name!r}")
        expanded_models[name] = expanded(name, raw, defined)
    start_port = G["start_port"].read(data, "")
    wanting = [n for n, raw in expanded_models.items()
               if any(macros.uses(raw.get(k), macros.PORT) for k in macros.EXPANDED)]  # fmt: skip
    ports = macros.assign_ports(wanting, start_port, previous_ports or {})
    models = {n: model(n, raw, defaults, ports.get(n)) for n, raw in expanded_models.items()}
    devices = _devices(data.get("devices"), models)
    preload = _preload(data.get("preload"), models)

    config = Config(
        models=models,
        listen=G["listen"].read(data, ""),
        queue_size=G["queue_size"].read(data, ""),
        request_timeout=request_timeout,
        health_interval=G["health_interval"].read(data, ""),
        max_body_bytes=G["max_body_bytes"].read(data, ""),
        max_upload_bytes=G["max_upload_bytes"].read(data, ""),
        log_dir=G["log_dir"].read(data, ""),
        docker=_docker(data.get("docker")),
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
        start_port=start_port,
        list_aliases=G["list_aliases"].read(data, ""),
        loading_status=defaults["loading_status"],
        aliases=model_aliases(models),
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
        if m.remote is not None:
            continue
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


def load(path: str | os.PathLike[str], previous_ports: Mapping[str, int] | None = None) -> Config:
    """Read and validate a YAML file; every failure is a ConfigError with a readable message.

    ``previous_ports``: the running configuration's ``${PORT}``s, which a reload keeps."""
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
        return parse(data, source=str(p), previous_ports=previous_ports)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
