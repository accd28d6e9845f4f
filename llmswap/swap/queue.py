"""The queue: tickets for waiting requests, the waiting room, leases, and the one expiry timer.

A request enters as a :class:`Ticket` through a bounded ``DeferredQueue`` (the intake, which the
manager's loop empties at once) into the :class:`WaitingRoom`, where it stays until the manager
admits it with a :class:`Lease` on a ready backend, it expires, or its client goes away.

What one waiting request holds is counted in bytes (docs/benchmarks.md): a ticket with slots and
one Deferred, the callbacks bound once, no timer of its own: every waiting request shares one
timeout, so the oldest expires first and one delayed call serves them all.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterator

import attrs
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from llmswap import errors
from llmswap.config.config import Config
from llmswap.swap.slot import Slot


@attrs.define(eq=False)
class Lease:
    """The right to send one request to a ready backend; release it after the last byte."""

    instance: str
    backend_url: str
    waited: float
    position: int
    # What the release counts against; a reload may replace the model's slot meanwhile, so
    # the lease keeps the one it was taken from.
    slot: Slot
    _on_release: Callable[[Lease], None] | None = None
    # Seconds of the model's load this request waited through (0: it was loaded already).
    load_seconds: float = 0.0
    # A remote model's ``Authorization`` header, sent instead of the client's key.
    authorization: bytes | None = None

    @classmethod
    def granted(
        cls, ticket: Ticket, slot: Slot, now: float, on_release: Callable[[Lease], None]
    ) -> Lease:
        """The lease for ``ticket`` on ``slot``'s ready backend (which counts it in flight)."""
        slot.leased()
        slot.last_client = ticket.client
        waited, url = now - ticket.enqueued, slot.config.backend_url
        lease = cls(ticket.instance, url, waited, ticket.position, slot, on_release)
        lease.authorization = slot.config.authorization()
        if slot.since > ticket.enqueued and slot.last_load_seconds:  # it became ready meanwhile
            lease.load_seconds = slot.last_load_seconds
        return lease

    def release(self) -> None:
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback(self)


@attrs.define(eq=False)
class Ticket:
    seq: int
    instance: str
    enqueued: float
    priority: int
    position: int
    key: str
    # Called when the waiter is cancelled (the client went away): the queue's one bound
    # method, so a waiting request holds no closure of its own.
    on_cancel: Callable[[Ticket], None]
    waiter: Deferred[Lease] = attrs.field(init=False)
    dropped: bool = False
    client: str | None = None  # who asks, when the request says

    def __attrs_post_init__(self) -> None:
        self.waiter = Deferred(self._cancelled)

    def _cancelled(self, _: Deferred[Lease]) -> None:
        self.on_cancel(self)

    def reject(self, err: errors.APIError) -> None:
        self.dropped = True
        if not self.waiter.called:
            self.waiter.errback(err)


class WaitingRoom:
    """Waiting tickets in arrival order, overall and per model: O(1) to add and remove.

    The policy never needs all of them: per model, the oldest few and the few of highest
    priority decide everything it does (see :meth:`sample`), so a decision costs the same with
    ten thousand waiting requests as with ten.
    """

    def __init__(self) -> None:
        self._all: dict[int, Ticket] = {}
        self._per: dict[str, dict[int, Ticket]] = {}
        self._priorities: dict[str, Counter[int]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Ticket]:
        return iter(list(self._all.values()))

    def add(self, ticket: Ticket) -> None:
        self._all[ticket.seq] = ticket
        self._per.setdefault(ticket.instance, {})[ticket.seq] = ticket
        self._priorities.setdefault(ticket.instance, Counter())[ticket.priority] += 1

    def remove(self, ticket: Ticket) -> bool:
        if self._all.pop(ticket.seq, None) is None:
            return False
        del self._per[ticket.instance][ticket.seq]
        priorities = self._priorities[ticket.instance]
        priorities[ticket.priority] -= 1
        if not priorities[ticket.priority]:
            del priorities[ticket.priority]
        return True

    def first(self) -> Ticket | None:
        return next(iter(self._all.values()), None)

    def oldest(self, n: int) -> list[Ticket]:
        return list(itertools.islice(self._all.values(), n))

    def get(self, seq: int) -> Ticket | None:
        return self._all.get(seq)

    def count(self, model: str) -> int:
        return len(self._per.get(model, ()))

    def take(self, model: str) -> list[Ticket]:
        tickets = list(self._per.get(model, {}).values())
        for ticket in tickets:
            self.remove(ticket)
        return tickets

    def models(self) -> list[str]:
        return [model for model, tickets in self._per.items() if tickets]

    def sample(self, model: str, n: int) -> list[Ticket]:
        """The ``n`` oldest and the ``n`` most urgent by priority: what the policy can use when
        the model has ``n - 1`` free slots (it admits at most that many, by age or priority,
        and looks at the best of the rest)."""
        tickets = self._per.get(model, {})
        chosen = {t.seq: t for t in itertools.islice(tickets.values(), n)}
        if len(self._priorities.get(model, ())) > 1:
            urgent = heapq.nsmallest(
                n, tickets.values(), key=lambda t: (-t.priority, t.enqueued, t.seq)
            )
            chosen.update((t.seq, t) for t in urgent)
        return list(chosen.values())


