"""Device budgets: a host's declared devices, and each model instance placed on one it fits.

Every model must fit its device on its own (a model that can never load is a configuration
error, not a request that waits forever); which models share a device at a time is the policy's
business (:mod:`llmswap.swap.policy`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import attrs

from llmswap.config.host import IMPLICIT_DEVICE, LOCAL, Host, Probed
from llmswap.config.model import ModelConfig
from llmswap.config.settings import DEVICE
from llmswap.config.values import ConfigError, size


def budgets(
    host: Host, raw: Any, instances: dict[str, ModelConfig]
) -> tuple[Host, dict[str, ModelConfig]]:
    """The host with its devices read, and its model instances with their devices qualified;
    every model must fit its device on its own."""
    where = "devices" if host.name == LOCAL else f"hosts.{host.name}.devices"
    for m in instances.values():
        if m.kind == "process" and not host.docker.local:
            raise ConfigError(
                f"'models.{m.name}' has a 'cmd', which runs on this machine, but its host "
                f"'{host.name}' is a remote engine ({host.docker.base_url}): run it in a "
                "container there"
            )
    devices = _devices(raw, instances, where)
    probes = _probes(raw, where)
    if probes and not host.docker.local:
        raise ConfigError(
            f"'{where}.{next(iter(probes))}.probe': a probe reads this machine, but host "
            f"'{host.name}' is a remote engine ({host.docker.base_url}); its devices can only "
            "be declared"
        )
    qualified = {n: attrs.evolve(m, device=host.device(m.device)) for n, m in instances.items()}
    for n, m in qualified.items():
        if m.sleep is not None and m.sleep.device is not None:
            sleep = attrs.evolve(m.sleep, device=host.device(m.sleep.device))
            qualified[n] = attrs.evolve(m, sleep=sleep)
    named = {host.device(d): b for d, b in devices.items()}
    measured = {host.device(d): p for d, p in probes.items()}
    return attrs.evolve(host, devices=named, probes=measured), qualified


def _probes(raw: Any, where: str) -> dict[str, Probed]:
    """The devices that name a probe (their keys were checked by :func:`_devices`)."""
    out = {}
    for name, spec in (raw or {}).items():
        if spec.get("probe") is not None:
            at = f"{where}.{name}"
            probe = _probe(DEVICE["probe"].read(spec, at), f"{at}.probe")
            out[str(name)] = Probed(probe, DEVICE["free_timeout"].read(spec, at))
    return out


def _probe(value: str, where: str) -> str:
    """``ram`` or ``nvml:<index>``, as written."""
    kind, _, index = value.partition(":")
    if value == "ram":
        return value
    if kind == "nvml" and index.isdigit():
        if importlib.util.find_spec("pynvml") is None:
            raise ConfigError(
                f"'{where}': NVML is read with NVIDIA's nvidia-ml-py: pip install 'llmswap[nvml]'"
            )
        return value
    raise ConfigError(f"'{where}' must be `ram` or `nvml:<index>` (e.g. nvml:0), not {value!r}")


def _devices(raw: Any, models: dict[str, ModelConfig], where: str) -> dict[str, int]:
    """Validate memory budgets (each model's device resolved in ``models``)."""
    if raw is None:
        for m in models.values():
            if m.memory is not None or m.device != IMPLICIT_DEVICE:
                raise ConfigError(
                    f"'models.{m.name}' declares 'memory'/'device' but no '{where}' are "
                    "declared (e.g. devices: {gpu0: {memory: 24GiB}})"
                )
            if m.sleep is not None and m.sleep.memory is not None:
                raise ConfigError(
                    f"'models.{m.name}.sleep.memory' is counted on a device, but no '{where}' "
                    "are declared (e.g. devices: {gpu0: {memory: 24GiB}, ram: {memory: 64GiB}})"
                )
        return {}
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"'{where}' must map device names to {{memory: SIZE}}")
    devices: dict[str, int] = {}
    for name, spec in raw.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"'{where}.{name}' must be a mapping like {{memory: 24GiB}}")
        DEVICE.check_keys(spec, f"{where}.{name}")
        if "memory" not in spec:
            raise ConfigError(f"'{where}.{name}.memory' is required (e.g. 24GiB)")
        devices[str(name)] = size(spec["memory"], f"{where}.{name}.memory")
    # Devices that only count sleepers (host memory) are never a model's default device.
    sleepers = {m.sleep.device for m in models.values() if m.sleep is not None and m.sleep.device}
    runnable = [d for d in devices if d not in sleepers] or list(devices)
    only = runnable[0] if len(runnable) == 1 else None
    for name, m in list(models.items()):
        if m.remote is not None:
            continue
        if m.sleep is not None and m.sleep.device is not None:
            _fits(f"models.{m.name}.sleep", m.sleep.memory, m.sleep.device, devices)
        device = m.device
        if device == IMPLICIT_DEVICE:
            if only is None:
                raise ConfigError(
                    f"'models.{m.name}.device' is required when several devices are declared "
                    f"({', '.join(runnable)})"
                )
            device = only
        _fits(f"models.{m.name}", m.memory, device, devices)
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
