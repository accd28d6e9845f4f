"""Configuration: load and validate ``llmswap.yaml`` into immutable attrs classes.

A file written for the original proxy (top-level ``queue_size`` and ``request_timeout``; per model
``container_name``, ``backend_url``, ``health_url``, ``startup_timeout``) loads unchanged.  Every
key is declared once in :mod:`.schema` (type, default, unit, help), which checks it: a typo
is an error naming the key's full path and the closest valid spelling, because a silently
ignored ``startup_timout`` costs a user a 180 s mystery.  This module knows how the settings fit
together (models that fit their devices, ``${PORT}``s, a name used twice...); one model's own
settings are :mod:`llmswap.config.model`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from llmswap.config import macros
from llmswap.config.devices import budgets
from llmswap.config.host import (
    IMPLICIT_DEVICE,
    LOCAL,
    DockerEngine,
    Host,
    Probed,
    placement,
    read_hosts,
)
from llmswap.config.include import joined, read_yaml
from llmswap.config.keys import Auth, parse_auth
from llmswap.config.model import (
    ModelConfig,
    Preset,
    expanded,
    model,
    model_aliases,
)
from llmswap.config.pools import Pool, read_pools
from llmswap.config.settings import CONSOLE, GLOBAL
from llmswap.config.values import ConfigError, known_model, names

REMOTE_DEVICE = "remote"
# What the Docker SDK reads from the environment (docker.from_env), and systemd's directory of
# credentials (where key files may live).
DOCKER_ENV = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_CONFIG",
              "DOCKER_CONTEXT", "CREDENTIALS_DIRECTORY")  # fmt: skip


@attrs.frozen
class Console:
    """The web console: who may use it without keys, and how much it remembers."""

    open: bool = CONSOLE["open"].default
    hosts: tuple[str, ...] = ()
    unix_is_loopback: bool = CONSOLE["unix_is_loopback"].default
    activity: int = CONSOLE["activity"].default
    history: str | None = None
    history_days: float = CONSOLE["history_days"].default
    log_lines: int = CONSOLE["log_lines"].default
    failures: int = CONSOLE["failures"].default
    edit_config: str = CONSOLE["edit_config"].default


@attrs.frozen
class Config:
    models: Mapping[str, ModelConfig]
    listen: str = GLOBAL["listen"].default
    queue_size: int = GLOBAL["queue_size"].default
    request_timeout: float = GLOBAL["request_timeout"].default
    health_interval: float = GLOBAL["health_interval"].default
    max_body_bytes: int = GLOBAL["max_body_bytes"].default
    max_upload_bytes: int = GLOBAL["max_upload_bytes"].default
    idle_timeout: float = GLOBAL["idle_timeout"].default
    max_connections: int = GLOBAL["max_connections"].default
    pass_env: tuple[str, ...] = ()
    log_dir: str | None = None
    state_dir: str | None = None
    console: Console = Console()
    scheduler: str = GLOBAL["scheduler"].default
    priority_header: str | None = None
    keepalive_interval: float = GLOBAL["keepalive_interval"].default
    linger: float = GLOBAL["linger"].default
    linger_bound: bool = GLOBAL["linger_bound"].default
    preload: tuple[str, ...] = ()
    auth: Auth | None = None
    access_log: bool = GLOBAL["access_log"].default
    prefetch_reserve: int = GLOBAL["prefetch_reserve"].default
    start_port: int = GLOBAL["start_port"].default
    list_aliases: bool = GLOBAL["list_aliases"].default
    loading_status: str = GLOBAL["loading_status"].default
    # Alias -> the model it names.
    aliases: Mapping[str, str] = attrs.field(factory=dict)
    pools: Mapping[str, Pool] = attrs.field(factory=dict)
    watch_config: bool = GLOBAL["watch_config"].default
    source: str = "<built-in>"
    # The files ``include:`` read (``source`` aside), and its patterns as absolute paths: a
    # change to any file they match is a change of the configuration.
    included: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    # This machine (``local``: the top-level ``docker`` and ``devices``) and the boxes of
    # ``hosts:``.
    hosts: Mapping[str, Host] = attrs.field(factory=lambda: {LOCAL: Host(LOCAL)})
    # What the swap manager runs, by slot name: each model, or of a model that may run on
    # several hosts, one instance per host (``gemma@box2``), its URLs and devices that host's.
    instances: Mapping[str, ModelConfig] = attrs.field(
        default=attrs.Factory(lambda c: dict(c.models), takes_self=True)
    )
    # Model -> its instances' names.
    placements: Mapping[str, tuple[str, ...]] = attrs.field(
        default=attrs.Factory(lambda c: {n: (n,) for n in c.models}, takes_self=True)
    )

    @property
    def docker(self) -> DockerEngine:
        """This machine's engine."""
        return self.hosts[LOCAL].docker

    @property
    def devices(self) -> Mapping[str, int]:
        """This machine's device budgets in bytes; empty: one implicit device, one model."""
        return self.hosts[LOCAL].devices

    def resolve(self, name: str) -> str | None:
        """The model a request's ``name`` (a model's or an alias) means; None: no such (a
        pool's name means one of its members: the swap manager chooses)."""
        return name if name in self.models else self.aliases.get(name)

    def known(self, name: str) -> str | None:
        """``name`` if a request may ask for it (a model, an alias or a pool), else None."""
        return name if name in self.models or name in self.aliases or name in self.pools else None

    def preset(self, model: str, name: str) -> Preset | None:
        """The filters of the alias ``name`` of ``model`` (a variant), if it has any."""
        return self.models[model].presets.get(name) if name != model else None

    @property
    def hidden_env(self) -> frozenset[str]:
        """Variables of llmswap's environment that hold its secrets or steer its engines:
        backends do not inherit them, unless ``pass_env`` names them."""
        names = set(DOCKER_ENV)
        if self.auth is not None:
            names.update(k.env for k in self.auth.keys if k.env)
        for m in self.models.values():
            if m.remote is not None and m.remote.key_env:
                names.add(m.remote.key_env)
        return frozenset(names - set(self.pass_env))

    @property
    def from_file(self) -> bool:
        """Whether it was read from a file (not the built-in models, nor a test's mapping)."""
        return not self.source.startswith("<")

    @property
    def ports(self) -> dict[str, int]:
        """Each model's ``${PORT}``, for the next reload to keep."""
        return {n: m.port for n, m in self.models.items() if m.port is not None}

    def footprint(self, instance: str) -> tuple[str, float]:
        """The device an instance occupies and the share of it, for the scheduler."""
        m = self.instances[instance]
        if m.remote is not None:  # none of ours: a device of its own that never fills
            return REMOTE_DEVICE, 0.0
        host = self.hosts[m.host]
        if not host.devices:
            return host.device(IMPLICIT_DEVICE), 1.0
        return m.device, float(m.memory if m.memory is not None else host.devices[m.device])

    def sleep_footprint(self, instance: str) -> tuple[str, float] | None:
        """The device and share an instance holds while asleep; None when nothing is counted."""
        sleep = self.instances[instance].sleep
        if sleep is None or sleep.memory is None or sleep.device is None:
            return None
        return sleep.device, float(sleep.memory)

    def capacities(self, host: str | None = None) -> dict[str, float]:
        """The device budgets of ``host`` (None: of every host), as the policy counts them."""
        out: dict[str, float] = {}
        for h in self.hosts.values() if host is None else (self.hosts[host],):
            out.update(h.capacities())
        if host in (None, LOCAL) and any(m.remote is not None for m in self.models.values()):
            out[REMOTE_DEVICE] = float("inf")
        return out

    def probe(self, device: str) -> Probed | None:
        """What measures ``device`` (a policy name: ``box2/gpu0``); None: it is not measured."""
        for host in self.hosts.values():
            if device in host.probes:
                return host.probes[device]
        return None

    def probed(self) -> bool:
        return any(host.probes for host in self.hosts.values())

    def state_directory(self) -> str:
        """Where what llmswap learns is kept: ``state_dir``, else the XDG state directory."""
        if self.state_dir:
            return self.state_dir
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "state"
        )
        return os.path.join(state, "llmswap")

    def declared(self) -> dict[str, int]:
        """Every declared device budget, in bytes, by the policy's names."""
        return {d: b for h in self.hosts.values() for d, b in h.devices.items()}


