"""Start-up: reconciliation, then preload; after a reload, the new backends' strays.

Reconciliation restores the memory budget over backends an earlier daemon left running.

A restarted llmswap finds containers (and, after a crash, processes) still up.  It adopts those
that answer healthy right now while they fit the budget (without declared devices: the first
one) and stops all the others before anything else may load.  A model with a sleep mode is
adopted asleep when its status URL says so (and its host memory fits); when it cannot tell,
it is stopped: a sleeper believed awake would be sent requests it cannot answer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmswap import errors
from llmswap.config.config import Config
from llmswap.interfaces import BackendHTTP
from llmswap.swap import sleep
from llmswap.swap.readiness import probe
from llmswap.swap.slot import Slot

log = Logger()


@inlineCallbacks
def start_up(
    config: Config,
    slots: Mapping[str, Slot],
    http: BackendHTTP,
    clock: IReactorTime,
    load: Callable[[str], Deferred[None]],
) -> Generator[Deferred[Any], Any, None]:
    """A host's first change (``slots`` are its own): nothing else loads there before it ends.
    A preloaded model that may run on several hosts loads on its first."""
    yield reconcile(config, slots, http, clock)
    for model in [n for m in config.preload if (n := config.placements[m][0]) in slots]:
        try:
            yield load(model)
        except errors.APIError as e:
            log.error("preload of {model} failed: {e}", model=model, e=e.message)


@inlineCallbacks
def reconcile(
    config: Config, slots: Mapping[str, Slot], http: BackendHTTP, clock: IReactorTime
) -> Generator[Deferred[Any], Any, None]:
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
        asleep = False
        if slot.config.sleep is not None:
            asleep = yield sleep.is_asleep(clock, http, slot.config.sleep)
        held = config.sleep_footprint(slot.name) if asleep else config.footprint(slot.name)
        fits = asleep is not None and (held is None or held[1] <= free[held[0]])
        always_on = slot.config.remote is not None  # adopted as it is: nothing to check
        if fits and (asleep or always_on or (yield probe(clock, http, slot.config.health_url))):
            if held is not None:
                free[held[0]] -= held[1]
            adopted.append((slot, asleep))
        else:
            log.info("start-up: stopping {model}", model=slot.name)
            yield slot.stop()
    # Reported loaded only once the others are gone.
    for slot, asleep in adopted:
        slot.adopted(asleep)
        log.info("start-up: adopted {model} as {state}", model=slot.name, state=slot.state)
    return None


@inlineCallbacks
def stop_strays(slots: list[Slot]) -> Generator[Deferred[Any], Any, None]:
    """A reload's new backends: one already running (its container started by hand, or left by
    the model's old settings) is stopped, never adopted: other models are loaded now, and what it
    holds is not counted anywhere."""
    for slot in slots:
        try:
            running = yield slot.backend.adopt()
        except Exception as e:
            log.error("model {model}: cannot inspect after the reload: {e}", model=slot.name, e=e)
            continue
        if running:
            log.info("reload: stopping {model}, found running", model=slot.name)
            yield slot.stop()