class RequestQueue:
    """The intake, the waiting room, the leases out, and the timer that expires waiters.

    ``queue_size`` and ``request_timeout`` are read from ``config()`` when needed (a reload
    changes them); ``on_left`` is called after waiting requests left without a lease (timed out,
    or their client went away), since that may change what the policy wants: a read-ahead
    nobody waits for any more stops.
    """

    def __init__(
        self, clock: IReactorTime, config: Callable[[], Config], on_left: Callable[[], None]
    ) -> None:
        self._clock = clock
        self._config = config
        self._on_left = on_left
        # Bounded by enter, which counts it together with the waiting room (the intake loop
        # empties it at once), so the bound follows queue_size across reloads.
        self._intake: DeferredQueue[Ticket] = DeferredQueue(backlog=1)
        self.waiting = WaitingRoom()
        self.leases: set[Lease] = set()
        self._seq = itertools.count()
        self.entered = -1  # the last ticket's seq
        self._drop_cancelled = self._drop  # bound once: every ticket shares it
        # Fires when the oldest waiting request reaches its timeout (see _expire).
        self._expiry: IDelayedCall | None = None

    def __len__(self) -> int:
        """Requests waiting, including those not yet taken from the intake."""
        return len(self.waiting) + len(self._intake.pending)

    def enter(self, model: str, priority: int, key: str, client: str | None = None) -> Ticket:
        """A ticket for a new request; 503 ``queue_full`` when the queue is at capacity."""
        waiting = len(self)
        capacity = self._config().queue_size
        if waiting >= capacity:
            raise errors.queue_full(capacity)
        seq = self.entered = next(self._seq)
        ticket = Ticket(
            seq, model, self._clock.seconds(), priority, waiting + 1, key, self._drop_cancelled
        )
        ticket.client = client
        self._intake.put(ticket)
        # Admitted at once (the common case) needs no timer; a waiting one is watched by the
        # one timer that serves every waiting request.
        if not ticket.waiter.called and self._expiry is None:
            self._expiry = self._clock.callLater(self._config().request_timeout, self._expire)
        return ticket

    def next(self) -> Deferred[Ticket]:
        """The next ticket from the intake."""
        return self._intake.get()

    def count(self, model: str) -> int:
        return self.waiting.count(model) + sum(
            1 for t in self._intake.pending if t.instance == model
        )

    def oldest(self, n: int) -> list[Ticket]:
        """The ``n`` oldest waiting requests, in arrival order (without sorting them all)."""
        return (self.waiting.oldest(n) + list(self._intake.pending))[:n]

    def admit(self, ticket: Ticket, lease: Lease) -> None:
        self.leases.add(lease)
        ticket.waiter.callback(lease)

    def returned(self, lease: Lease) -> None:
        self.leases.discard(lease)

    def reject(self, model: str, err: errors.APIError) -> None:
        """Answer every request waiting for ``model`` with ``err``."""
        for ticket in self.waiting.take(model):
            ticket.reject(err)

    def retime(self) -> None:
        """A new timeout applies to who waits now (a reload changed it)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expire()

    def close(self, err: errors.APIError) -> None:
        """Answer everybody waiting with ``err`` and stop the timer (the daemon stops)."""
        for ticket in [*self.waiting, *self._intake.pending]:
            ticket.reject(err)
        self.waiting = WaitingRoom()
        self._intake.pending.clear()
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def _expire(self) -> None:
        """Answer 504 to the requests that waited their timeout, and re-arm for the next.

        Waiting tickets are kept in arrival order and share one timeout, so the oldest expires
        first: one timer serves them all, where a timer per request would cost a delayed call
        and its closures for each of thousands of waiting requests.
        """
        self._expiry = None
        timeout = self._config().request_timeout
        now = self._clock.seconds()
        expired = False
        while (ticket := self.waiting.first()) is not None:
            deadline = ticket.enqueued + timeout
            if deadline > now:
                self._expiry = self._clock.callLater(deadline - now, self._expire)
                break
            self.waiting.remove(ticket)
            ticket.reject(
                errors.gateway_timeout(
                    f"Request for model '{ticket.instance}' waited {timeout:g} s "
                    "(request_timeout) for its backend and was dropped",
                    code="queue_timeout",
                )
            )
            expired = True
        if expired:
            self._on_left()

    def _drop(self, ticket: Ticket) -> None:
        ticket.dropped = True
        if self.waiting.remove(ticket):
            self._on_left()
            return
        if ticket in self._intake.pending:
            self._intake.pending.remove(ticket)
