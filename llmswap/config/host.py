"""Hosts: the boxes models run on, each a Docker engine with its own device budgets.

The top-level ``docker:`` and ``devices:`` sections are this machine, the host named ``local``
(a configuration without ``hosts:`` is exactly that one host, as before).  Each entry of
``hosts:`` is one more box: its engine (``unix://``, ``ssh://``, or ``tcp://`` with TLS client
certificates), the ``address`` that ``${HOST}`` expands to in a model's URLs, and its devices.

A device's name is the host's own (``gpu0``); the policy, which sees every host at once, knows it
as ``box2/gpu0`` so two boxes' ``gpu0`` are never one budget.  The local host's devices keep their
bare names, so ``/health`` of a one-box configuration reads as it always did.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs

from llmswap.config.settings import DOCKER, DOCKER_TLS, HOST
from llmswap.config.values import ConfigError

# This machine's host: the top-level ``docker`` and ``devices``.
LOCAL = "local"
# The device every model occupies in full when no devices are declared: one model at a time.
IMPLICIT_DEVICE = "default"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@attrs.frozen
class DockerTLS:
    """Client certificates for an engine that verifies them (``dockerd --tlsverify``)."""

    ca: str
    cert: str
    key: str


@attrs.frozen
class DockerEngine:
    """Where a host's Docker engine is: ``None`` means ``DOCKER_HOST`` or the local socket."""

    base_url: str | None = DOCKER["base_url"].default
    timeout: float = DOCKER["timeout"].default
    stop_on_exit: bool = DOCKER["stop_on_exit"].default
    tls: DockerTLS | None = None
    insecure: bool = DOCKER["insecure"].default
    host: str = LOCAL  # the host it is, named in its errors

    @property
    def where(self) -> str:
        url = self.base_url or "DOCKER_HOST or the local socket"
        return url if self.host == LOCAL else f"{url} (host {self.host})"

    @property
    def local(self) -> bool:
        """Whether it runs on this machine: its processes and files are ours."""
        return self.base_url is None or self.base_url.startswith("unix://")


@attrs.frozen
class Probed:
    """A device with a probe: what measures it, and how long a start waits for it to free."""

    probe: str
    free_timeout: float


@attrs.frozen
class Host:
    """One box: its engine, the address its servers answer on, and its device budgets (bytes,
    by the policy's qualified names)."""

    name: str
    docker: DockerEngine = DockerEngine()
    address: str = HOST["address"].default
    devices: Mapping[str, int] = attrs.field(factory=dict)
    # The devices that are measured, by the same names.
    probes: Mapping[str, Probed] = attrs.field(factory=dict)

    def device(self, name: str) -> str:
        """A device of this host as the policy knows it."""
        return name if self.name == LOCAL else f"{self.name}/{name}"

    def capacities(self) -> dict[str, float]:
        """Its budgets; without declared devices one implicit device: one model at a time."""
        if not self.devices:
            return {self.device(IMPLICIT_DEVICE): 1.0}
        return {name: float(b) for name, b in self.devices.items()}


def docker_engine(raw: Any, where: str, host: str = LOCAL) -> DockerEngine:
    values = DOCKER.read_all(raw, where)
    tls = values.pop("tls")
    if tls is not None:
        files = DOCKER_TLS.read_all(tls, f"{where}.tls")
        for key, path in files.items():
            if path is None or not os.path.isfile(path):
                raise ConfigError(f"'{where}.tls.{key}' must name a PEM file, got {path!r}")
        tls = DockerTLS(**files)
    engine = DockerEngine(tls=tls, host=host, **values)
    given = engine.base_url or os.environ.get("DOCKER_HOST", "")
    from_env = engine.base_url is None
    if not engine.insecure and tls is None and _plain_tcp(given, from_env):
        origin = f"'{where}.base_url' {given}" if not from_env else f"DOCKER_HOST {given}"
        raise ConfigError(
            f"{origin} is plain TCP to another box: that socket is root there, for anyone who "
            f"reaches it. Give '{where}.tls' (the engine started with --tlsverify), use "
            f"ssh://, or set '{where}.insecure: true'"
        )
    return engine


def _plain_tcp(address: str, from_env: bool) -> bool:
    """Whether the Docker SDK would reach ``address`` over plain TCP beyond loopback: what it
    takes for TCP (``tcp://``, ``http://``, a bare ``host:port``) without TLS."""
    if not address or address.startswith(("unix://", "npipe://", "ssh://", "https://", "/")):
        return False
    if from_env and os.environ.get("DOCKER_TLS_VERIFY"):  # docker.from_env speaks TLS then
        return False
    url = urlsplit(address if "://" in address else f"tcp://{address}")
    return url.scheme in ("tcp", "http") and url.hostname not in _LOOPBACK


def read_hosts(data: Mapping[str, Any]) -> dict[str, tuple[Host, Any]]:
    """Every host with its devices not yet read: this machine first, then ``hosts:``."""
    out = {LOCAL: (Host(LOCAL, docker_engine(data.get("docker"), "docker")), data.get("devices"))}
    raw = data.get("hosts")
    if raw is None:
        return out
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("'hosts' must map host names to {docker: {...}, address, devices}")
    for name, spec in raw.items():
        where = f"hosts.{name}"
        if not isinstance(name, str) or not name or "/" in name or "@" in name:
            raise ConfigError(f"host names are non-empty strings without '/' or '@', got {name!r}")
        if name == LOCAL:
            raise ConfigError(
                f"'{where}': '{LOCAL}' is this machine, set by the top-level 'docker' and "
                "'devices'; name the host otherwise"
            )
        if not isinstance(spec, Mapping):
            raise ConfigError(f"'{where}' must be a mapping like {{docker: {{base_url: ...}}}}")
        HOST.check_keys(spec, where)
        if spec.get("docker") is None:
            raise ConfigError(f"'{where}.docker' is required (its engine's base_url)")
        engine = docker_engine(spec["docker"], f"{where}.docker", name)
        address = HOST["address"].read(spec, where)
        out[name] = (Host(name, engine, address), spec.get("devices"))
    return out


def placement(raw: Mapping[str, Any], where: str, hosts: Sequence[str]) -> tuple[str, ...]:
    """The hosts a model may run on, from its ``host`` or ``hosts``."""
    one, several = raw.get("host"), raw.get("hosts")
    if one is not None and several is not None:
        raise ConfigError(f"'{where}' has both 'host' and 'hosts': give one")
    if several is not None:
        if not isinstance(several, list) or not several or len(set(several)) != len(several):
            raise ConfigError(f"'{where}.hosts' must list distinct host names")
        names = tuple(several)
    else:
        names = (LOCAL,) if one is None else (one,)
    for name in names:
        if name not in hosts:
            raise ConfigError(f"'{where}' names unknown host {name!r}; hosts: {', '.join(hosts)}")
    if raw.get("remote") is not None and names != (LOCAL,):
        raise ConfigError(f"'{where}': a remote model runs on no host of ours; drop 'host'")
    return names
