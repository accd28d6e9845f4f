"""Sleep mode: release a backend's device memory while its process lives, and take it back.

vLLM (``POST /sleep?level=N``, ``POST /wake_up``, ``GET /is_sleeping``), SGLang
(``POST /release_memory_occupation``, ``POST /resume_memory_occupation``) and any server with
equivalent URLs.  A wake skips the process start and, at level 1, the read of the weights: a
fraction of a second where a cold start takes a minute.

A sleep counts only once confirmed: vLLM's ``/sleep`` may answer before the engine finished,
so where there is a status URL it is polled until it says so.  The GPU-safety promise (the next
model starts only after the one it replaces released its memory) rests on that confirmation;
a sleep that is not confirmed within ``sleep.timeout`` raises, and the slot stops the process.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from llmswap.config.model import Sleep
from llmswap.errors import quote
from llmswap.interfaces import BackendHTTP, BackendResponse

JSON = {b"Content-Type": [b"application/json"]}


class SleepFailed(Exception):
    """The backend did not confirm a sleep or a wake in time; the message says what it did."""


@inlineCallbacks
def _post(
    clock: IReactorTime, http: BackendHTTP, url: str, timeout: float
) -> Generator[Deferred[Any], Any, None]:
    d = http.post(url, data=b"{}", headers=JSON)
    d.addTimeout(timeout, clock)
    try:
        response: BackendResponse = yield d
        body = yield response.content()
    except CancelledError:
        raise
    except Exception as e:
        raise SleepFailed(f"POST {url} failed: {e}") from None
    if not 200 <= response.code < 300:
        text = body.decode("utf-8", "replace")
        raise SleepFailed(f"POST {url} answered {response.code}: {quote(text)}")


@inlineCallbacks
def _sleeping(
    clock: IReactorTime, http: BackendHTTP, url: str, timeout: float
) -> Generator[Deferred[Any], Any, bool | None]:
    """What the status URL says (``is_sleeping``), or None when it says nothing usable."""
    d = http.get(url)
    d.addTimeout(timeout, clock)
    try:
        response: BackendResponse = yield d
        body = yield response.content()
        value = json.loads(body)["is_sleeping"]
    except CancelledError:
        raise
    except Exception:
        return None
    return value if isinstance(value, bool) else None


@inlineCallbacks
def _switch(
    clock: IReactorTime,
    http: BackendHTTP,
    sleep: Sleep,
    asleep: bool,
    timeout: float,
    interval: float,
) -> Generator[Deferred[Any], Any, None]:
    deadline = clock.seconds() + timeout
    url = sleep.sleep_url if asleep else sleep.wake_url
    yield _post(clock, http, url, timeout)
    if sleep.status_url is None:
        return None
    while True:
        remaining = deadline - clock.seconds()
        if remaining <= 0:
            state = "asleep" if asleep else "awake"
            raise SleepFailed(f"{sleep.status_url} did not say {state} within {timeout:g} s")
        if (yield _sleeping(clock, http, sleep.status_url, remaining)) is asleep:
            return None
        yield deferLater(clock, min(interval, remaining), lambda: None)


def put_to_sleep(clock: IReactorTime, http: BackendHTTP, sleep: Sleep, interval: float) -> Any:
    """Fires once the backend confirmed it released its device memory."""
    return _switch(clock, http, sleep, True, sleep.timeout, interval)


def wake(
    clock: IReactorTime, http: BackendHTTP, sleep: Sleep, timeout: float, interval: float
) -> Any:
    """Fires once the backend says it is awake (its readiness is checked after)."""
    return _switch(clock, http, sleep, False, timeout, interval)


def is_asleep(clock: IReactorTime, http: BackendHTTP, sleep: Sleep) -> Any:
    """At start-up: does an adopted backend say it is asleep?  None: it cannot tell."""
    if sleep.status_url is None:
        return succeed(None)
    return _sleeping(clock, http, sleep.status_url, 5.0)
