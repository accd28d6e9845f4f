"""When an idle model's linger bet opens and is lost (:mod:`llmswap.swap.linger`).

A bet is only open where lingering could change something: the scheduler lingers at all
(swap-aware, ``linger`` above 0), the model served a request since it became ready, and a
request waits for a model whose load would evict it (both fitting, or the other already
loaded, it is not in the way).  It is lost when a model loaded after the bet opened takes its
first requests: those waited no longer for this one's follow-up.  The manager tells this
module what happens; the slots keep the records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from llmswap.config.config import Config
from llmswap.config.settings import SWAP_AWARE
from llmswap.swap import policy
from llmswap.swap.linger import window
from llmswap.swap.slot import Slot


class Bets:
    """The slots whose bet is open (a slot keeps its own record)."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self._open: set[Slot] = set()

    def waits(self, view: policy.View, instance: str, slots: dict[str, Slot], now: float) -> None:
        """A request for ``instance`` (not ready) waits: the idle models its load would evict
        have a bet open on their follow-up."""
        for name in policy.plan_eviction(view, instance):
            self._contest(slots[name], now)

    def idle(self, slot: Slot, view: policy.View, waiting: Iterable[str], now: float) -> None:
        """``slot`` finished its last request while requests for ``waiting`` wait on its host:
        a bet is open if one of their loads would evict it."""
        if any(slot.name in policy.plan_eviction(view, n) for n in waiting if n != slot.name):
            self._contest(slot, now)

    def admitted(self, served: Slot, now: float) -> None:
        """``served`` takes a request: the bets it was loaded past are lost."""
        if not self._open:  # every admission comes here; almost none with a bet open
            return
        for slot in list(self._open):
            record = slot.linger
            if record.open_until is not None and slot is not served:
                same_host = slot.config.host == served.config.host
                if same_host and record.opened_at is not None and served.since >= record.opened_at:
                    record.passed_over(now)
            if record.open_until is None or not slot.ready:
                self._open.discard(slot)  # settled, or gone (stopped, replaced by a reload)

    def _contest(self, slot: Slot, now: float) -> None:
        cfg = self._config()
        if cfg.scheduler != SWAP_AWARE or cfg.linger <= 0:
            return
        if not slot.ready or slot.in_flight or not slot.served:
            return  # busy, or it has served nothing since it became ready: no follow-up
        span = window(cfg.linger, cfg.linger_bound, slot.last_load_seconds)
        slot.linger.contested(now, slot.last_used + span)
        if slot.linger.open_until is not None:
            self._open.add(slot)
