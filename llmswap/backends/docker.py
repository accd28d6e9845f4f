"""Docker container backends (``container_name:`` models), as the original proxy ran them.

The user creates each container once (``docker create --name qwen3-server ... llama-server ...``);
llmswap only starts and stops it.  The Docker SDK is blocking, so every call runs in a thread
(``deferToThread``).  Threads only read the engine: each returns what it saw (:class:`Seen`)
and the reactor writes the backend's state from it, so nothing shared is written off the reactor.

While a container runs, a thread of its own follows the engine's event stream for it: an exit
by itself (OOM, crash) is noticed at once and reported with its exit code and log tail, and an
engine that goes away is reported as such (its models fail, naming it, rather than requests
meeting a refused port).  On daemon shutdown the container is left running by default, so a
restarted llmswap adopts the loaded model instead of reloading it for minutes
(``docker.stop_on_exit: true`` stops it instead).  Log follows (the console's live logs) block
for as long as they are read, so they get a small pool of their own and never take the threads
that swaps need.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
import requests
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from llmswap import errors
from llmswap.backends.container import Seen
from llmswap.backends.engine import DockerClientProvider
from llmswap.backends.stopping import StopRecord
from llmswap.backends.streams import Watch, close_stream
from llmswap.config.host import LOCAL
from llmswap.config.model import ModelConfig
from llmswap.interfaces import IBackend

log = Logger()

# Log follows one container may have open at once (console viewers, and a load's readiness
# wait); more wait for a thread, and a load whose follow waits is polled by the clock alone.
LOG_FOLLOWS = 4


@implementer(IBackend)
class DockerBackend:
    """A pre-created container, started and stopped by name."""

    def __init__(self, model: ModelConfig, provider: DockerClientProvider, reactor: Any) -> None:
        assert model.container_name is not None
        self.name = model.name
        self._model = model
        self._container_name: str = model.container_name
        self._provider = provider
        self._reactor = reactor
        self._running = False
        self._stopping = False
        self._engine_state: str = "unknown"
        self._exit_code: int | None = None
        self._log_tail = ""
        self._pid = 0  # the container's main process, when its engine is this host's
        self._lost: str | None = None  # why the engine was last unreachable
        self._exit_callback: Callable[[str], None] | None = None
        self._watch: Watch | None = None
        self._log_threads: ThreadPool | None = None  # started by the first log follow
        self._follows: set[Callable[[], None]] = set()
        self._killed = 0  # stops the engine ended with SIGKILL after stop_timeout
        self._stops = StopRecord()
        self._starting: Deferred[Any] | None = None  # the engine's start call, until it ends

    # -- IBackend -------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start the container; cancelling the result (llmswap stops) leaves the engine's call
        to finish, as it will anyway, and a stop after it waits for that call: a container
        the engine starts after its stop was sent would be left running, untracked."""
        work = self._in_thread(self._start_sync)

        def started(seen: Seen) -> None:
            self._note(seen)
            self._running = seen.running
            if not seen.running:
                raise errors.backend_unavailable(
                    f"Model '{self.name}': container '{self._container_name}' exited right "
                    f"after start: {self.failure_detail()}"
                )
            log.info("model {m}: started container {c}", m=self.name, c=self._container_name)
            self._watch_start()

        work.addCallback(started)
        self._starting = work
        result: Deferred[None] = Deferred()

        def ended(outcome: Any) -> None:
            if self._starting is work:
                self._starting = None
            if result.called:  # cancelled: nobody waits for the outcome but the log
                if isinstance(outcome, Failure):
                    log.warn("model {m}: start given up: {e}", m=self.name, e=outcome.value)
            elif isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(None)

        work.addBoth(ended)
        return result

    def stop(self) -> Deferred[None]:
        if self._starting is not None:  # a cancelled start: stop what it started, after it
            after: Deferred[None] = Deferred()
            self._starting.addBoth(lambda _: None if after.called else after.callback(None))
            return after.addCallback(lambda _: self.stop())
        self._watch_stop()
        self._stopping = True
        began = self._reactor.seconds()
        grace = self._stops.grace(self._model.stop_timeout)  # see backends/stopping.py
        again = None if grace is None else self._reactor.callLater(grace, self._ask_again)
        d = self._in_thread(self._stop_sync)

        def stopped(seen: Seen) -> None:
            self._note(seen)
            # The engine's SIGKILL after stop_timeout (137: killed by signal 9).
            took = self._reactor.seconds() - began
            if seen.exit_code == 137 and took >= int(max(1, self._model.stop_timeout)):
                self._killed += 1
            else:  # a stop the engine's SIGKILL ended says nothing of how long one takes
                self._stops.took.append(took)
            if seen.running:
                raise errors.backend_unavailable(
                    f"Model '{self.name}': container '{self._container_name}' still runs after stop"
                )
            self._running = False

        def done(result: Any) -> Any:
            self._stopping = False
            if again is not None and again.active():
                again.cancel()
            return result

        return d.addCallback(stopped).addBoth(done)

    def _ask_again(self) -> None:
        log.warn("model {m}: slow to stop; sending its stop signal again", m=self.name)
        self._stops.asked_again += 1
        self._in_thread(self._signal_sync).addErrback(
            lambda f: log.warn("model {m}: second stop signal: {e}", m=self.name, e=f.value)
        )

    def adopt(self) -> Deferred[bool]:
        d = self._in_thread(self._read_sync)

        def adopted(seen: Seen) -> bool:
            self._note(seen)
            self._running = seen.running
            if seen.running:
                self._watch_start()
            return seen.running

        return d.addCallback(adopted)

    def shutdown(self) -> Deferred[None]:
        for stop in list(self._follows):
            stop()
        threads, self._log_threads = self._log_threads, None
        # Joining the follows' threads may wait on the engine: not on the reactor.
        closed = self._in_thread(threads.stop) if threads is not None else succeed(None)
        if self._provider.engine.stop_on_exit:
            return closed.addCallback(lambda _: self.stop())
        self._watch_stop()
        if self._running:
            log.info(
                "model {model}: leaving container {c} running for the next llmswap to adopt",
                model=self.name,
                c=self._container_name,
            )
        return closed

    def alive(self) -> bool:
        return self._running

    def on_exit(self, callback: Callable[[str], None]) -> None:
        self._exit_callback = callback

    def pids(self) -> list[int]:
        local = self._provider.engine.local
        return [self._pid] if local and self._running and self._pid else []

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "kind": "docker",
            "container": self._container_name,
            "container_state": self._engine_state,
        }
        info["killed"], info["asked_again"] = self._killed, self._stops.asked_again
        if self._exit_code is not None:
            info["exit_code"] = self._exit_code
        if self._log_tail:
            info["output"] = self._log_tail.splitlines()
        if self._provider.lost is not None:
            info["engine_error"] = self._provider.lost
        return info

    def failure_detail(self) -> str:
        if self._lost is not None:
            return self._lost
        engine = self._provider.engine
        on = "" if engine.host == LOCAL else f" on host {engine.host}"
        detail = f"container {self._container_name}{on} is {self._engine_state}"
        if self._exit_code is not None:
            detail += f" (exit code {self._exit_code})"
        return detail

    def output(self, lines: int) -> Deferred[list[str]]:
        def read() -> list[str]:
            raw = self._container().logs(tail=lines)
            return str(raw.decode("utf-8", "replace")).splitlines()

        d: Deferred[list[str]] = self._in_thread(read)
        return d

    def follow(self, line: Callable[[str], None]) -> Callable[[], None]:
        """The engine's log stream, read in a thread of the follows' own pool until stopped
        (the stream is closed, which ends the thread's read)."""
        stopped = threading.Event()
        streams: list[Any] = []
        if self._log_threads is None:
            self._log_threads = ThreadPool(0, LOG_FOLLOWS, name=f"docker-logs-{self.name}")
            self._log_threads.start()
        pool = self._log_threads

        def read() -> None:
            stream = self._container().logs(stream=True, follow=True, tail=0)
            streams.append(stream)
            if stopped.is_set():  # stopped while it opened: ``stop`` did not see it
                close_stream(stream)
                return
            partial = b""
            for chunk in stream:
                if stopped.is_set():
                    break
                *complete, partial = (partial + chunk).split(b"\n")
                for raw in complete:
                    self._reactor.callFromThread(line, raw.decode("utf-8", "replace"))

        def stop() -> None:
            self._follows.discard(stop)
            stopped.set()
            for stream in streams:
                close_stream(stream)

        def failed(f: Failure) -> None:
            if not stopped.is_set():
                log.warn("{m}: log stream: {e}", m=self.name, e=f.value)

        self._follows.add(stop)
        self._in_thread(read, pool).addErrback(failed)
        return stop

    # -- blocking parts: they read the engine in a thread and return what they saw ----------

    def _in_thread(self, fn: Callable[[], Any], pool: ThreadPool | None = None) -> Deferred[Any]:
        d = deferToThreadPool(self._reactor, pool or self._reactor.getThreadPool(), fn)
        return d.addBoth(self._provider.witness)

    def _container(self) -> Any:
        client = self._provider.get()
        try:
            container = client.containers.get(self._container_name)
        except docker.errors.NotFound:
            raise errors.backend_unavailable(
                f"Model '{self.name}': container '{self._container_name}' does not exist. Create "
                f"it first, e.g. `docker create --name {self._container_name} ... llama-server ...`"
            ) from None
        except (docker.errors.DockerException, requests.RequestException) as e:
            raise self._provider.unreachable(e) from None  # requests': no connection at all
        return container

    def _start_sync(self) -> Seen:
        container = self._container()
        try:
            container.start()
            container.reload()
        except docker.errors.APIError as e:
            raise errors.backend_unavailable(
                f"Model '{self.name}': container '{self._container_name}' failed to start: "
                f"{e.explanation or e}"
            ) from None
        return Seen.of(container, tail=True)

    def _stop_sync(self) -> Seen:
        container = self._container()
        timeout = self._model.stop_timeout
        try:
            # The engine sends SIGTERM, waits `timeout` s, then SIGKILLs; wait() confirms exit.
            container.stop(timeout=int(max(1, timeout)))
            container.wait(timeout=int(timeout) + 30, condition="not-running")
            container.reload()
        except docker.errors.APIError as e:
            raise errors.backend_unavailable(
                f"Model '{self.name}': could not stop container '{self._container_name}': "
                f"{e.explanation or e}"
            ) from None
        except Exception as e:  # requests' ReadTimeout: the engine did not confirm in time
            raise errors.backend_unavailable(
                f"Model '{self.name}': container '{self._container_name}' did not stop: {e}"
            ) from None
        return Seen.of(container)

    def _signal_sync(self) -> None:
        container = self._container()
        try:
            container.kill(signal=container.attrs["Config"].get("StopSignal") or "SIGTERM")
        except docker.errors.APIError:  # it stopped meanwhile
            pass

    def _read_sync(self) -> Seen:
        return Seen.of(self._container(), tail=True)

    def _note(self, seen: Seen) -> None:
        """On the reactor: the backend's view of its container becomes what a thread saw."""
        self._lost = None
        self._engine_state = seen.status
        self._exit_code = seen.exit_code
        self._pid = seen.pid
        if seen.log_tail is not None:
            self._log_tail = seen.log_tail

    # -- exit watcher -------------------------------------------------------------------------

    def _watch_start(self) -> None:
        if self._watch is None:
            self._watch = Watch()
            thread = threading.Thread(
                target=self._follow, args=(self._watch,), name=f"docker-events-{self.name}",
                daemon=True,
            )  # fmt: skip
            thread.start()

    def _watch_stop(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self._watch = None

    def _follow(self, watch: Watch) -> None:
        """In its own thread (it blocks for as long as the container runs): the engine's
        ``die`` events for this container.  What it saw goes to the reactor; ``None``: the
        engine, not the container, went away."""
        seen: Seen | None = None
        why = "its event stream ended"
        try:
            stream = self._provider.get().events(
                decode=True,
                filters={"type": "container", "container": self._container_name, "event": "die"},
            )
            watch.stream = stream
            seen = self._read_sync()  # a death before the subscription
            if seen.running and not watch.closed:
                seen = None
                for _ in stream:
                    seen = self._read_sync()
                    break
        except Exception as e:
            seen, why = None, str(e)
        if not watch.closed:
            self._reactor.callFromThread(self._followed, watch, seen, why)

    def _followed(self, watch: Watch, seen: Seen | None, why: str) -> None:
        if watch is not self._watch or self._stopping or not self._running:
            return
        self._watch = None
        if seen is not None:
            self._note(seen)
            if seen.running:  # died and was started again by someone: keep watching
                self._watch_start()
                return
        self._running = False
        if seen is None:
            self._engine_state = "unknown"
            self._lost = f"Docker engine at {self._provider.engine.where} unreachable: {why}"
            self._provider.lost = self._lost
        reason = self.failure_detail()
        log.warn("model {model}: {reason}", model=self.name, reason=reason)
        if self._exit_callback is not None:
            self._exit_callback(reason)
