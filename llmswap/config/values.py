"""How a value in the configuration file is checked and converted, by kind of value.

Each checker takes the value and its full key path, and raises :class:`ConfigError` with a
message naming that path and what a valid value looks like.
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest of ``options``, or nothing."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def known_model(name: str, models: Iterable[str], where: str) -> None:
    """Refuse a model name at ``where`` that no model of the configuration has."""
    if name not in models:
        raise ConfigError(f"'{where}' names unknown model {name!r}{did_you_mean(name, models)}")


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


def number(value: Any, path: str, integer: bool, minimum: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"'{path}' must be a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"'{path}' must be a whole number, got {value!r}")
    if value <= minimum:
        raise ConfigError(f"'{path}' must be greater than {minimum:g}, got {value!r}")
    return value if integer else float(value)


def flag(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"'{path}' must be true or false, got {value!r}")
    return value


def text(value: Any, path: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"'{path}' must be {what}, got {value!r}")
    return value


def size(value: Any, path: str) -> int:
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
            number = -1.0
    else:
        number, unit = -1.0, ""
    if number <= 0 or unit not in _UNITS:
        raise ConfigError(
            f"'{path}' must be a memory size like 24GiB, 8000MiB or 16GB, got {value!r}"
        )
    return int(number * _UNITS[unit])


def url(value: Any, path: str) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"'{path}' must be an http(s) URL like http://127.0.0.1:8081/v1, got {value!r}"
        )
    return str(value).rstrip("/")


def command(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        cmd = tuple(shlex.split(value))
    elif isinstance(value, list) and all(isinstance(a, str | int | float) for a in value):
        cmd = tuple(str(a) for a in value)
    else:
        raise ConfigError(f"'{path}' must be a command string or a list of arguments")
    if not cmd:
        raise ConfigError(f"'{path}' is empty")
    return cmd


def environment(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"'{path}' must be a mapping of NAME: value")
    return {str(k): str(v) for k, v in value.items()}


def paths(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"'{path}' must be a list of file paths, got {value!r}")
    return tuple(value)


def names(raw: Any, where: str) -> tuple[str, ...]:
    """A list of non-empty names (aliases, fields, environment variables, host names)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"'{where}' must be a list of names")
    return tuple(text(n, f"{where}[{i}]", "a non-empty name") for i, n in enumerate(raw))


def choice(value: Any, path: str, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise ConfigError(f"'{path}' must be one of {', '.join(choices)}, got {value!r}")
    return value


# The checkers that need nothing but the value and its path, by kind.
PLAIN: dict[str, Callable[[Any, str], Any]] = {
    "flag": flag,
    "url": url,
    "size": size,
    "command": command,
    "env": environment,
    "paths": paths,
}
