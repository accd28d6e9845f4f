"""The configuration file as the console edits it: its text with the secrets masked
(:mod:`llmswap.config.secrets`), a check that points at the line of an error, and a write that
is atomic and keeps the previous file.

A check from the console reads no file outside the configuration's directory (an ``include:``
elsewhere is refused): an admin on the LAN is not handed a way to read the box's other files
through error messages.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import attrs
import yaml

from llmswap.config import secrets
from llmswap.config.config import Config, load
from llmswap.config.include import matches, resolved
from llmswap.config.values import ConfigError

_QUOTED = re.compile(r"'([^' ]+)'")


@attrs.frozen
class Problem:
    """What is wrong with a text, and on which line (1-based; None when no line is known)."""

    message: str
    line: int | None = None

    def document(self) -> dict[str, Any]:
        return {"message": self.message, "line": self.line}


def line_of(text: str, message: str) -> int | None:
    """The line an error message's first quoted path (``'models.qwen2.5.ttl'``) points at in
    ``text``, or that a YAML error names."""
    found = re.search(r"^line (\d+):|at line (\d+), column \d+", message)
    if found:
        return int(found.group(1) or found.group(2))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
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
    ``check-config`` does: the configuration, or what is wrong, at its line.  No message holds
    a secret of the file, of the text, or of the running configuration."""
    original = read(source)
    known = secrets.values(original)
    if running is not None and running.auth is not None:
        known |= {k.secret for k in running.auth.keys}
    try:
        whole = secrets.unmasked(text, original)
        known |= secrets.values(whole)
        _inside(whole, source)
        known |= included_secrets(_patterns(whole), source)
        ports: Mapping[str, int] | None = running.ports if running is not None else None
        return load(source, ports, whole), []
    except ConfigError as e:
        message = secrets.scrubbed(str(e).removeprefix(f"{source}: "), known)
        elsewhere = "is not valid YAML" in message and not message.startswith(source)
        return None, [Problem(message, None if elsewhere else line_of(text, message))]


def _patterns(text: str) -> list[str]:
    """The text's ``include:`` patterns (none when it does not parse: the check says so)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    patterns = data.get("include") if isinstance(data, dict) else None
    return [p for p in patterns if isinstance(p, str) and p] if isinstance(patterns, list) else []


def included_secrets(patterns: list[str], source: str) -> set[str]:
    """The secret values of the files ``patterns`` name in the configuration's directory: a
    message about an included file may quote one, and the console shows no included file."""
    base = os.path.dirname(os.path.abspath(source))
    found: set[str] = set()
    for pattern in patterns:
        if not resolved(pattern, base).startswith(base + os.sep):
            continue
        try:
            files = matches(pattern, base)  # as includes are read: files only, never a FIFO
        except ConfigError:
            continue  # the check says so
        for each in files:
            found |= secrets.values(read(each))
    return found


def _inside(text: str, source: str) -> None:
    """Refuse an ``include:`` outside the configuration's directory."""
    base = os.path.dirname(os.path.abspath(source))
    for pattern in _patterns(text):
        if not resolved(pattern, base).startswith(base + os.sep):
            raise ConfigError(
                f"'include' names {pattern!r}, outside {base}: the console reads no file "
                "outside the configuration's directory (edit the file on the box for that)"
            )


# Backups kept: ``<name>.bak`` the file before the last apply, ``.bak.1`` before that...  One
# would be lost to the next apply, and a bad apply is often followed by a hasty second one.
BACKUPS = 3


def write(text: str, source: str) -> str:
    """Write ``text`` (masks given back their secrets) to ``source`` atomically, the previous
    file kept beside it as ``<name>.bak`` (older ones as ``.bak.1``...) with its mode and owner:
    where the backup went.  A symlinked file is written where it is.  Blocking: run it in a
    thread."""
    original = read(source)
    whole = secrets.unmasked(text, original)
    if original is not None and "\r\n" in original:  # a browser's editor gives LF: as the file was
        whole = whole.replace("\r\n", "\n").replace("\n", "\r\n")
    target = os.path.realpath(source)
    directory = os.path.dirname(target)
    backup = target + ".bak"
    was = os.stat(target) if os.path.exists(target) else None
    written: list[str] = []  # temporary files, until each is renamed into place
    try:
        temporary = _new_file(directory, whole.encode("utf-8"), was, written)
        if was is not None:
            with open(target, "rb") as old:
                copy = _new_file(directory, old.read(), was, written)
            for n in range(BACKUPS - 1, 0, -1):  # a dangling link at a backup's name moves too
                older = f"{backup}.{n - 1}" if n > 1 else backup
                if os.path.lexists(older):
                    os.replace(older, f"{backup}.{n}")
            os.replace(copy, backup)  # a name replaced, never a link followed
        os.replace(temporary, target)
    except BaseException:
        for path in written:
            if os.path.lexists(path):
                os.unlink(path)
        raise
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)  # the renames themselves survive a power cut
    finally:
        os.close(folder)
    return backup


def _new_file(directory: str, data: bytes, was: os.stat_result | None, made: list[str]) -> str:
    """A new file in ``directory`` holding ``data``, synced, with the mode and owner of the
    file it will stand for (``was``; 0600 for a new one): set through its descriptor, so a
    name swapped for a link meanwhile gives nothing away (llmswap may run as root)."""
    fd, path = tempfile.mkstemp(prefix=".llmswap-", suffix=".yaml", dir=directory)
    made.append(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.fchmod(f.fileno(), was.st_mode & 0o777 if was is not None else 0o600)
        if was is not None:
            try:
                os.fchown(f.fileno(), was.st_uid, was.st_gid)
            except PermissionError:  # a user who may not is left the owner, as editors leave it
                pass
    return path


def read(source: str) -> str | None:
    """The file's text as it is (its line ends kept); None when it cannot be read as UTF-8."""
    try:
        with open(source, encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def read_masked(source: str) -> str | None:
    """The file's text as the console shows it: None when it is not valid YAML (no path says
    where its secrets are) or cannot be read.  Blocking: run it in a thread."""
    text = read(source)
    return secrets.masked(text) if text is not None else None
