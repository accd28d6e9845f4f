"""The connection to one Docker engine, shared by the container backends placed on it.

The SDK client is built on first use, in a thread, under a lock (pool threads and event watchers
all ask for it).  Whether the engine answered is written on the reactor only
(:meth:`DockerClientProvider.witness`), from the outcome each thread returns; a thread that finds
no engine raises :class:`EngineLost`, whose error names the engine and the likely fix.
"""

from __future__ import annotations

import threading
from typing import Any

import docker
import docker.errors
import docker.tls
import requests
from twisted.python.failure import Failure

from llmswap import errors
from llmswap.config.host import DockerEngine

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


class EngineLost(Exception):
    """Raised in a thread when the engine does not answer; the reactor records it."""

    def __init__(self, error: errors.APIError) -> None:
        super().__init__(error.message)
        self.error = error


class DockerClientProvider:
    """One lazily created Docker SDK client shared by all container backends of an engine."""

    def __init__(self, engine: DockerEngine) -> None:
        self.engine = engine
        self._client: Any = None
        self._creating = threading.Lock()  # pool threads and event watchers all ask for it
        # Why the engine did not answer its last call; None: it did (its host's /health).
        # Written on the reactor only (:meth:`witness`).
        self.lost: str | None = None

    def get(self) -> Any:
        """Called in a thread; the first caller builds the client, the others wait for it."""
        with self._creating:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Any:
        engine, timeout = self.engine, int(self.engine.timeout)
        try:
            if engine.tls is not None:
                tls = engine.tls
                config = docker.tls.TLSConfig(
                    client_cert=(tls.cert, tls.key), ca_cert=tls.ca, verify=True
                )
                client = docker.DockerClient.__new__(docker.DockerClient)
                client.api = _OwnCA(base_url=engine.base_url, tls=config, timeout=timeout)
            elif engine.base_url:
                # ssh:// through the system's ssh (its keys and config, as the docker CLI
                # does); the SDK still needs its ssh extra (paramiko) to open ssh:// at all.
                ssh = engine.base_url.startswith("ssh://")
                client = docker.DockerClient(
                    base_url=engine.base_url, use_ssh_client=ssh, timeout=timeout
                )
            else:
                client = docker.from_env(timeout=timeout)
            client.ping()
        except (docker.errors.DockerException, requests.RequestException) as e:
            raise self.unreachable(e) from None
        return client

    def unreachable(self, e: Exception) -> EngineLost:
        """In a thread: the exception to raise for an engine that did not answer."""
        return EngineLost(_engine_error(self.engine, e))

    def witness(self, result: Any) -> Any:
        """On the reactor, the outcome of a thread's calls: did the engine answer?"""
        if isinstance(result, Failure) and isinstance(result.value, EngineLost):
            self.lost = result.value.error.message
            return Failure(result.value.error)
        self.lost = None
        return result
