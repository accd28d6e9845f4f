"""Where a model's weight files are: named in ``files:``, or by ``cmd``'s ``-m``/``--model``.

Read ahead (:mod:`llmswap.swap.prefetch`) reads them into the page cache; ``memory: auto``
(:mod:`llmswap.config.estimate`) reads a GGUF's header to size the model.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from typing import Protocol

_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<parts>\d{5})\.gguf$")


class _Model(Protocol):
    """What names a model's files (a ModelConfig)."""

    @property
    def files(self) -> tuple[str, ...] | None: ...

    @property
    def cmd(self) -> tuple[str, ...] | None: ...


def weight_files(model: _Model) -> list[str]:
    """The model's weight files that exist now: ``files:``, else ``cmd``'s ``-m``/``--model``;
    a split GGUF brings all its parts, a directory (vLLM's model dir) its files."""
    named = model.files if model.files is not None else from_cmd(model.cmd or ())
    found: list[str] = []
    for path in named:
        found += expand(path)
    return list(dict.fromkeys(found))


def from_cmd(cmd: Sequence[str]) -> list[str]:
    """The paths ``cmd`` names with ``-m``/``--model``."""
    paths = []
    for flag, value in itertools.pairwise(cmd):
        if flag in ("-m", "--model"):
            paths.append(value)
    return paths + [a.split("=", 1)[1] for a in cmd if a.startswith("--model=")]


def expand(path: str) -> list[str]:
    """The files ``path`` stands for that exist: itself, a split GGUF's parts (named by any
    part), or a directory's files."""
    if os.path.isdir(path):
        return sorted(
            os.path.join(root, name) for root, _, names in os.walk(path) for name in names
        )
    split = _SPLIT.match(path)
    if split:
        parts = int(split["parts"])
        path_of = f"{split['stem']}-{{:05d}}-of-{split['parts']}.gguf".format
        return [p for p in map(path_of, range(1, parts + 1)) if os.path.isfile(p)]
    return [path] if os.path.isfile(path) else []
