"""Docker container backends (``container_name:`` models), as the original proxy ran them.

The user creates each container once (``docker create --name qwen3-server ... llama-server ...``);
llmswap only starts and stops it.  The Docker SDK is blocking, so every call runs in a thread
(``deferToThread``).  While a container runs, a thread of its own follows the engine's event
stream for it: an exit by itself (OOM, crash) is noticed at once and reported with its exit code
and log tail, and an engine that goes away is reported as such (its models fail, naming it,
rather than requests meeting a refused port).  On daemon shutdown the container is left
running by default, so a restarted llmswap adopts the loaded model instead of reloading it for
minutes (``docker.stop_on_exit: true`` stops it instead).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
import docker.tls
import requests
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llmswap import errors
from llmswap.config.host import LOCAL, DockerEngine
from llmswap.config.model import ModelConfig
from llmswap.interfaces import IBackend

log = Logger()

_SOCKET_HINT = (
    "Is dockerd running? When llmswap itself runs in a container, mount the socket with "
    "-v /var/run/docker.sock:/var/run/docker.sock (or set docker.base_url / DOCKER_HOST)."
)


def _engine_error(engine: DockerEngine, e: Exception) -> errors.APIError:
    where = engine.where
    text = str(e)
    if "Permission denied" in text or "PermissionError" in text:
        return errors.backend_unavailable(
            f"Permission denied on the Docker engine socket at {where}: run llmswap as root or "
            "as a user in the socket's group (usually 'docker'); in a container, mount "
            "-v /var/run/docker.sock:/var/run/docker.sock and add "
            "--group-add $(stat -c %g /var/run/docker.sock)."
        )
    return errors.backend_unavailable(
        f"Cannot reach the Docker engine at {where}: {text}. {_SOCKET_HINT}"
    )


class _OwnCA(docker.APIClient):  # type: ignore[misc]
    """An engine client that verifies the engine against the configured CA only.

    requests lets ``REQUESTS_CA_BUNDLE`` (set on many hosts) replace a session's own CA for each
    request (psf/requests#3829), so the engine's certificate would be checked against the
    system's CAs and fail.  The environment's settings are off from the first request (the
    version check in the constructor); a Docker engine needs none of them.
    """

    def _retrieve_server_version(self) -> str:
        self.trust_env = False
        return str(super()._retrieve_server_version())


class DockerClientProvider:
    """One lazily created Docker SDK client shared by all container backends."""

    def __init__(self, engine: DockerEngine) -> None:
        self.engine = engine
        self._client: Any = None
        # Why the engine did not answer its last call; None: it did (its host's /health).
        self.lost: str | None = None

    def get(self) -> Any:
        """Called in a worker thread."""
        if self._client is None:
            try:
                tls = self.engine.tls
                if tls is not None:
                    config = docker.tls.TLSConfig(client_cert=(tls.cert, tls.key),
                                                  ca_cert=tls.ca, verify=True)  # fmt: skip
                    client = docker.DockerClient.__new__(docker.DockerClient)
                    client.api = _OwnCA(base_url=self.engine.base_url, tls=config,
                                        timeout=int(self.engine.timeout))  # fmt: skip
                elif self.engine.base_url:
                    # ssh:// through the system's ssh (its keys and config, as the docker CLI
                    # does); the SDK still needs its ssh extra (paramiko) to open ssh:// at all.
                    ssh = self.engine.base_url.startswith("ssh://")
                    client = docker.DockerClient(base_url=self.engine.base_url, use_ssh_client=ssh,
                                                 timeout=int(self.engine.timeout))  # fmt: skip
                else:
                    client = docker.from_env(timeout=int(self.engine.timeout))
                client.ping()
            except (docker.errors.DockerException, requests.RequestException) as e:
                raise self.unreachable(e) from None
            self._client = client
        return self._client

    def unreachable(self, e: Exception) -> errors.APIError:
        error = _engine_error(self.engine, e)
        self.lost = error.message
        return error


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
        self._lost: str | None = None  # why the engine was last unreachable
        self._exit_callback: Callable[[str], None] | None = None
        self._watch: _Watch | None = None

    # -- IBackend -------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        d = self._in_thread(self._start_sync)
        d.addCallback(lambda _: self._watch_start())
        return d

    def stop(self) -> Deferred[None]:
        self._watch_stop()
        self._stopping = True
        d = self._in_thread(self._stop_sync)

        def done(result: Any) -> Any:
            self._stopping = False
            if not isinstance(result, Failure):
                self._running = False
            return result

        d.addBoth(done)
        return d

    def adopt(self) -> Deferred[bool]:
        d: Deferred[bool] = self._in_thread(self._adopt_sync)

        def adopted(running: bool) -> bool:
            if running:
                self._watch_start()
            return running

        d.addCallback(adopted)
        return d

    def shutdown(self) -> Deferred[None]:
        if self._provider.engine.stop_on_exit:
            return self.stop()
        self._watch_stop()
        if self._running:
            log.info(
                "model {model}: leaving container {c} running for the next llmswap to adopt",
                model=self.name,
                c=self._container_name,
            )
        return succeed(None)

    def alive(self) -> bool:
        return self._running

    def on_exit(self, callback: Callable[[str], None]) -> None:
        self._exit_callback = callback

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "kind": "docker",
            "container": self._container_name,
            "container_state": self._engine_state,
        }
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

        return self._in_thread(read)

    def follow(self, line: Callable[[str], None]) -> Callable[[], None]:
        """The engine's log stream, read in a pool thread until stopped (the stream is closed,
        which ends the thread's read)."""
        stopped = threading.Event()
        streams: list[Any] = []

        def read() -> None:
            stream = self._container().logs(stream=True, follow=True, tail=0)
            streams.append(stream)
            partial = b""
            for chunk in stream:
                if stopped.is_set():
                    break
                *complete, partial = (partial + chunk).split(b"\n")
                for raw in complete:
                    self._reactor.callFromThread(line, raw.decode("utf-8", "replace"))

        def stop() -> None:
            stopped.set()
            for stream in streams:
                stream.close()

        self._in_thread(read).addErrback(
            lambda f: (
                None
                if stopped.is_set()
                else log.warn("{m}: log stream: {e}", m=self.name, e=f.value)
            )
        )
        return stop

    # -- blocking parts, run in the reactor's thread pool -----------------------------------

    def _in_thread(self, fn: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), fn)

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
        self._provider.lost = None
        return container

    def _start_sync(self) -> None:
        container = self._container()
        try:
            container.start()
            container.reload()
        except docker.errors.APIError as e:
            raise errors.backend_unavailable(
                f"Model '{self.name}': container '{self._container_name}' failed to start: "
                f"{e.explanation or e}"
            ) from None
        self._note(container)
        self._running = container.status == "running"
        if not self._running:
            raise errors.backend_unavailable(
                f"Model '{self.name}': container '{self._container_name}' exited right after "
                f"start: {self.failure_detail()}"
            )
        log.info("model {model}: started container {c}", model=self.name, c=self._container_name)

    def _stop_sync(self) -> None:
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
        self._note(container)
        if container.status == "running":
            raise errors.backend_unavailable(
                f"Model '{self.name}': container '{self._container_name}' still runs after stop"
            )

    def _adopt_sync(self) -> bool:
        container = self._container()
        self._note(container)
        self._running = container.status == "running"
        return self._running

    def _inspect_sync(self) -> str:
        container = self._container()
        self._note(container)
        if container.status != "running":
            tail = container.logs(tail=8).decode("utf-8", "replace").rstrip()
            self._log_tail = tail
        return str(container.status)

    def _note(self, container: Any) -> None:
        self._lost = None
        self._engine_state = str(container.status)
        state = container.attrs.get("State", {})
        if container.status != "running":
            self._exit_code = state.get("ExitCode")
        else:
            self._exit_code = None

    # -- exit watcher -------------------------------------------------------------------------

    def _watch_start(self) -> None:
        if self._watch is None:
            self._watch = _Watch()
            thread = threading.Thread(
                target=self._follow, args=(self._watch,), name=f"docker-events-{self.name}",
                daemon=True,
            )  # fmt: skip
            thread.start()

    def _watch_stop(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self._watch = None

    def _follow(self, watch: _Watch) -> None:
        """In its own thread (it blocks for as long as the container runs): the engine's
        ``die`` events for this container; the outcome goes to the reactor."""
        why = "its event stream ended"
        try:
            stream = self._provider.get().events(
                decode=True,
                filters={"type": "container", "container": self._container_name, "event": "die"},
            )
            watch.stream = stream
            status = self._inspect_sync()  # a death before the subscription
            if status == "running" and not watch.closed:
                for _ in stream:
                    status = self._inspect_sync()
                    break
                else:
                    status = _ENGINE
        except Exception as e:
            status, why = _ENGINE, str(e)
        if not watch.closed:
            self._reactor.callFromThread(self._followed, watch, status, why)

    def _followed(self, watch: _Watch, status: str, why: str) -> None:
        if watch is not self._watch or self._stopping or not self._running:
            return
        self._watch = None
        if status == "running":  # died and was started again by someone: keep watching
            self._watch_start()
            return
        self._running = False
        if status is _ENGINE:
            self._engine_state = "unknown"
            self._lost = f"Docker engine at {self._provider.engine.where} unreachable: {why}"
            self._provider.lost = self._lost
        reason = self.failure_detail()
        log.warn("model {model}: {reason}", model=self.name, reason=reason)
        if self._exit_callback is not None:
            self._exit_callback(reason)


_ENGINE = "engine unreachable"  # the watch's outcome when the engine, not the container, went


class _Watch:
    """One container's event stream being followed; closing it ends the thread's read."""

    def __init__(self) -> None:
        self.stream: Any = None
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.stream is not None:
            self.stream.close()