def parse(
    data: Any, source: str = "<string>", previous_ports: Mapping[str, int] | None = None
) -> Config:
    """Validate an already-parsed YAML document."""
    if not isinstance(data, Mapping):
        raise ConfigError("the configuration must be a mapping with a 'models' key")
    GLOBAL.check_keys(data, "")
    models_raw = data.get("models")
    if not isinstance(models_raw, Mapping) or not models_raw:
        raise ConfigError("'models' must map at least one model name to its settings")
    request_timeout = GLOBAL["request_timeout"].read(data, "")
    defaults = {
        "max_wait_before_swap": GLOBAL["max_wait_before_swap"].read(data, ""),
        "drain_timeout": GLOBAL["drain_timeout"].read(data, "", request_timeout),
        "loading_status": GLOBAL["loading_status"].read(data, ""),
    }
    # ${PORT}, ${MODEL_ID} and ${HOST} stay until each model's port and hosts are known.
    later = {m: f"${{{m}}}" for m in (macros.PORT, macros.MODEL_ID, macros.HOST)}
    defined = macros.define(data.get("macros"), "macros", later)
    expanded_models: dict[str, dict[str, Any]] = {}
    for name, raw in models_raw.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"model names must be non-empty strings, got {name!r}")
        expanded_models[name] = expanded(name, raw, defined)
    start_port = GLOBAL["start_port"].read(data, "")
    wanting = [n for n, raw in expanded_models.items()
               if any(macros.uses(raw.get(k), macros.PORT) for k in macros.EXPANDED)]  # fmt: skip
    ports = macros.assign_ports(wanting, start_port, previous_ports or {})
    hosts, models, instances, placements = _place(data, expanded_models, defaults, ports)
    preload = _preload(data.get("preload"), models)
    aliases = model_aliases(models)

    config = Config(
        models=models,
        listen=GLOBAL["listen"].read(data, ""),
        queue_size=GLOBAL["queue_size"].read(data, ""),
        request_timeout=request_timeout,
        health_interval=GLOBAL["health_interval"].read(data, ""),
        max_body_bytes=GLOBAL["max_body_bytes"].read(data, ""),
        max_upload_bytes=GLOBAL["max_upload_bytes"].read(data, ""),
        idle_timeout=GLOBAL["idle_timeout"].read(data, ""),
        max_connections=GLOBAL["max_connections"].read(data, ""),
        pass_env=names(data.get("pass_env"), "pass_env"),
        log_dir=GLOBAL["log_dir"].read(data, ""),
        state_dir=GLOBAL["state_dir"].read(data, ""),
        console=_console(data.get("console")),
        scheduler=GLOBAL["scheduler"].read(data, ""),
        priority_header=GLOBAL["priority_header"].read(data, ""),
        keepalive_interval=GLOBAL["keepalive_interval"].read(data, ""),
        linger=GLOBAL["linger"].read(data, ""),
        linger_bound=GLOBAL["linger_bound"].read(data, ""),
        preload=preload,
        auth=parse_auth(data.get("auth"), models),
        access_log=GLOBAL["access_log"].read(data, ""),
        prefetch_reserve=GLOBAL["prefetch_reserve"].read(data, ""),
        start_port=start_port,
        list_aliases=GLOBAL["list_aliases"].read(data, ""),
        loading_status=defaults["loading_status"],
        aliases=aliases,
        pools=read_pools(data.get("pools"), {**{n: n for n in models}, **aliases}),
        watch_config=GLOBAL["watch_config"].read(data, ""),
        source=source,
        hosts=hosts,
        instances=instances,
        placements=placements,
    )
    _check_preload_fits(config)
    return config


