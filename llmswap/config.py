"""Configuration: load and validate ``llmswap.yaml`` into immutable attrs classes.

A file written for the original proxy (top-level ``queue_size`` and ``request_timeout``; per model
``container_name``, ``backend_url``, ``health_url``, ``startup_timeout``) loads unchanged.  Every
key is checked: a typo is an error naming the key's full path and the closest valid spelling,
because a silently ignored ``startup_timout`` costs a user a 180 s mystery.
"""

from __future__ import annotations

import difflib
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import yaml

from llmswap.scheduler import POLICIES, SWAP_AWARE

DEFAULT_LISTEN = "tcp:8888"
# The device every model occupies in full when no devices are declared: one model at a time.
IMPLICIT_DEVICE = "default"
_UNITS = {
    "": 2**30,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
}


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@attrs.frozen
class DockerEngine:
    """Where the Docker engine is: ``None`` means ``DOCKER_HOST`` or the local socket."""

    base_url: str | None = None
    timeout: float = 60.0
    stop_on_exit: bool = False


@attrs.frozen
class APIKey:
    """A client's key: who it is (``name``, what logs show), what it may do, its limits."""

    name: str
    secret: str = attrs.field(repr=False)
    models: frozenset[str] | None = None
    priority: int = 0
    rpm: int | None = None
    max_concurrent: int | None = None
    admin: bool = False


@attrs.frozen
class Auth:
    keys: tuple[APIKey, ...]
    # /health and /metrics answer without a key (monitoring, load balancers).
    open_health: bool = True


@attrs.frozen
class ModelConfig:
    """One model: how to reach its OpenAI-compatible server and how to start and stop it."""

    name: str
    backend_url: str
    health_url: str
    startup_timeout: float = 180.0
    stop_timeout: float = 10.0
    container_name: str | None = None
    cmd: tuple[str, ...] | None = None
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: str | None = None
    concurrency: int = 1
    ttl: float | None = None
    max_wait_before_swap: float = 60.0
    drain_timeout: float = 600.0
    device: str = IMPLICIT_DEVICE
    # Bytes on ``device``; None means the whole device.
    memory: int | None = None

    @property
    def kind(self) -> str:
        return "docker" if self.container_name is not None else "process"


@attrs.frozen
class Config:
    models: Mapping[str, ModelConfig]
    listen: str = DEFAULT_LISTEN
    queue_size: int = 50
    request_timeout: float = 600.0
    health_interval: float = 0.01
    max_body_bytes: int = 16 * 1024 * 1024
    log_dir: str | None = None
    docker: DockerEngine = DockerEngine()
    scheduler: str = SWAP_AWARE
    priority_header: str | None = None
    keepalive_interval: float = 5.0
    linger: float = 2.0
    preload: tuple[str, ...] = ()
    # Device name -> memory budget in bytes; empty means one implicit device, one model.
    devices: Mapping[str, int] = attrs.field(factory=dict)
    auth: Auth | None = None
    access_log: bool = True
    source: str = "<built-in>"

    def footprint(self, model: str) -> tuple[str, float]:
        """The device a model occupies and the share of it, for the scheduler."""
        m = self.models[model]
        if not self.devices:
            return IMPLICIT_DEVICE, 1.0
        return m.device, float(m.memory if m.memory is not None else self.devices[m.device])

    def capacities(self) -> dict[str, float]:
        if not self.devices:
            return {IMPLICIT_DEVICE: 1.0}
        return {name: float(size) for name, size in self.devices.items()}


_GLOBAL_KEYS = (
    "models",
    "listen",
    "queue_size",
    "request_timeout",
    "health_interval",
    "max_body_bytes",
    "log_dir",
    "docker",
    "scheduler",
    "max_wait_before_swap",
    "drain_timeout",
    "priority_header",
    "keepalive_interval",
    "linger",
    "preload",
    "devices",
    "auth",
    "access_log",
)
_MODEL_KEYS = (
    "backend_url",
    "health_url",
    "startup_timeout",
    "stop_timeout",
    "container_name",
    "cmd",
    "env",
    "cwd",
    "concurrency",
    "ttl",
    "max_wait_before_swap",
    "drain_timeout",
    "device",
    "memory",
)
_DOCKER_KEYS = ("base_url", "timeout", "stop_on_exit")


