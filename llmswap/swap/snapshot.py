"""Pictures of the swap manager's state, as plain typed values.

- :class:`Snapshot` (:func:`take`): what ``/health``, metrics and the console read; its readers
  never touch the manager's live state, and its cost does not grow with the number of waiting
  requests.
- :func:`policy_view`: the :class:`llmswap.swap.policy.View` the policy decides on, with only the
  waiting requests the policy can use (see :meth:`~llmswap.swap.queue.WaitingRoom.sample`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from llmswap.config.config import Config
from llmswap.config.host import LOCAL
from llmswap.config.model import ModelConfig
from llmswap.config.settings import SWAP_AWARE
from llmswap.events import ModelState
from llmswap.memory.probe import DeviceReading
from llmswap.swap import linger, policy
from llmswap.swap.queue import RequestQueue, Ticket
from llmswap.swap.slot import Slot


@attrs.frozen
class Waiter:
    """A waiting request: ``age`` in seconds, ``position`` in the queue now (1: next)."""

    model: str
    key: str
    age: float
    priority: int
    position: int


@attrs.frozen
class ModelSnapshot:
    name: str
    state: ModelState
    error: str | None
    since: float  # when it entered ``state``
    last_used: float
    last_load_seconds: float | None
    waiting: int
    in_flight: int
    ttl: float | None  # idle seconds before it is unloaded (a keep_alive's, or its ttl)
    backend: Mapping[str, Any]  # the driver's facts: pid and log, or container and its state
    host: str = LOCAL
    # Bytes on its device: declared (``memory``), the peak measured on a probed device, and
    # what its GGUF says it will take (llama-server models).
    declared: int | None = None
    measured: int | None = None
    estimated: int | None = None
    # Its linger now (0: it does not linger), how often lingering paid lately, and the bets.
    linger: Mapping[str, float] = attrs.field(factory=dict)


@attrs.frozen
class PoolSnapshot:
    """A pool: its members as listed, its preference, and the member a request (of a key that
    may use them all) would be served by now."""

    members: tuple[str, ...]
    prefer: str
    serving: str | None

    def document(self) -> dict[str, Any]:
        """As ``/health`` and the console show it."""
        return {"models": list(self.members), "prefer": self.prefer, "serving": self.serving}


@attrs.frozen
class HostSnapshot:
    """A host: its engine, ``${HOST}``, budgets, instances, and why its engine did not answer
    last (None: it did)."""

    name: str
    engine: str
    address: str
    devices: Mapping[str, float]
    models: tuple[str, ...]
    error: str | None


@attrs.frozen
class Snapshot:
    at: float
    running: bool
    scheduler: str
    queue_capacity: int
    waiting: int
    in_flight: int
    queue: tuple[Waiter, ...]  # the oldest waiting requests, as many as asked for
    instances: Mapping[str, ModelSnapshot]
    hosts: Mapping[str, HostSnapshot] = attrs.field(factory=dict)
    # The probed devices as last read (every few seconds, by the memory witness).
    devices: Mapping[str, DeviceReading] = attrs.field(factory=dict)
    pools: Mapping[str, PoolSnapshot] = attrs.field(factory=dict)

    def ready(self) -> list[str]:
        return [n for n, m in self.instances.items() if m.state is ModelState.READY]

    def current(self) -> str | None:
        """The loaded model that served last (the original proxy's ``current_model``)."""
        ready = self.ready()
        return max(ready, key=lambda n: self.instances[n].last_used) if ready else None


def take(
    slots: Mapping[str, Slot],
    queue: RequestQueue,
    config: Config,
    now: float,
    running: bool,
    listed: int,
    measured: Mapping[str, int] | None = None,
    devices: Mapping[str, DeviceReading] | None = None,
) -> Snapshot:
    """The snapshot at ``now``, listing the ``listed`` oldest waiting requests; ``measured``:
    the instances' measured footprints, ``devices`` the probed devices' last readings."""
    measured = measured or {}
    models = {
        name: ModelSnapshot(
            name=name,
            state=slot.state,
            error=slot.error,
            since=slot.since,
            last_used=slot.last_used,
            last_load_seconds=slot.last_load_seconds,
            waiting=queue.count(name),
            in_flight=slot.in_flight,
            ttl=slot.ttl,
            backend=slot.backend.describe(),
            host=slot.config.host,
            declared=None if slot.config.memory_auto else slot.config.memory,
            measured=measured.get(name),
            estimated=slot.config.estimated,
            linger=_linger(slot, config, now),
        )
        for name, slot in slots.items()
    }
    hosts = {}
    for name, host in config.hosts.items():
        on = tuple(n for n, m in models.items() if m.host == name)
        lost = (models[n].backend.get("engine_error") for n in on)
        hosts[name] = HostSnapshot(name, host.docker.where, host.address, host.capacities(), on,
                                   next((e for e in lost if e), None))  # fmt: skip
    return Snapshot(
        at=now,
        running=running,
        scheduler=config.scheduler,
        queue_capacity=config.queue_size,
        waiting=len(queue),
        in_flight=len(queue.leases),
        queue=tuple(
            Waiter(t.instance, t.key, round(now - t.enqueued, 3), t.priority, position)
            for position, t in enumerate(queue.oldest(listed), 1)
        ),
        instances=models,
        hosts=hosts,
        devices=devices or {},
    )


def _linger(slot: Slot, config: Config, now: float) -> dict[str, float]:
    payoff, record = slot.linger.payoff(now), slot.linger
    span = linger.window(
        config.linger, config.linger_bound, slot.last_load_seconds, slot.linger.wait()
    )
    lingers = config.scheduler == SWAP_AWARE and payoff >= linger.PAYS
    return {"seconds": round(span, 3) if lingers else 0.0, "payoff": round(payoff, 3),
            "paid": record.paid_total, "wasted": record.wasted_total}  # fmt: skip


def policy_view(
    slots: Mapping[str, Slot],
    queue: RequestQueue,
    config: Config,
    now: float,
    changing: bool,
    host: str,
    counted: Callable[[ModelConfig], int | None] | None = None,
) -> policy.View:
    """The view of ``host``, whose ``slots`` these are; ``counted`` is what a probed device
    counts for a model (its measured footprint when larger than the declared one)."""
    models = {}
    sampled: list[Ticket] = []
    for name, slot in slots.items():
        cfg = slot.config
        device, memory = config.footprint(name)
        if counted is not None and cfg.memory is not None:
            memory = float(counted(cfg) or memory)
        sleep_device, sleep_memory = config.sleep_footprint(name) or (None, 0.0)
        models[name] = policy.ModelView(
            name=name,
            resident=slot.resident,
            ready=slot.ready,
            in_flight=slot.in_flight,
            concurrency=cfg.concurrency,
            last_used=slot.last_used,
            ready_since=slot.since if slot.ready else 0.0,
            device=device,
            memory=memory,
            max_wait=cfg.max_wait_before_swap,
            ttl=slot.ttl,
            asleep=slot.asleep,
            sleep_device=sleep_device,
            sleep_memory=sleep_memory,
            load_seconds=slot.last_load_seconds,
            linger_payoff=slot.linger.payoff(now),
            linger_evidence=slot.linger.evidence(now),
            linger_wait=slot.linger.wait(),
            answered_after=slot.answered_after,
            last_client=slot.last_client,
        )
        free = cfg.concurrency - slot.in_flight if slot.ready else 0
        sampled += queue.waiting.sample(name, max(0, free) + 1)
    return policy.View(
        now=now,
        instances=models,
        waiting=[
            policy.Waiting(t.seq, t.instance, t.enqueued, t.priority, t.client) for t in sampled
        ],
        devices=config.capacities(host),
        policy=config.scheduler,
        changing=changing,
        linger=config.linger,
        linger_bound=config.linger_bound,
    )
