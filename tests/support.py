"""Shared helpers for tests: free ports, fake-backend model entries, an in-process daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import attrs
import openai
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from bench.harness import free_port as free_port  # re-exported: one picker of ports
from bench.harness import free_ports as free_ports
from llmswap.config.config import Config, parse
from llmswap.service import LLMSwapService, make_service

FAKE = str(Path(__file__).with_name("fakebackend.py"))


# fake_model options that are llmswap model settings rather than fakebackend.py flags.
_SETTINGS = (
    *("concurrency", "ttl", "memory", "device", "max_wait_before_swap", "drain_timeout"),
    *("info", "sleep", "files", "prefetch"),
)


def fake_model(name: str, ledger: str | None = None, **opts: Any) -> dict[str, Any]:
    """A config entry running tests/fakebackend.py; other ``opts`` become its flags."""
    port = opts.pop("port", None) or free_port()
    cmd = [sys.executable, FAKE, "--port", str(port), "--name", name]
    if ledger:
        cmd += ["--ledger", ledger]
    entry: dict[str, Any] = {
        "backend_url": f"http://127.0.0.1:{port}/v1",
        "startup_timeout": opts.pop("startup_timeout", 20),
        "stop_timeout": opts.pop("stop_timeout", 5),
    }
    entry.update({key: opts.pop(key) for key in _SETTINGS if key in opts})
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        else:
            cmd += [flag, str(value)]
    entry["cmd"] = cmd
    return entry


def fake_nvml(directory: Path) -> Path:
    """Build tests/fakenvml.c as ``directory/libnvidia-ml.so.1``: put ``directory`` in a
    process's ``LD_LIBRARY_PATH`` and NVML there is the fake device of ``$FAKE_NVML_DIR``."""
    library = directory / "libnvidia-ml.so.1"
    source = Path(__file__).with_name("fakenvml.c")
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-Wl,-soname,libnvidia-ml.so.1",
         "-o", str(library), str(source)],
        check=True, timeout=60,
    )  # fmt: skip
    return library


def wait_answering(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 30, log: Path | None = None
) -> None:
    """Wait until ``url`` answers 2xx (a 503 while loading is not yet) while ``proc`` lives;
    its ``log`` (or piped output) is the failure's message if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = log.read_text() if log else proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"{proc.args!r} exited: {said}")
        try:
            urllib.request.urlopen(url, timeout=10).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout:g} s")


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """Stop a daemon started as users start it: SIGTERM (a clean shutdown), SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_ledger(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def in_thread(pool: ThreadPool, f: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
    """``f`` in one of a test's own client threads: in real life clients are other processes,
    and the reactor's pool is the daemon's (name resolution, Docker calls)."""
    return deferToThreadPool(cast(IReactorFromThreads, reactor), pool, f, *args, **kw)


def signal_backend(ledger: str, name: str, signum: int) -> None:
    """Send ``signum`` to the fake backend ``name`` started last (SIGUSR1 crashes it, SIGUSR2
    closes its port): the test says when a backend fails, no timer races the test's own steps."""
    pid = [e["pid"] for e in read_ledger(ledger) if e["event"] == "start" and e["name"] == name]
    os.kill(pid[-1], signum)


class Daemon:
    """llmswap running in this process on a loopback port, on the test's reactor."""

    def __init__(self, models: dict[str, Any], log_dir: str, **globals_: Any) -> None:
        raw = {"listen": "tcp:0:interface=127.0.0.1", "log_dir": log_dir, "models": models}
        raw.update(globals_)
        self.config = parse(raw)
        self.service: LLMSwapService = make_service(self.config, reactor)

    @classmethod
    def from_config(cls, config: Config, log_dir: str) -> Daemon:
        self = cls.__new__(cls)
        self.config = attrs.evolve(config, listen="tcp:0:interface=127.0.0.1", log_dir=log_dir)
        self.service = make_service(self.config, reactor)
        return self

    def start(self) -> None:
        self.service.startService()
        assert self.service.web.port is not None
        self.port = cast(IPv4Address, self.service.web.port.getHost()).port
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> Deferred[None]:
        """Stop it (a test may stop it early; the cleanup's second call does nothing)."""
        if not self.service.running:
            return succeed(None)
        d: Deferred[None] = self.service.stopService()
        return d

    def client(self, timeout: float = 30.0) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=timeout
        )


# The anthropic client has no temperature parameter any more; the Messages API still takes it.
GREEDY = {"temperature": 0}


def anthropic_stream(client: Any, model: str, messages: Any) -> tuple[list[str], str]:
    """A streamed Messages API call through the ``anthropic`` client (blocking, greedy so a
    small model's answer is the same every time): the event types in order, and the final
    message's text."""
    with client.messages.stream(
        model=model, max_tokens=24, messages=messages, extra_body=GREEDY
    ) as stream:
        kinds = [event.type for event in stream]
        return kinds, stream.get_final_message().content[0].text


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` (plain or returning a Deferred) until true; fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not (yield maybeDeferred(predicate)):
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        yield sleep(interval)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
