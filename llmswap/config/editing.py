"""The configuration file as the console edits it: text whose secrets are masked, a check that
points at the line of an error, and a write that is atomic and keeps the previous file.

A key written in the file (``auth.keys[].key``) or a secret-looking environment value of a
model (``env: {HF_TOKEN: ...}``) never leaves llmswap: the text sent to a browser holds
:data:`MASK` in its place, and a text sent back with the mask where the secret was gets the
original value again (the same YAML path, its quoting kept).  A mask anywhere else is an error,
so a secret cannot be lost by moving it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import yaml

from llmswap.config.config import Config, load
from llmswap.config.values import ConfigError

MASK = "(secret, kept as it is)"
_SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_QUOTED = re.compile(r"'([^' ]+)'")
Path = tuple[str | int, ...]


@attrs.frozen
class Problem:
    """What is wrong with a text, and on which line (1-based; None when no line is known)."""

    message: str
    line: int | None = None

    def document(self) -> dict[str, Any]:
        return {"message": self.message, "line": self.line}


def _is_secret(path: Path) -> bool:
    if len(path) == 4 and path[:2] == ("auth", "keys") and path[3] == "key":
        return True
    return len(path) >= 2 and path[-2] == "env" and _SECRET_ENV.search(str(path[-1])) is not None


def _scalars(node: yaml.Node, path: Path = ()) -> Iterator[tuple[Path, yaml.ScalarNode]]:
    """Every scalar value of a composed document with its path (mapping keys, list indices)."""
    if isinstance(node, yaml.ScalarNode):
        yield path, node
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _scalars(item, (*path, i))
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                yield from _scalars(value, (*path, key.value))


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def _secrets(text: str) -> dict[Path, yaml.ScalarNode]:
    root = _compose(text)
    return {p: n for p, n in _scalars(root) if _is_secret(p)} if root is not None else {}


def _replaced(text: str, spans: list[tuple[int, int, str]]) -> str:
    for start, end, value in sorted(spans, reverse=True):
        text = text[:start] + value + text[end:]
    return text


def masked(text: str) -> str:
    """``text`` with each secret replaced by :data:`MASK`.  A file that is not valid YAML has
    no paths to find its secrets by: every ``key:`` and secret-looking value is masked."""
    if _compose(text) is None:
        line = re.compile(r"^(\s*(?:-\s*)?(?:key|\w*(?:KEY|TOKEN|SECRET|PASSWORD)\w*)\s*:\s*)\S.*$",
                          re.MULTILINE)  # fmt: skip
        return line.sub(lambda m: m.group(1) + MASK, text)
    nodes = _secrets(text)
    return _replaced(text, [(n.start_mark.index, n.end_mark.index, MASK) for n in nodes.values()])


def unmasked(text: str, original: str) -> str:
    """The edited ``text`` with each mask given back the secret ``original`` had at its path;
    a mask at a path that had none is a :class:`ConfigError` naming its line."""
    root = _compose(text)
    if root is None:
        return text  # its YAML error is what the check reports
    kept = _secrets(original)
    spans = []
    for path, node in _scalars(root):
        if node.value != MASK:
            continue
        if path not in kept:
            raise ConfigError(
                f"line {node.start_mark.line + 1}: '{MASK}' stands for a secret only where the "
                "file had one; write the value here (or use key_env)"
            )
        was = kept[path]
        spans.append((node.start_mark.index, node.end_mark.index,
                      original[was.start_mark.index : was.end_mark.index]))  # fmt: skip
    return _replaced(text, spans)


def line_of(text: str, message: str) -> int | None:
    """The line an error message's first quoted path (``'models.qwen2.5.ttl'``) points at in
    ``text``, or that a YAML error names."""
    found = re.search(r"line (\d+), column \d+", message)
    if found:
        return int(found.group(1))
    root = _compose(text)
    if root is None:
        return None
    for quoted in _QUOTED.findall(message):
        node = _find(root, re.split(r"\.|(?=\[)", quoted))
        if node is not None:
            return node.start_mark.line + 1
    return None


def _find(node: yaml.Node, parts: list[str]) -> yaml.Node | None:
    """The node at ``parts``; a mapping key may itself hold dots (``qwen2.5``)."""
    if not parts:
        return node
    if isinstance(node, yaml.SequenceNode) and re.fullmatch(r"\[\d+\]", parts[0]):
        index = int(parts[0][1:-1])
        return _find(node.value[index], parts[1:]) if index < len(node.value) else None
    if isinstance(node, yaml.MappingNode):
        for n in range(len(parts), 0, -1):
            name = ".".join(parts[:n])
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == name:
                    return _find(value, parts[n:]) or key
    return None


def check(text: str, source: str, running: Config | None) -> tuple[Config | None, list[Problem]]:
    """Validate ``text`` as the file at ``source`` (its includes are read from beside it), as
    ``check-config`` does: the configuration, or what is wrong, at its line."""
    try:
        whole = unmasked(text, _read(source))
        ports: Mapping[str, int] | None = running.ports if running is not None else None
        return load(source, ports, whole), []
    except ConfigError as e:
        message = str(e).removeprefix(f"{source}: ")
        return None, [Problem(message, line_of(text, message))]


def write(text: str, source: str) -> str:
    """Write ``text`` (masks given back their secrets) to ``source`` atomically, the previous
    file kept beside it as ``<name>.bak``: where the backup went.  Blocking: run it in a thread."""
    whole = unmasked(text, _read(source))
    directory = os.path.dirname(os.path.abspath(source))
    backup = source + ".bak"
    mode = os.stat(source).st_mode & 0o777 if os.path.exists(source) else 0o644
    fd, temporary = tempfile.mkstemp(prefix=".llmswap-", suffix=".yaml", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(whole)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        if os.path.exists(source):
            with open(source, "rb") as old, open(backup, "wb") as copy:
                copy.write(old.read())
        os.replace(temporary, source)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return backup


def _read(source: str) -> str:
    try:
        with open(source, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def read_masked(source: str) -> str:
    """The file's text as the console shows it.  Blocking: run it in a thread."""
    return masked(_read(source))
