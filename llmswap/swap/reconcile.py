"""Start-up reconciliation: restore the memory budget over backends an earlier daemon left running.

A restarted llmswap finds containers (and, after a crash, processes) still up.  It adopts those
that answer healthy right now while they fit the budget (without declared devices: the first
one) and stops all the others before anything else may load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmswap.config import Config
from llmswap.swap.readiness import probe
from llmswap.swap.slot import Slot

log = Logger()


@inlineCallbacks
def reconcile(config: Config, slots: Mapping[str, Slot], http: Any, clock: IReactorTime) -> Any:
    running: list[Slot] = []
    for name, slot in slots.items():
        try:
            if (yield slot.backend.adopt()):
                running.append(slot)
        except Exception as e:
            log.error("model {model}: cannot inspect at start-up: {e}", model=name, e=e)
    if not running:
        return None
    log.info("start-up: found running: {names}", names=", ".join(s.name for s in running))
    free = config.capacities()
    adopted = []
    for slot in running:
        device, memory = config.footprint(slot.name)
        if memory <= free[device] and (yield probe(clock, http, slot.config.health_url)):
            free[device] -= memory
            adopted.append(slot)
        else:
            log.info("start-up: stopping {model}", model=slot.name)
            yield slot.stop()
    # Reported loaded only once the others are gone.
    for slot in adopted:
        slot.adopted()
        log.info("start-up: adopted {model} as loaded", model=slot.name)
    return None
