"""Which member of a pool serves a request: a pure function of what each member is doing.

``prefer: loaded`` (the default) serves with the member that costs least: one loaded, else one
loading, else one asleep (a wake), else one that fits beside what is loaded; only then the
first, which evicts.
``prefer: order`` is a strict preference: the first member, unless crash backoff holds it back.
A member the caller's key may not use is never chosen; the pool's declaration is
:mod:`llmswap.config.pools`'.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from llmswap.config.pools import ORDER
from llmswap.swap.policy import View


@attrs.frozen
class Member:
    name: str  # as the pool lists it (a model or an alias)
    ready: bool = False  # loaded and taking requests
    loading: bool = False  # holds its device already: starting
    asleep: bool = False  # wakes in a fraction of a start
    fits: bool = False  # could start now without evicting anything
    held_back: bool = False  # crash backoff: its requests are refused for a while


def choose(prefer: str, members: Sequence[Member]) -> Member | None:
    """The member that serves; None when there is none (no member the caller may use)."""
    usable = [m for m in members if not m.held_back] or list(members)
    if not usable:
        return None
    if prefer == ORDER:
        return usable[0]
    for wanted in ("ready", "loading", "asleep", "fits"):
        found = next((m for m in usable if getattr(m, wanted)), None)
        if found is not None:
            return found
    return usable[0]


def fits(view: View, instance: str) -> bool:
    """Whether ``instance`` could start on its host now, evicting nothing."""
    me = view.instances[instance]
    holds = [other.holds() for other in view.instances.values()]
    used = sum(held[1] for held in holds if held is not None and held[0] == me.device)
    return used + me.memory <= view.devices.get(me.device, 0.0) + 1e-9
