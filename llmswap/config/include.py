"""``include:``: more files whose ``models``, ``pools`` and ``macros`` join the main file's.

So each model can be a file dropped into a directory (``include: [models.d/*.yaml]``).  Paths
and globs are relative to the including file; a glob may match nothing (an empty directory), a
plain path must exist.  A name defined twice is an error naming both files, never a silent
override; an included file may not include others (one level keeps the picture plain).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from typing import Any

import yaml

from llmswap.config.values import ConfigError

# The sections an included file may hold.
JOINED = ("models", "pools", "macros")


def resolved(pattern: str, base: str) -> str:
    """An include pattern as an absolute path, relative to ``base`` (the including file's
    directory)."""
    return os.path.normpath(os.path.join(base, os.path.expanduser(pattern)))


def matches(pattern: str, base: str) -> list[str]:
    """The files an include pattern names, in order; a glob may match none, a path must be a
    file."""
    path = resolved(pattern, base)
    if glob.has_magic(path):
        return sorted(p for p in glob.glob(path) if os.path.isfile(p))
    if not os.path.isfile(path):
        raise ConfigError(f"'include' names {pattern}, which is not a file")
    return [path]


def read_yaml(path: str, text: str | None = None) -> Any:
    """The document of the file at ``path``, or of ``text`` standing for it (a version not yet
    written, which the console checks)."""
    if text is None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        # Where and what, without PyYAML's snippet of the text: an included file may be any
        # file the daemon can read, and the console shows this message.
        mark = getattr(e, "problem_mark", None)
        parts = (getattr(e, "context", None), getattr(e, "problem", None))
        what = ", ".join(p for p in parts if p) or type(e).__name__
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {what}") from None


def joined(data: Any, source: str) -> tuple[Any, tuple[str, ...], tuple[str, ...]]:
    """``data`` (the main file's document) with its includes joined in, the files read
    besides ``source`` in order, and the include patterns as absolute paths (what a watcher
    follows: a file dropped into ``models.d/`` later is one)."""
    if not isinstance(data, Mapping) or data.get("include") is None:
        return data, (), ()
    patterns = data["include"]
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"'include' must be a list of paths or globs, got {patterns!r}")
    out = {k: v for k, v in data.items() if k != "include"}
    origin = {section: dict.fromkeys(out.get(section) or {}, source) for section in JOINED}
    files: list[str] = []
    base = os.path.dirname(os.path.abspath(source))
    absolute = tuple(resolved(p, base) for p in patterns)
    for pattern in patterns:
        for path in matches(pattern, base):
            if path in files or os.path.abspath(path) == os.path.abspath(source):
                continue
            files.append(path)
            _join(out, origin, read_yaml(path), path)
    return out, tuple(files), absolute


def _join(out: dict[str, Any], origin: dict[str, dict[str, str]], part: Any, path: str) -> None:
    if part is None:  # an empty file
        return
    if not isinstance(part, Mapping) or set(part) - set(JOINED):
        extra = sorted(set(part) - set(JOINED)) if isinstance(part, Mapping) else None
        raise ConfigError(
            f"{path}: an included file may only hold {', '.join(JOINED)}"
            + (f"; it has {', '.join(map(str, extra))}" if extra else "")
        )
    for section, entries in part.items():
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise ConfigError(f"{path}: '{section}' must be a mapping")
        merged = dict(out.get(section) or {})
        for name, value in entries.items():
            if name in merged:
                raise ConfigError(
                    f"{path}: '{section}.{name}' is already defined in {origin[section][name]}"
                )
            merged[name] = value
            origin[section][name] = path
        out[section] = merged
