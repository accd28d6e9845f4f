"""The ``GET /health`` document, from a snapshot.

Its first keys are the original proxy's (``status``, ``current_model``, ``queue_size``,
``message``), which users' monitoring reads; the rest say what every model is doing.
"""

from __future__ import annotations

from typing import Any

from llmswap.swap.snapshot import Snapshot
from llmswap.swap.state import ModelState

# /health lists this many waiting requests (the counts per model cover all of them).
QUEUE_SHOWN = 100


def document(snap: Snapshot) -> dict[str, Any]:
    ready = snap.ready()
    starting = [n for n, m in snap.models.items() if m.state is ModelState.STARTING]
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
                **m.backend,
            }
            for name, m in snap.models.items()
        },
    }