def _place(
    data: Mapping[str, Any],
    raw_models: Mapping[str, dict[str, Any]],
    defaults: Mapping[str, Any],
    ports: Mapping[str, int],
) -> tuple[
    dict[str, Host], dict[str, ModelConfig], dict[str, ModelConfig], dict[str, tuple[str, ...]]
]:
    """The hosts, the models, their instances (one per host a model runs on) and which
    instances each model has."""
    read = read_hosts(data)
    names: dict[str, tuple[str, ...]] = {}  # instance -> (model, host)
    by_host: dict[str, dict[str, ModelConfig]] = {h: {} for h in read}
    placements: dict[str, tuple[str, ...]] = {}
    for name, raw in raw_models.items():
        on = placement(raw, f"models.{name}", list(read))
        keys = (name,) if len(on) == 1 else tuple(f"{name}@{h}" for h in on)
        for key, h in zip(keys, on, strict=True):
            if key in by_host[h] or (key != name and key in raw_models):
                raise ConfigError(f"'models.{name}': its instance name {key} is a model's name")
            address = read[h][0].address
            by_host[h][key] = model(name, dict(raw), defaults, ports.get(name), h, address)
            names[key] = (name, h)
        placements[name] = keys
    hosts: dict[str, Host] = {}
    instances: dict[str, ModelConfig] = {}
    for h, (host, raw_devices) in read.items():
        hosts[h], placed = budgets(host, raw_devices, by_host[h])
        instances.update({k: attrs.evolve(m, name=k) for k, m in placed.items()})
    instances = {k: instances[k] for k in names}  # in the file's order
    models = {}
    for name, keys in placements.items():
        first = instances[keys[0]]
        models[name] = attrs.evolve(first, name=name, hosts=tuple(names[k][1] for k in keys))
    return hosts, models, instances, placements


