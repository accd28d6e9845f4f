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

MASK = "SECRET_KEPT_AS_IT_IS"  # a plain scalar anywhere in YAML, block or flow
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# A command line's secret: ``--api-key sk-...``, ``--hf-token=...`` (its value, up to a quote).
_FLAG = r"--?[\w-]*(?:key|token|secret|password)[\w-]*"
_SECRET_ARGUMENT = re.compile(rf"({_FLAG})(=|\s+)([^\s\"',;)\]}}]+)", re.IGNORECASE)
_LONE_FLAG = re.compile(rf"{_FLAG}$", re.IGNORECASE)
# Without a parse (a file with a YAML error): every value of a key-looking name, flow mappings
# included, case aside; more than the paths would mask, never less.
_ANY_SECRET = re.compile(
    r"(\b(?:key|[\w-]*(?:key|token|secret|password|passwd|credential)[\w-]*)\s*:[ \t]+)"
    r"([^\s,}\]#][^,}\]#\n]*)",
    re.IGNORECASE,
)
_ANCHORS = re.compile(r"(?:[&!]\S*\s+)*")
_QUOTED = re.compile(r"'([^' ]+)'")
Path = tuple[str | int, ...]


@attrs.frozen
class Problem:
    """What is wrong with a text, and on which line (1-based; None when no line is known)."""

    message: str
    line: int | None = None

    def document(self) -> dict[str, Any]:
        return {"message": self.message, "line": self.line}


@attrs.frozen
class _Secret:
    """A scalar holding a secret: whole (a key, a token's value), or ``parts`` of it (a
    command line's flag values); ``start``/``end`` its value's characters (no anchor, tag or
    line end)."""

    node: yaml.ScalarNode
    start: int
    end: int
    whole: bool


def _is_secret(path: Path, previous: str | None) -> bool:
    if len(path) == 4 and path[:2] == ("auth", "keys") and path[3] == "key":
        return True
    if len(path) >= 2 and path[-2] in ("env", "macros"):
        return _SECRET_NAME.search(str(path[-1])) is not None
    return previous is not None and _LONE_FLAG.match(previous) is not None  # cmd: [--api-key, x]


def _scalars(
    node: yaml.Node, path: Path = (), previous: str | None = None
) -> Iterator[tuple[Path, yaml.ScalarNode, str | None]]:
    """Every scalar of a composed document with its path and, in a list, the item before it."""
    if isinstance(node, yaml.ScalarNode):
        yield path, node, previous
    elif isinstance(node, yaml.SequenceNode):
        before = None
        for i, item in enumerate(node.value):
            yield from _scalars(item, (*path, i), before)
            before = item.value if isinstance(item, yaml.ScalarNode) else None
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                yield from _scalars(value, (*path, key.value))


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def _secrets(text: str, root: yaml.Node | None) -> dict[Path, _Secret]:
    """Each secret by every path that reaches it: an anchored node is a secret if any of its
    aliases makes it one (``env: *hf``), and one node all the same."""
    found: dict[int, _Secret] = {}
    paths: list[tuple[Path, yaml.ScalarNode]] = []
    for path, node, previous in _scalars(root) if root is not None else ():
        paths.append((path, node))
        whole = _is_secret(path, previous)
        if id(node) in found and not whole:
            continue
        if whole or _SECRET_ARGUMENT.search(str(node.value)):
            start, end = _value_span(text, node)
            found[id(node)] = _Secret(node, start, end, whole)
    return {path: found[id(node)] for path, node in paths if id(node) in found}


def _value_span(text: str, node: yaml.ScalarNode) -> tuple[int, int]:
    """Where a scalar's value is: without its anchor or tag, or a block scalar's line end."""
    raw = text[node.start_mark.index : node.end_mark.index]
    anchors = _ANCHORS.match(raw)
    return node.start_mark.index + (anchors.end() if anchors else 0), node.start_mark.index + len(
        raw.rstrip()
    )


def _replaced(text: str, spans: list[tuple[int, int, str]]) -> str:
    for start, end, value in sorted(spans, reverse=True):
        text = text[:start] + value + text[end:]
    return text


