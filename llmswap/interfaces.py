"""The pluggable parts' contracts.

- :class:`IBackend`, between the swap manager and a backend driver (process, Docker
  container): the manager only ever asks a backend to start, to stop (and to say when it is
  really gone), and whether it is still alive; everything driver-specific (process groups,
  container ids, log capture) stays behind it, so a new kind of backend is one new module.
- :class:`IAnswerWriter`, between the relay and an API whose answers are not the backend's
  bytes (Ollama's): the relay hands it the backend's answer as it arrives.
- :class:`BackendHTTP`, what the swap machinery asks of an HTTP client for a backend's control
  routes (health, sleep, ``/props``): treq's ``HTTPClient``, or :mod:`llmswap.testing`'s
  in-memory one.  A structural type (treq's class cannot declare a zope interface).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class IBackend(Interface):
    """One model's inference server, which llmswap can start and stop."""

    name: str = Attribute("The model name this backend serves.")

    def start() -> Deferred[None]:
        """Launch the server; fires once it was launched (not once it is healthy).

        Fails with an :class:`llmswap.errors.APIError` whose message tells the user what to fix.
        """

    def stop() -> Deferred[None]:
        """Stop the server; fires only once it is confirmed gone (never fails for 'not running')."""

    def adopt() -> Deferred[bool]:
        """At daemon start: is the server already running (left by a previous llmswap)?

        If so, track it as running and fire True; the manager then decides to keep or stop it.
        """

    def shutdown() -> Deferred[None]:
        """At daemon stop: stop the server, or leave it to be adopted if the driver can."""

    def alive() -> bool:
        """Whether the server is (as far as the driver knows) running right now."""

    def on_exit(callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` when the server exits without being asked to stop."""

    def pids() -> list[int]:
        """The host processes at the root of the running server (its memory is theirs and
        their children's, as :mod:`llmswap.memory` measures it); empty when it does not run
        here or not at all."""

    def describe() -> dict[str, Any]:
        """Driver-specific facts for admins' ``GET /health`` (pid, container state, last exit,
        its last output lines...)."""

    def failure_detail() -> str:
        """A short human explanation of why the server last died (its exit code; never its
        output, which may hold users' prompts: clients see this)."""

    def output(lines: int) -> Deferred[list[str]]:
        """The last ``lines`` lines the server printed (its log file, the engine's log)."""

    def follow(line: Callable[[str], None]) -> Callable[[], None]:
        """Call ``line(text)`` for each line the server prints from now on (in the reactor
        thread); returns the function that stops it."""


class IAnswerWriter(Interface):
    """Writes a backend's answer to the client in another API's form, as it arrives."""

    def start(code: int, headers: Any) -> None:
        """The backend's status and headers (``twisted.web.http_headers.Headers``)."""

    def data(chunk: bytes) -> None:
        """The next bytes of the backend's body."""

    def end() -> None:
        """The backend's body is complete: write what is left."""

    def fail(reason: str, status: int) -> None:
        """The backend's body broke off after ``start`` (``reason``: why): end the answer with
        an error; ``status`` (502, or 504 for silence) where nothing of it was sent yet."""


class BackendResponse(Protocol):
    """A control route's answer, as treq's response gives it."""

    @property
    def code(self) -> int: ...

    def collect(self, collector: Callable[[bytes], None]) -> Deferred[None]: ...

    def content(self) -> Deferred[bytes]: ...

    def deliverBody(self, protocol: Any) -> None: ...


class BackendHTTP(Protocol):
    """GET and POST to a backend's control routes."""

    def get(self, url: str) -> Deferred[Any]: ...

    def post(self, url: str, *, data: bytes, headers: Any) -> Deferred[Any]: ...
