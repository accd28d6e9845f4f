"""``python -m llmswap``: validate a configuration, or print the table of settings.

- ``check-config FILE``: validate without starting anything; list the effective settings (those
  not at their default) and every model with its own; exit 1 with the error otherwise.
- ``settings``: the Markdown table of every setting, as the README shows it.
- ``convert-llama-swap FILE``: a llama-swap configuration as an llmswap one, on stdout; what does
  not carry over is listed at its top and on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from llmswap.config import convert, schema, settings
from llmswap.config.config import Config, load
from llmswap.config.host import IMPLICIT_DEVICE, LOCAL
from llmswap.config.model import derive_health_url
from llmswap.config.values import ConfigError
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmswap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a config file and list its models")
    check.add_argument("path")
    sub.add_parser("settings", help="print the table of every setting (Markdown)")
    conv = sub.add_parser("convert-llama-swap", help="print a llama-swap config as llmswap's")
    conv.add_argument("path")
    args = parser.parse_args(argv)

    if args.command == "settings":
        print(settings.markdown_table())
        return 0
    if args.command == "convert-llama-swap":
        return _convert(args.path)
    try:
        config = load(args.path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(describe(config, args.path)))
    return 0


def _convert(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            text, left = convert.render(yaml.safe_load(f), path)
    except (OSError, yaml.YAMLError, ConfigError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 1
    print(text, end="")
    for line in left:
        print(f"not carried over: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
