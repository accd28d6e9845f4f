"""Macros in the configuration, as llama-swap users write them: ``${PORT}``, ``${MODEL_ID}``,
``${env.NAME}`` and their own ``macros:`` (global, and per model).

``${PORT}`` is a port llmswap assigns to each model that uses it, counting from ``start_port``,
so a configuration needs no port numbers.  A model keeps its port across reloads (the running
assignment is passed in): an unchanged model is not restarted because another was added before
it.  An unknown macro is an error naming where it is used, never left in a command.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from llmswap.config.values import ConfigError, did_you_mean

_MACRO = re.compile(r"\$\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
PORT, MODEL_ID, HOST = "PORT", "MODEL_ID", "HOST"
# The model settings macros are expanded in.
EXPANDED = ("cmd", "backend_url", "health_url", "env", "cwd", "files", "container_name", "sleep")


def define(raw: Any, where: str, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` and the macros of a ``macros:`` mapping, each expanded with those before it."""
    out = dict(base)
    if raw is None:
        return out
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{where}' must map macro names to values")
    for name, value in raw.items():
        path = f"{where}.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"'{path}': a macro name is 1-63 letters, digits, '_' or '-'")
        if name in (PORT, MODEL_ID, HOST):
            raise ConfigError(f"'{path}': {name} is set by llmswap and cannot be defined")
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, int | float):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"'{path}' must be a string, number or boolean")
        out[name] = expand(value, out, path)
    return out


def expand(text: str, macros: Mapping[str, str], where: str) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("env."):
            value = os.environ.get(name[4:])
            if value is None:
                raise ConfigError(f"'{where}' uses ${{{name}}}, but {name[4:]} is not set")
            return value
        if name in macros:
            return macros[name]
        known = [*macros, "env.NAME"]
        raise ConfigError(f"'{where}' uses unknown macro ${{{name}}}{did_you_mean(name, known)}")

    return _MACRO.sub(one, text)


def expand_all(value: Any, macros: Mapping[str, str], where: str) -> Any:
    """Every string in ``value`` (lists and mappings walked) expanded."""
    if isinstance(value, str):
        return expand(value, macros, where)
    if isinstance(value, list):
        return [expand_all(v, macros, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {k: expand_all(v, macros, f"{where}.{k}") for k, v in value.items()}
    return value


def uses(value: Any, name: str) -> bool:
    """Whether ``${name}`` appears anywhere in ``value``."""
    if isinstance(value, str):
        return f"${{{name}}}" in value
    if isinstance(value, list):
        return any(uses(v, name) for v in value)
    if isinstance(value, Mapping):
        return any(uses(v, name) for v in value.values())
    return False


def assign_ports(wanting: Iterable[str], start: int, previous: Mapping[str, int]) -> dict[str, int]:
    """A port for each model in ``wanting``: its previous one, else the lowest free from
    ``start``."""
    wanting = list(wanting)
    ports = {n: previous[n] for n in wanting if n in previous and previous[n] >= start}
    taken = set(ports.values())
    candidate = start
    for name in wanting:
        if name in ports:
            continue
        while candidate in taken:
            candidate += 1
        ports[name] = candidate
        taken.add(candidate)
    return {n: ports[n] for n in wanting}
