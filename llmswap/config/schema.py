"""How a configuration setting is declared and read: :class:`Setting` and :class:`Section`.

A setting is declared once (type, default, unit, help; the declarations are
:mod:`llmswap.config.settings`); the key whitelists (a typo is an error naming the key's full
path and the closest valid spelling), the defaults of the configuration classes,
``check-config``'s output and the README's table all derive from it, so a setting cannot be
documented with one default and parsed with another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from llmswap.config.values import PLAIN, ConfigError, choice, did_you_mean, number, text


@attrs.frozen
class Setting:
    """One key: ``kind`` names its type for people; ``read`` checks and converts a value.

    ``default`` None means "not set" (the key is optional and has no value); ``shown_default``
    is what the docs say when the default is not a plain value (derived from another key).
    """

    key: str
    kind: str
    default: Any
    help: str
    unit: str = ""
    shown_default: str | None = None
    # For numbers: a whole number, and the value it must exceed.
    integer: bool = False
    minimum: float = 0.0
    # For text: what a valid value is, for the error message.
    what: str = "a non-empty string"
    choices: tuple[str, ...] = ()

    def read(self, mapping: Mapping[str, Any], where: str, default: Any = None) -> Any:
        """The value at ``key`` in ``mapping`` (``where`` is the mapping's path), checked;
        the declared default (or ``default``, when the default is derived) when absent."""
        path = f"{where}.{self.key}" if where else self.key
        if self.key not in mapping:
            return self.default if default is None else default
        value = mapping[self.key]
        if value is None and self.default is None:
            return None
        return self.check(value, path)

    def check(self, value: Any, path: str) -> Any:
        if self.kind == "number":
            return number(value, path, self.integer, self.minimum)
        if self.kind == "text":
            return text(value, path, self.what)
        if self.kind == "choice":
            return choice(value, path, self.choices)
        plain = PLAIN.get(self.kind)
        # Sections and lists are parsed by llmswap.config.config, which knows their shape.
        return value if plain is None else plain(value, path)

    def default_text(self) -> str:
        """The default as the docs show it: a value in code style, or prose."""
        if self.shown_default is not None:
            return self.shown_default
        if self.default is None:
            return "none"
        return f"`{show(self.default)}`"


def show(value: Any) -> str:
    """A setting's value as a user would write it in the file."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return f"[{', '.join(map(str, value))}]"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


@attrs.frozen
class Section:
    """The settings of one mapping in the file; ``path`` as the docs show it."""

    path: str
    settings: tuple[Setting, ...]

    def __getitem__(self, key: str) -> Setting:
        for s in self.settings:
            if s.key == key:
                return s
        raise KeyError(key)

    def keys(self) -> list[str]:
        return [s.key for s in self.settings]

    def read_all(self, raw: Any, where: str) -> dict[str, Any]:
        """Every setting of a nested section (absent or null: all defaults), checked."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"'{where}' must be a mapping ({', '.join(self.keys())})")
        self.check_keys(raw, where)
        return {key: self[key].read(raw, where) for key in self.keys()}

    def check_keys(self, mapping: Mapping[str, Any], where: str) -> None:
        """Refuse a key this section does not declare, naming the closest valid one."""
        allowed = self.keys()
        for key in mapping:
            if key not in allowed:
                path = f"{where}.{key}" if where else str(key)
                raise ConfigError(
                    f"unknown key '{path}'{did_you_mean(str(key), allowed)}; "
                    f"valid keys here: {', '.join(allowed)}"
                )