def _check_keys(mapping: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{path}'{hint}; valid keys here: {', '.join(allowed)}")


def _number(
    mapping: Mapping[str, Any],
    key: str,
    where: str,
    default: float,
    *,
    minimum: float = 0.0,
    integer: bool = False,
) -> Any:
    value = mapping.get(key, default)
    path = f"{where}.{key}" if where else key
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"'{path}' must be a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"'{path}' must be a whole number, got {value!r}")
    if value <= minimum:
        raise ConfigError(f"'{path}' must be greater than {minimum:g}, got {value!r}")
    return value


def _flag(mapping: Mapping[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = mapping.get(key, default)
    if not isinstance(value, bool):
        path = f"{where}.{key}" if where else key
        raise ConfigError(f"'{path}' must be true or false, got {value!r}")
    return value


def _string(mapping: Mapping[str, Any], key: str, where: str) -> str | None:
    value = mapping.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"'{where}.{key}' must be a non-empty string, got {value!r}")
    return value


def _size(value: Any, path: str) -> int:
    """A memory size: ``24GiB``, ``8000MiB``, ``16GB``; a bare number is GiB."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number, unit = float(value), ""
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits) :]
        try:
            number = float(digits)
        except ValueError:
            number, unit = -1.0, unit
    else:
        number, unit = -1.0, ""
    if number <= 0 or unit not in _UNITS:
        raise ConfigError(
            f"'{path}' must be a memory size like 24GiB, 8000MiB or 16GB, got {value!r}"
        )
    return int(number * _UNITS[unit])


def _url(value: str, path: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"'{path}' must be an http(s) URL like http://127.0.0.1:8081/v1, got {value!r}"
        )
    return value.rstrip("/")


def derive_health_url(backend_url: str) -> str:
    """llama-server, vLLM and most OpenAI servers answer ``/health`` beside ``/v1``."""
    parts = urlsplit(backend_url)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit((parts.scheme, parts.netloc, path + "/health", "", ""))


def _model(name: str, raw: Any, defaults: Mapping[str, Any]) -> ModelConfig:
    where = f"models.{name}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{where}' must be a mapping of settings, got {raw!r}")
    _check_keys(raw, _MODEL_KEYS, where)
    backend_url = _string(raw, "backend_url", where)
    if backend_url is None:
        raise ConfigError(f"'{where}.backend_url' is required (e.g. http://127.0.0.1:8081/v1)")
    backend_url = _url(backend_url, f"{where}.backend_url")
    health = _string(raw, "health_url", where)
    health_url = _url(health, f"{where}.health_url") if health else derive_health_url(backend_url)

    container = _string(raw, "container_name", where)
    cmd_raw = raw.get("cmd")
    cmd: tuple[str, ...] | None = None
    if cmd_raw is not None:
        if isinstance(cmd_raw, str):
            cmd = tuple(shlex.split(cmd_raw))
        elif isinstance(cmd_raw, list) and all(isinstance(a, str | int | float) for a in cmd_raw):
            cmd = tuple(str(a) for a in cmd_raw)
        else:
            raise ConfigError(f"'{where}.cmd' must be a command string or a list of arguments")
        if not cmd:
            raise ConfigError(f"'{where}.cmd' is empty")
    if (container is None) == (cmd is None):
        raise ConfigError(
            f"'{where}' needs exactly one of 'container_name' (a Docker container) "
            "or 'cmd' (a local process)"
        )
    env_raw = raw.get("env", {}) or {}
    if not isinstance(env_raw, Mapping):
        raise ConfigError(f"'{where}.env' must be a mapping of NAME: value")
    if container is not None and ("env" in raw or "cwd" in raw):
        raise ConfigError(f"'{where}': 'env' and 'cwd' apply to 'cmd' models, not containers")
    ttl = raw.get("ttl")
    memory = raw.get("memory")
    return ModelConfig(
        name=name,
        backend_url=backend_url,
        health_url=health_url,
        startup_timeout=float(_number(raw, "startup_timeout", where, 180.0)),
        stop_timeout=float(_number(raw, "stop_timeout", where, 10.0)),
        container_name=container,
        cmd=cmd,
        env={str(k): str(v) for k, v in env_raw.items()},
        cwd=_string(raw, "cwd", where),
        concurrency=_number(raw, "concurrency", where, 1, integer=True),
        ttl=None if ttl is None else float(_number(raw, "ttl", where, 0)),
        max_wait_before_swap=float(
            _number(raw, "max_wait_before_swap", where, defaults["max_wait_before_swap"])
        ),
        drain_timeout=float(_number(raw, "drain_timeout", where, defaults["drain_timeout"])),
        device=_string(raw, "device", where) or IMPLICIT_DEVICE,
        memory=None if memory is None else _size(memory, f"{where}.memory"),
    )


def parse(data: Any, source: str = "<string>") -> Config:
    """Validate an already-parsed YAML document."""
    if not isinstance(data, Mapping):
        raise ConfigError("the configuration must be a mapping with a 'models' key")
    _check_keys(data, _GLOBAL_KEYS, "")
    models_raw = data.get("models")
    if not isinstance(models_raw, Mapping) or not models_raw:
        raise ConfigError("'models' must map at least one model name to its settings")
    request_timeout = float(_number(data, "request_timeout", "", 600.0))
    defaults = {
        "max_wait_before_swap": float(_number(data, "max_wait_before_swap", "", 60.0)),
        "drain_timeout": float(_number(data, "drain_timeout", "", request_timeout)),
    }
    models: dict[str, ModelConfig] = {}
    for name, raw in models_raw.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"model names must be non-empty strings, got {name!r}")
        models[name] = _model(name, raw, defaults)
    devices = _devices(data.get("devices"), models)
    preload = _preload(data.get("preload"), models)
    policy = data.get("scheduler", SWAP_AWARE)
    if policy not in POLICIES:
        raise ConfigError(f"'scheduler' must be one of {', '.join(POLICIES)}, got {policy!r}")

    docker_raw = data.get("docker", {}) or {}
    if not isinstance(docker_raw, Mapping):
        raise ConfigError("'docker' must be a mapping (base_url, timeout)")
    _check_keys(docker_raw, _DOCKER_KEYS, "docker")
    listen = data.get("listen", DEFAULT_LISTEN)
    if not isinstance(listen, str) or not listen:
        raise ConfigError(f"'listen' must be a strports endpoint like tcp:8888, got {listen!r}")
    log_dir = data.get("log_dir")
    if log_dir is not None and not isinstance(log_dir, str):
        raise ConfigError(f"'log_dir' must be a directory path, got {log_dir!r}")
    config = Config(
        models=models,
        listen=listen,
        queue_size=_number(data, "queue_size", "", 50, integer=True),
        request_timeout=request_timeout,
        health_interval=float(_number(data, "health_interval", "", 0.01)),
        max_body_bytes=_number(data, "max_body_bytes", "", 16 * 1024 * 1024, integer=True),
        log_dir=log_dir,
        docker=DockerEngine(
            base_url=_string(docker_raw, "base_url", "docker"),
            timeout=float(_number(docker_raw, "timeout", "docker", 60.0)),
            stop_on_exit=_flag(docker_raw, "stop_on_exit", "docker"),
        ),
        scheduler=policy,
        priority_header=_string(data, "priority_header", ""),
        keepalive_interval=float(_number(data, "keepalive_interval", "", 5.0)),
        linger=float(_number(data, "linger", "", 2.0, minimum=-1e-9)),
        preload=preload,
        devices=devices,
        auth=_auth(data.get("auth"), models),
        access_log=_flag(data, "access_log", "", default=True),
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
        return {}
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("'devices' must map device names to {memory: SIZE}")
    devices: dict[str, int] = {}
    for name, spec in raw.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"'devices.{name}' must be a mapping like {{memory: 24GiB}}")
        _check_keys(spec, ("memory",), f"devices.{name}")
        if "memory" not in spec:
            raise ConfigError(f"'devices.{name}.memory' is required (e.g. 24GiB)")
        devices[str(name)] = _size(spec["memory"], f"devices.{name}.memory")
    only = next(iter(devices)) if len(devices) == 1 else None
    for name, m in list(models.items()):
        device = m.device
        if device == IMPLICIT_DEVICE:
            if only is None:
                raise ConfigError(
                    f"'models.{name}.device' is required when several devices are declared "
                    f"({', '.join(devices)})"
                )
            device = only
        if device not in devices:
            raise ConfigError(
                f"'models.{name}.device' names unknown device {device!r}; "
                f"declared: {', '.join(devices)}"
            )
        if m.memory is not None and m.memory > devices[device]:
            raise ConfigError(
                f"'models.{name}.memory' ({m.memory / 2**30:.1f} GiB) exceeds device "
                f"'{device}' ({devices[device] / 2**30:.1f} GiB): it can never be loaded"
            )
        models[name] = attrs.evolve(m, device=device)
    return devices


def _known_model(name: str, models: Mapping[str, ModelConfig], where: str) -> None:
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"'{where}' names unknown model {name!r}{hint}")


def _preload(raw: Any, models: Mapping[str, ModelConfig]) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise ConfigError("'preload' must be a list of model names")
    for name in raw:
        _known_model(name, models, "preload")
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


_KEY_KEYS = (
    "name",
    "key",
    "key_env",
    "key_file",
    "models",
    "priority",
    "rpm",
    "max_concurrent",
    "admin",
)
_EXAMPLE_KEYS = (
    "sk-1234",
    "changeme",
    "change-me",
    "password",
    "secret",
    "example",
    "your-api-key",
    "your_api_key",
    "xxxx",
    "sk-xxx",
    "test",
    "unused",
)
_GENERATE = (
    "generate one with: python3 -c 'import secrets; print(\"sk-\" + secrets.token_urlsafe(32))'"
)


def _secret(raw: Mapping[str, Any], where: str) -> str:
    sources = [k for k in ("key", "key_env", "key_file") if k in raw]
    if len(sources) != 1:
        raise ConfigError(f"'{where}' needs exactly one of 'key', 'key_env' or 'key_file'")
    source = sources[0]
    value = raw[source]
    if not isinstance(value, str):
        raise ConfigError(f"'{where}.{source}' must be a string")
    if source == "key_env":
        secret = os.environ.get(value, "")
        origin = f"environment variable {value}"
    elif source == "key_file":
        try:
            secret = Path(value).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"'{where}.key_file': cannot read {value}: {e.strerror}") from None
        origin = f"file {value}"
    else:
        secret, origin = value, "the configuration"
    secret = secret.strip()
    lowered = secret.lower()
    if not secret:
        raise ConfigError(f"'{where}': the key from {origin} is empty; {_GENERATE}")
    if len(secret) < 16 or any(example in lowered for example in _EXAMPLE_KEYS):
        raise ConfigError(
            f"'{where}': the key from {origin} is too short or a well-known example value; "
            + _GENERATE
        )
    return secret


def _auth(raw: Any, models: Mapping[str, ModelConfig]) -> Auth | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("'auth' must be a mapping with 'keys'")
    _check_keys(raw, ("keys", "open_health"), "auth")
    keys_raw = raw.get("keys")
    if not isinstance(keys_raw, list) or not keys_raw:
        raise ConfigError("'auth.keys' must list at least one key ({name: ..., key_env: ...})")
    keys: list[APIKey] = []
    for i, entry in enumerate(keys_raw):
        where = f"auth.keys[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"'{where}' must be a mapping with 'name' and a key source")
        _check_keys(entry, _KEY_KEYS, where)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"'{where}.name' is required (what logs show instead of the key)")
        where = f"auth.keys[{name}]"
        allowed = entry.get("models")
        if allowed is not None:
            if not isinstance(allowed, list) or not all(isinstance(m, str) for m in allowed):
                raise ConfigError(f"'{where}.models' must be a list of model names")
            for m in allowed:
                _known_model(m, models, f"{where}.models")
        priority = entry.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(f"'{where}.priority' must be a whole number, got {priority!r}")
        rpm = entry.get("rpm")
        concurrent = entry.get("max_concurrent")
        keys.append(
            APIKey(
                name=name,
                secret=_secret(entry, where),
                models=None if allowed is None else frozenset(allowed),
                priority=priority,
                rpm=None if rpm is None else _number(entry, "rpm", where, 0, integer=True),
                max_concurrent=None
                if concurrent is None
                else _number(entry, "max_concurrent", where, 0, integer=True),
                admin=_flag(entry, "admin", where),
            )
        )
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise ConfigError("'auth.keys': every key needs its own name")
    if len({k.secret for k in keys}) != len(keys):
        raise ConfigError("'auth.keys': two entries have the same key")
    open_health = raw.get("open_health", True)
    if not isinstance(open_health, bool):
        raise ConfigError(f"'auth.open_health' must be true or false, got {open_health!r}")
    return Auth(tuple(keys), open_health)


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
