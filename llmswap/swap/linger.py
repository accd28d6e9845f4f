"""A linger that learns: whether keeping an idle model loaded for its follow-up pays.

After a model's last request, the swap-aware policy keeps it (``linger`` seconds, at most its
load time) while another model's requests wait, betting that its client's next request comes
first.  The bet pays when it does (a reload is saved) and is wasted when it does not (the other
model's requests waited for nothing).  A lone user switching models loses every bet; a model
with steady traffic wins most.

Each instance keeps its record here, owned by its :class:`~llmswap.swap.slot.Slot`: a bet is
open from the moment another model's request waits on its host while it lingers (or could
linger), and is settled by the first request for it while that request still waits (paid), or
by its window's end or that request being served first (wasted).  It is settled the same way
when the policy did not linger: the other model then loads at once, and a follow-up that comes
during its load is one lingering would have served, so a model that stopped lingering learns
when lingering would pay again.  A lone user's follow-up always comes after the other model's
answer: never during a bet.
Old outcomes fade (:data:`HALF_LIFE`); the policy lingers while the payoff is at least
:data:`PAYS`, which one wasted bet of a new model brings below.  A model whose linger is untried
(:data:`UNTRIED`) does not take its first bet against anonymous requests that all came after its
last answer (``swap/policy.py``): that is the lone user, as far as anyone can tell.
"""

from __future__ import annotations

from collections import deque

import attrs

HALF_LIFE = 300.0  # seconds after which an outcome counts half
PAYS = 0.5  # the payoff at which lingering is worth its wait (the ski-rental bound's break-even)
# The prior, as outcomes that never fade: one bet, a little more than half paid.  A new model
# lingers, loses that after one lost bet, and has it back once its lost bets have faded (about
# twelve minutes) or one of them pays.
_PRIOR_PAID, _PRIOR_BETS = 0.6, 1.0
# Less than half a bet lately (none, or one over five minutes old): the model's linger is
# untried, and the prior alone says to linger.  Then a contender that looks like the user who
# just left (it came after the last answer, and nobody says who either is) is not made to wait
# for a first bet: a lone user switching models would pay one load time per model for it.
UNTRIED = 0.5
# Clients that ask again at once (agents, scripts, batches) send their next request within
# milliseconds of an answer: waiting a whole load time for one that does not come is then the
# linger's whole cost.  Once KNOWN requests came to it loaded, a linger lasts ROOM times the
# longest of the latest FOLLOW_UPS spells from an answer to the next request (at least
# WAIT_FLOOR: a busy box's scheduling jitter, which even a follow-up sent at once may meet),
# within the window; one long spell among them (a person's pause) gives the whole window back.
# At 0.1 s the floor was four users' whole loss to llama.cpp's router (docs/benchmarks.md).
FOLLOW_UPS, KNOWN, ROOM, WAIT_FLOOR = 8, 2, 3.0, 0.02


def window(
    linger: float, bounded: bool, load_seconds: float | None, wait: float | None = None
) -> float:
    """Seconds a model may linger after its last request: ``linger``, at most its last load
    time when ``bounded`` (the ski-rental bound), and at most ``wait``, what its follow-ups have
    taken to come (:meth:`LingerRecord.wait`)."""
    if bounded and load_seconds is not None:
        linger = min(linger, load_seconds)
    return min(linger, wait) if wait is not None else linger


@attrs.define
class LingerRecord:
    """One instance's bets."""

    paid: float = 0.0  # faded counts
    bets: float = 0.0
    at: float = 0.0  # when the counts were last faded
    open_until: float | None = None  # the open bet's window end
    opened_at: float | None = None  # when it opened
    paid_total: int = 0
    wasted_total: int = 0
    # Seconds from an answer of its to the next request for it, while loaded: the latest few.
    delays: deque[float] = attrs.field(factory=lambda: deque(maxlen=FOLLOW_UPS))

    def contested(self, now: float, until: float) -> None:
        """Another model's request waits while this one lingers (or could, until ``until``)."""
        self._settle(now)
        if self.open_until is None and now < until:
            self.open_until, self.opened_at = until, now

    def passed_over(self, now: float) -> None:
        """The waiting requests were served first (another model loaded and answered them):
        its follow-up, if it comes now, came after them, which lingering would only have
        delayed.  The open bet is lost."""
        self._settle(now)
        if self.open_until is not None:
            self.open_until = None
            self._record(now, paid=False)

    def arrived(self, now: float, since: float, loaded: bool) -> None:
        """A request for this instance arrived, ``since`` its last answer went out; ``loaded``:
        it was ready (the spell since that answer is one a linger would have waited).  Spells
        while it answers others count too: two clients of one model each keep it busy while
        the other's follow-up comes, and the spells show how soon follow-ups come."""
        self._settle(now)
        if loaded:
            self.delays.append(max(0.0, now - since))
        if self.open_until is not None:
            self.open_until = None
            self._record(now, paid=True)

    def wait(self) -> float | None:
        """How long it need linger: the longest of its latest spells from an answer to the next
        request, with room; None until a few have come.  A request slower than that still settles
        its bet (during the other model's load), and the next linger is longer."""
        if len(self.delays) < KNOWN:
            return None
        return max(WAIT_FLOOR, ROOM * max(self.delays))

    def evidence(self, now: float) -> float:
        """How many bets it has lately (faded): below :data:`UNTRIED`, its payoff is the prior's."""
        self._settle(now)
        return self._faded(now)[1]

    def payoff(self, now: float) -> float:
        """How often its lingering pays, lately (0 to 1)."""
        self._settle(now)
        paid, bets = self._faded(now)
        return (paid + _PRIOR_PAID) / (bets + _PRIOR_BETS)

    def _settle(self, now: float) -> None:
        if self.open_until is not None and now > self.open_until:
            at, self.open_until = self.open_until, None
            self._record(at, paid=False)

    def _faded(self, now: float) -> tuple[float, float]:
        factor = 0.5 ** (max(0.0, now - self.at) / HALF_LIFE)
        return self.paid * factor, self.bets * factor

    def _record(self, now: float, paid: bool) -> None:
        self.paid, self.bets = self._faded(now)
        self.at = now
        self.bets += 1
        if paid:
            self.paid += 1
            self.paid_total += 1
        else:
            self.wasted_total += 1