def _hidden(raw: str) -> str:
    return _SECRET_ARGUMENT.sub(lambda m: m.group(1) + m.group(2) + MASK, raw)


def masked(text: str) -> str:
    """``text`` with each secret replaced by :data:`MASK`: a key, a secret-looking ``env`` or
    ``macros`` value, a command line's ``--api-key``-like flag value."""
    root = _compose(text)
    if root is None:
        return _hidden(_ANY_SECRET.sub(lambda m: m.group(1) + MASK, text))
    spans = []
    for secret in {id(s.node): s for s in _secrets(text, root).values()}.values():
        raw = text[secret.start : secret.end]
        spans.append((secret.start, secret.end, MASK if secret.whole else _hidden(raw)))
    return _replaced(text, spans)


def unmasked(text: str, original: str) -> str:
    """The edited ``text`` with each mask given back what ``original`` had at its path; a mask
    where the original had no secret is a :class:`ConfigError` naming its line."""
    root = _compose(text)
    if root is None:
        return text  # its YAML error is what the check reports
    kept = _secrets(original, _compose(original))
    spans = []
    seen: set[int] = set()
    for path, node, _ in _scalars(root):
        if id(node) in seen or MASK not in str(node.value):
            continue
        seen.add(id(node))
        was = kept.get(path)
        raw_was = original[was.start : was.end] if was is not None else ""
        values = [m.group(3) for m in _SECRET_ARGUMENT.finditer(raw_was)]
        start, end = _value_span(text, node)
        if was is not None and was.whole and text[start:end] == MASK:
            spans.append((start, end, raw_was))
        elif was is not None and not was.whole and text[start:end].count(MASK) == len(values):
            spans.append((start, end, _refill(text[start:end], iter(values))))
        else:
            raise ConfigError(
                f"line {node.start_mark.line + 1}: '{MASK}' stands for a secret only where the "
                "file had one; write the value here (or use key_env)"
            )
    return _replaced(text, spans)


def _refill(raw: str, values: Iterator[str]) -> str:
    """``raw`` with each mask, in order, given back its value."""
    return re.sub(re.escape(MASK), lambda _: next(values), raw)


def redacted(line: str) -> str:
    """A line of ``check-config``'s (the running configuration) as the console shows it: a
    secret-looking ``NAME=value`` and a command line's secret flags hidden."""
    line = _SECRET_ARGUMENT.sub(lambda m: m.group(1) + m.group(2) + "(secret)", line)
    return re.sub(r"(\b[\w-]*(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)[\w-]*=)"
                  r"(?!\(secret\))[^\s;)]+", r"\1(secret)", line, flags=re.IGNORECASE)  # fmt: skip


def line_of(text: str, message: str) -> int | None:
    """The line an error message's first quoted path (``'models.qwen2.5.ttl'``) points at in
    ``text``, or that a YAML error names."""
    found = re.search(r"^line (\d+):|at line (\d+), column \d+", message)
    if found:
        return int(found.group(1) or found.group(2))
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
        elsewhere = "is not valid YAML" in message and not message.startswith(source)
        return None, [Problem(message, None if elsewhere else line_of(text, message))]


def write(text: str, source: str) -> str:
    """Write ``text`` (masks given back their secrets) to ``source`` atomically, the previous
    file kept beside it as ``<name>.bak`` with its mode: where the backup went.  A symlinked
    file is written where it is.  Blocking: run it in a thread."""
    whole = unmasked(text, _read(source))
    target = os.path.realpath(source)
    directory = os.path.dirname(target)
    backup = target + ".bak"
    existed = os.path.exists(target)
    mode = os.stat(target).st_mode & 0o777 if existed else 0o600
    fd, temporary = tempfile.mkstemp(prefix=".llmswap-", suffix=".yaml", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(whole)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        if existed:
            with open(target, "rb") as old:
                kept = old.read()
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            with os.fdopen(os.open(backup, flags, mode), "wb") as copy:
                copy.write(kept)
            os.chmod(backup, mode)  # an older backup keeps its mode otherwise
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)
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
