"""Each model's measured footprint: the peak its backend held on its device, across restarts.

A figure belongs to what was measured: a model whose command (or container, or device) changes
starts over, because a new context size or quantization makes the old peak wrong.  The file is
small JSON, written whole (to a temporary file, then renamed) by a thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from llmswap.config.model import ModelConfig

FILE = "footprints.json"
# A declared figure this far below the measured one is worth a warning.
TOO_LOW = 0.2


def too_low(declared: int | None, measured: int) -> bool:
    """Whether a model declares much less than it was measured to take."""
    return declared is not None and declared < measured * (1 - TOO_LOW)


def fingerprint(model: ModelConfig) -> str:
    """What a measurement is of: the command, container and device the model runs with."""
    what = repr((model.cmd, model.container_name, model.host, model.device))
    return hashlib.sha256(what.encode()).hexdigest()[:16]


@attrs.define
class Footprints:
    """Measured peaks in bytes, by model name (owned by the memory witness, on the reactor)."""

    _peaks: dict[str, tuple[str, int]] = attrs.field(factory=dict)

    def current(self, models: Mapping[str, ModelConfig]) -> dict[str, int]:
        """The figures that still hold for ``models`` as configured now, by name."""
        out = {}
        for name, model in models.items():
            kept = self._peaks.get(name)
            if kept is not None and kept[0] == fingerprint(model):
                out[name] = kept[1]
        return out

    def record(self, model: ModelConfig, held: int) -> bool:
        """Keep ``held`` if it is a new peak for what ``model`` runs; True if it was."""
        kept = self._peaks.get(model.name)
        mark = fingerprint(model)
        if kept is not None and kept[0] == mark and held <= kept[1]:
            return False
        self._peaks[model.name] = (mark, held)
        return True

    def as_json(self) -> dict[str, Any]:
        return {n: {"fingerprint": f, "bytes": b} for n, (f, b) in sorted(self._peaks.items())}


def read(directory: Path) -> Footprints:
    """In a thread: the figures kept in ``directory`` (none when it has no file or a bad one)."""
    try:
        raw = json.loads((directory / FILE).read_text())
        peaks = {str(n): (str(v["fingerprint"]), int(v["bytes"])) for n, v in raw.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return Footprints()
    return Footprints(peaks)


def write(directory: Path, data: dict[str, Any]) -> None:
    """In a thread: replace the file with ``data`` at once (a crash leaves the old one)."""
    directory.mkdir(parents=True, exist_ok=True)
    # Its own temporary file: two writes in flight never share one.
    temporary = directory / f"{FILE}.{threading.get_ident()}.new"
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, directory / FILE)
