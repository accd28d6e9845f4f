"""The secrets of a configuration file's text, so that none leaves llmswap through the console.

A secret is a key written in the file (``auth.keys[].key``), an ``env`` or ``macros`` value
whose name holds KEY, TOKEN, SECRET or PASSWORD, a command line's value of such a flag
(``--api-key sk-...``, ``--hf-token=...``, or the item after ``--api-key`` in a list), and the
credentials of a URL anywhere (``http://user:password@host``).  The text
a browser gets holds :data:`MASK` in each one's place.  A text sent back gets the original again
only where the mask stands exactly where the secret stood: the same paths (an anchored secret
reached through the same aliases, none added), after the same flag.  A mask anywhere else is an
error, so an edit can neither move a secret where it would be shown nor lose it.

The walk through a document follows aliases (an anchor defined outside ``env`` and aliased into
one is a secret) and gives up past :data:`_MOST_PATHS` paths: a text built of nested aliases
is treated as one that does not parse.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import attrs
import yaml

from llmswap.config.values import ConfigError

MASK = "SECRET_KEPT_AS_IT_IS"  # a plain scalar anywhere in YAML, block or flow
SHOWN = "(secret)"  # what a secret is replaced by where nothing is sent back
_WORDS = ("key", "token", "secret", "password", "passwd", "credential")
_MOST_PATHS = 50_000
_SHORTEST = 6  # a value shorter than this is not scrubbed from messages (it would match anything)
_TOKEN = re.compile(r"\S+")
_ANCHORS = re.compile(r"(?:[&!]\S*\s+)*")
# A URL's credentials: the password of user:password@, or a user@ alone (a token, as a rule);
# up to the authority's last @ (a password may hold a raw @ or #).  The scheme starts a word
# and is short: no text makes the search quadratic.
_USERINFO = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://(?P<info>[^\s/?\"']*)@")
Path = tuple[str | int, ...]


class _Unwieldy(Exception):
    """More paths through aliases than a configuration has."""


def _secret_name(name: object) -> bool:
    lowered = str(name).lower()
    return any(word in lowered for word in _WORDS)


def _flag(token: str) -> bool:
    """``--api-key``, ``-hf_token``: a flag whose value is a secret."""
    return token.startswith("-") and len(token) <= 64 and _secret_name(token.partition("=")[0])


def spans(raw: str) -> list[tuple[str, int, int]]:
    """Each secret value of a command line or ``NAME=value`` list in ``raw``, and each URL's
    credentials: its flag (or name, or ``url``) and where the value is, without quotes or a
    trailing ``;`` / ``)`` / ``,``; in order."""
    found = _flag_spans(raw)
    for m in _USERINFO.finditer(raw):
        start, end = m.span("info")
        colon = m.group("info").find(":")
        if colon >= 0 and start + colon + 1 < end:  # the password; a user@ alone is the token
            start += colon + 1
        if start < end and not any(a < end and start < b for _, a, b in found):
            found.append(("url", start, end))
    return sorted(found, key=lambda span: span[1])


def _flag_spans(raw: str) -> list[tuple[str, int, int]]:
    found = []
    tokens = [(m.group(), m.start()) for m in _TOKEN.finditer(raw)]
    for i, (token, at) in enumerate(tokens):
        name, equals, value = token.partition("=")
        if equals and value and (_flag(token) or (_secret_name(name) and name.isidentifier())):
            start = at + len(name) + 1
        elif _flag(token) and not equals and i + 1 < len(tokens):
            value, start = tokens[i + 1]
        else:
            continue
        inner = value.strip("\"'").rstrip(";),\"'")
        offset = value.find(inner) if inner else -1
        if offset >= 0:
            found.append((name.lower(), start + offset, start + offset + len(inner)))
    return found


@attrs.frozen
class _Secret:
    """A scalar holding a secret, whole or in ``parts`` (a command line's flag values): where
    its value is (no anchor, tag or line end), the paths that reach it, and its flags."""

    start: int
    end: int
    whole: bool
    paths: frozenset[Path]
    flags: tuple[str, ...]


def _scalars(
    node: yaml.Node, path: Path = (), previous: str | None = None, count: list[int] | None = None
) -> Iterator[tuple[Path, yaml.ScalarNode, str | None]]:
    """Every scalar with its path and, in a list, the item before it; aliases followed."""
    count = count if count is not None else [0]
    count[0] += 1
    if count[0] > _MOST_PATHS:
        raise _Unwieldy
    if isinstance(node, yaml.ScalarNode):
        yield path, node, previous
    elif isinstance(node, yaml.SequenceNode):
        before = None
        for i, item in enumerate(node.value):
            yield from _scalars(item, (*path, i), before, count)
            before = item.value if isinstance(item, yaml.ScalarNode) else None
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                yield from _scalars(value, (*path, key.value), None, count)


def _whole(path: Path, previous: str | None) -> bool:
    if len(path) == 4 and path[:2] == ("auth", "keys") and path[3] == "key":
        return True
    if len(path) >= 2 and path[-2] in ("env", "macros"):
        return _secret_name(path[-1])
    return previous is not None and _flag(previous) and "=" not in previous


def _span(text: str, node: yaml.ScalarNode) -> tuple[int, int]:
    raw = text[node.start_mark.index : node.end_mark.index]
    anchors = _ANCHORS.match(raw)
    start = node.start_mark.index + (anchors.end() if anchors else 0)
    return start, node.start_mark.index + len(raw.rstrip())


def _parse(text: str) -> tuple[dict[int, _Secret], dict[int, tuple[yaml.ScalarNode, set[Path]]]]:
    """The secrets of ``text`` by node, and every scalar with the paths reaching it; raises
    ValueError when the text does not parse (or is unwieldy)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        walked = list(_scalars(root)) if root is not None else []
    except (yaml.YAMLError, _Unwieldy, RecursionError):
        raise ValueError("not parsed") from None
    nodes: dict[int, tuple[yaml.ScalarNode, set[Path]]] = {}
    whole: set[int] = set()
    for path, node, previous in walked:
        nodes.setdefault(id(node), (node, set()))[1].add(path)
        if _whole(path, previous):
            whole.add(id(node))
    found = {}
    for key, (node, paths) in nodes.items():
        start, end = _span(text, node)
        parts = spans(text[start:end]) if key not in whole else []
        if key in whole or parts:
            flags = tuple(flag for flag, _, _ in parts)
            found[key] = _Secret(start, end, key in whole, frozenset(paths), flags)
    return found, nodes


def _replaced(text: str, edits: Iterable[tuple[int, int, str]]) -> str:
    for start, end, value in sorted(edits, reverse=True):
        text = text[:start] + value + text[end:]
    return text


def masked(text: str) -> str | None:
    """``text`` with each secret replaced by :data:`MASK`; None when it does not parse (no
    path says where its secrets are: it is not shown)."""
    try:
        found, _ = _parse(text)
    except ValueError:
        return None
    edits = []
    for s in found.values():
        if s.whole:
            edits.append((s.start, s.end, MASK))
        else:
            edits += [(s.start + a, s.start + b, MASK) for _, a, b in spans(text[s.start : s.end])]
    return _replaced(text, edits)


def unmasked(text: str, original: str | None) -> str:
    """The edited ``text`` with each mask given back what ``original`` had there; a mask
    anywhere else is a :class:`ConfigError` naming its line."""
    if MASK not in text:
        return text
    try:
        now, nodes = _parse(text)
    except ValueError:
        return text  # its YAML error is what the check reports
    try:
        kept = list(_parse(original)[0].values()) if original is not None else []
    except ValueError:
        kept = []
    by_path = {path: s for s in kept for path in s.paths}
    edits = []
    for node, paths in nodes.values():
        start, end = _span(text, node)
        raw = text[start:end]
        if MASK not in raw:
            continue
        was = by_path.get(next(iter(paths)))
        here = now.get(id(node))  # a secret here too: the same key, or after the same flag
        same = was is not None and here is not None and here.whole == was.whole
        refill = _refill(raw, paths, was, original or "") if same else None
        if refill is None:
            raise ConfigError(
                f"line {node.start_mark.line + 1}: '{MASK}' stands for a secret only where the "
                "file had it (the same key, the same flag); write the value here, or use key_env"
            )
        edits.append((start, end, refill))
    return _replaced(text, edits)


def _refill(raw: str, paths: set[Path], was: _Secret | None, original: str) -> str | None:
    """``raw`` with its masks given back ``was``'s values, or None where they do not stand
    where ``was`` stood."""
    if was is None or was.paths != paths:
        return None
    before = original[was.start : was.end]
    if was.whole:
        return before if raw == MASK else None
    now = [(flag, a, b) for flag, a, b in spans(raw) if raw[a:b] == MASK]
    if raw.count(MASK) != len(now) or tuple(flag for flag, _, _ in now) != was.flags:
        return None
    values = [before[a:b] for _, a, b in spans(before)]
    return _replaced(raw, [(a, b, value) for (_, a, b), value in zip(now, values, strict=True)])


def values(text: str | None) -> set[str]:
    """The secret values written in ``text`` (to scrub from what is shown)."""
    if text is None:
        return set()
    try:
        found, _ = _parse(text)
    except ValueError:
        return set()
    out: set[str] = set()
    for s in found.values():
        raw = text[s.start : s.end]
        pieces = [raw.strip("\"'")] if s.whole else [raw[a:b] for _, a, b in spans(raw)]
        out.update(p for p in pieces if len(p) >= _SHORTEST and p != MASK)
    return out


def scrubbed(message: str, known: Iterable[str]) -> str:
    """``message`` with every known secret value, and a command line's secret flag values,
    replaced by :data:`SHOWN`."""
    for value in sorted(known, key=len, reverse=True):
        message = message.replace(value, SHOWN)
    return _replaced(message, [(a, b, SHOWN) for _, a, b in spans(message)])
