"""The ``GET /health`` document, from a snapshot.

Its first keys are the original proxy's (``status``, ``current_model``, ``queue_size``,
``message``), which users' monitoring reads; the rest say what every model is doing.  Without
``details`` (anyone but an admin, unless ``auth.open_health: full``) it shows states and counts
only: no pids, paths, URLs, engine addresses or backend output, which may hold users' prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmswap.events import ModelState
from llmswap.memory.probe import DeviceReading
from llmswap.swap.prefetch import Residency
from llmswap.swap.snapshot import Snapshot

# /health lists this many waiting requests (the counts per model cover all of them).
QUEUE_SHOWN = 100


def document(
    snap: Snapshot, files: Mapping[str, Residency] | None = None, details: bool = True
) -> dict[str, Any]:
    """``files``: how much of each model's weight files is in the page cache."""
    files = files or {}
    ready = snap.ready()
    starting = [n for n, m in snap.instances.items() if m.state is ModelState.STARTING]
    if starting:
        message = f"Loading model {starting[0]}"
    elif ready:
        message = f"Model {', '.join(ready)} loaded"
    else:
        message = "No model loaded"
    return {
        "status": "ok" if snap.running else "stopping",
        "current_model": snap.current(),
        "loaded_models": ready,
        "queue_size": snap.waiting,
        "queue_capacity": snap.queue_capacity,
        "in_flight": snap.in_flight,
        "scheduler": snap.scheduler,
        "message": message,
        "queue": [{"model": w.model, "age": w.age, "priority": w.priority} for w in snap.queue],
        "models": {
            name: {
                "state": m.state.value,
                "error": m.error,
                "last_load_seconds": m.last_load_seconds,
                "waiting": m.waiting,
                "in_flight": m.in_flight,
                "host": m.host,
                # Bytes on its device: declared (null with ``memory: auto``), measured (peak, on
                # probed devices) and estimated (a llama-server model's GGUF).
                "memory": {
                    "declared": m.declared,
                    "measured": m.measured,
                    "estimated": m.estimated,
                },
                # Its linger now (0: none), how often lingering paid lately, and its bets.
                "linger": dict(m.linger),
                **(m.backend if details else {}),
                **_files(files.get(name)),
            }
            for name, m in snap.instances.items()
        },
        # Each pool's members, and the one that serves it now.
        "pools": {name: p.document() for name, p in snap.pools.items()},
        # The probed devices as last measured: bytes, and a GPU's figures where NVML gives them.
        "devices": {d: _reading(r) for d, r in snap.devices.items()},
        "hosts": {
            name: {
                "reachable": h.error is None,
                "devices": h.devices,
                "models": list(h.models),
                **({"engine": h.engine, "address": h.address, "error": h.error} if details else {}),
            }
            for name, h in snap.hosts.items()
        },
    }


def _files(r: Residency | None) -> dict[str, Any]:
    if r is None:
        return {}
    return {"files": {"bytes": r.total, "cached_bytes": r.cached,
                      "cached": round(r.cached / r.total, 3) if r.total else 1.0}}  # fmt: skip


def _reading(r: DeviceReading) -> dict[str, float]:
    gpu = {"utilization": r.utilization, "temperature": r.temperature, "power": r.power}
    return {"total": r.total, "free": r.free, **{k: v for k, v in gpu.items() if v is not None}}
