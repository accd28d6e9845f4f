"""What ``check-config`` prints: a configuration's effective settings (those not at their
default) and every model with its own, and its memory figures (declared, estimated, measured).
The console's Config view shows the same lines as the running configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmswap.config import schema, settings
from llmswap.config.config import Config
from llmswap.config.host import IMPLICIT_DEVICE, LOCAL
from llmswap.config.model import derive_health_url
from llmswap.memory import footprints

MiB = 2**20


def _changed(section: schema.Section, obj: Any, defaults: dict[str, Any]) -> list[str]:
    """``key value unit`` for each setting of ``obj`` not at its default (``defaults`` holds
    those that derive from other settings)."""
    out = []
    for s in section.settings:
        if s.kind in ("section", "list") or not hasattr(obj, s.key):
            continue
        value = getattr(obj, s.key)
        if value not in (None, {}, ()) and value != defaults.get(s.key, s.default):
            out.append(f"{s.key} {schema.show(value)} {s.unit}".rstrip())
    return out


def describe(config: Config, path: str) -> list[str]:
    lines = [f"{path}: OK, {len(config.models)} models, listen {config.listen}"]
    changed = _changed(settings.GLOBAL, config, {"listen": config.listen})
    if changed:
        lines.append(f"  settings: {'; '.join(changed)}")
    # What the daemon measured on probed devices (kept in state_dir), beside what is declared.
    directory = Path(config.state_directory())
    measured = footprints.read(directory).current(config.instances) if config.probed() else {}
    for name, m in config.instances.items():  # a model on several hosts: once per host
        how = (
            f"container {m.container_name}" if m.container_name else f"cmd {' '.join(m.cmd or ())}"
        )
        derived = _changed(
            settings.MODEL,
            m,
            {
                # Shown already, or derived from other settings.
                "backend_url": m.backend_url,
                "cmd": m.cmd,
                "container_name": m.container_name,
                "startup_timeout": m.startup_timeout,
                "health_url": derive_health_url(m.backend_url),
                "max_wait_before_swap": settings.GLOBAL["max_wait_before_swap"].default,
                "drain_timeout": config.request_timeout,
                "device": config.hosts[m.host].device(IMPLICIT_DEVICE),
                "host": LOCAL,
                "loading_status": config.loading_status,
                "memory": m.memory,  # on its own line
            },
        )
        own = "; ".join([f"startup_timeout {m.startup_timeout:g} s", *derived])
        lines.append(f"  {name}: {m.backend_url} ({how}; {own})")
        figures = [
            ("declared", None if m.memory_auto else m.memory),
            ("estimated from its GGUF", m.estimated),
            ("measured", measured.get(name)),
        ]
        known = [f"{what} {b / MiB:.0f} MiB" for what, b in figures if b is not None]
        if known:
            auto = " (memory: auto)" if m.memory_auto else ""
            lines.append(f"    memory on {m.device}{auto}: {', '.join(known)}")
        if name in measured:
            if footprints.too_low(m.memory, measured[name]):
                declared = (m.memory or 0) / MiB
                lines.append(f"    warning: it declares {declared:.0f} MiB, less than it was "
                             "measured to take; the budget counts the measured figure")  # fmt: skip
    return lines