def _console(raw: Any) -> Console:
    if isinstance(raw, Mapping) and isinstance(raw.get("edit_config"), bool):  # YAML's true/false
        raw = {**raw, "edit_config": str(raw["edit_config"]).lower()}
    values = CONSOLE.read_all(raw, "console")
    values["hosts"] = tuple(h.lower() for h in names(values["hosts"] or None, "console.hosts"))
    return Console(**values)


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
        device, memory = config.footprint(config.placements[name][0])
        free[device] -= memory
        if free[device] < 0:
            raise ConfigError(
                f"'preload' models do not fit together on device '{device}' "
                "(without 'devices' only one model can be loaded at a time)"
            )


def reload_changes(old: Config, new: Config) -> tuple[list[str], list[str], list[str]]:
    """The instances a reload removes, changes (its settings or its host's did) and adds."""
    before, after = old.instances, new.instances

    def same(name: str) -> bool:
        host = before[name].host
        return after[name] == before[name] and new.hosts[host] == old.hosts.get(host)

    removed = [n for n in before if n not in after]
    changed = [n for n in before if n in after and not same(n)]
    return removed, changed, [n for n in after if n not in before]


def load(
    path: str | os.PathLike[str],
    previous_ports: Mapping[str, int] | None = None,
    text: str | None = None,
) -> Config:
    """Read and validate a YAML file; every failure is a ConfigError with a readable message.

    ``previous_ports``: the running configuration's ``${PORT}``s, which a reload keeps;
    ``text``: the file's content to check instead of what it holds (its includes are read)."""
    source = str(path)
    data = read_yaml(source, text)
    try:
        data, included, include = joined(data, source)
        config = parse(data, source=source, previous_ports=previous_ports)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return attrs.evolve(config, included=included, include=include)
