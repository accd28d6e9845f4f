"""Container backends against a real Docker engine (started by `make docker-up`).

No registry is reachable, so the image is an empty rootfs made with `docker import`; the host's
system directories, Python and this repository are bind-mounted read-only, and containers share the
host's network (ports on 127.0.0.1) and PID namespace (so every fake backend's /proc watchdog, and
ours, sees all of them).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
import treq
import yaml
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from llmswap.backends.docker import DockerBackend
from llmswap.backends.engine import DockerClientProvider
from llmswap.config.config import parse
from tests.fakebackend import live_peers
from tests.support import (
    FAKE,
    HI,
    Daemon,
    free_port,
    in_thread,
    read_ledger,
    samples,
    wait_for,
)
from tests.test_twistd import TWISTD, wait_listening

pytestmark = pytest.mark.docker

IMAGE = "llmswap-test-rootfs:latest"
ROOT = Path(__file__).resolve().parent.parent


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=120
    )


def ensure_image(*engine: str) -> None:
    if docker(*engine, "image", "inspect", IMAGE, check=False).returncode == 0:
        return
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w").close()
    subprocess.run(
        ["docker", *engine, "import", "-", IMAGE], input=empty.getvalue(), check=True,
        capture_output=True,
    )  # fmt: skip


# The second engine (tests/tools/docker-second-up.sh): TCP with TLS client verification.
SECOND_URL = "tcp://127.0.0.1:23761"
CERTS = "/tmp/llmswap-docker2/certs"
SECOND = ("--host", SECOND_URL, "--tlsverify", "--tlscacert", f"{CERTS}/ca.pem",
          "--tlscert", f"{CERTS}/cert.pem", "--tlskey", f"{CERTS}/key.pem")  # fmt: skip
SECOND_TLS = {"ca": f"{CERTS}/ca.pem", "cert": f"{CERTS}/cert.pem", "key": f"{CERTS}/key.pem"}


def host_mounts(*extra: str) -> list[str]:
    dirs = {"/usr", "/lib", "/lib64", "/bin", sys.base_prefix, sys.prefix, str(ROOT), *extra}
    args: list[str] = []
    for d in sorted(dirs):
        if os.path.exists(d):
            args += ["-v", f"{d}:{d}:ro" if d not in extra else f"{d}:{d}"]
    return args


class DockerTestCase(unittest.TestCase):
    timeout = 180
    engine: tuple[str, ...] = ()  # the docker CLI's flags for the engine the case uses

    def setUp(self) -> None:
        ensure_image(*self.engine)
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.ledger = os.path.join(self.tmp, "ledger")
        self.prefix = f"llmswap-test-{uuid.uuid4().hex[:8]}"
        self.threads = ThreadPool(minthreads=0, maxthreads=8, name="test-clients")
        self.threads.start()
        self.addCleanup(self.threads.stop)
        self.addCleanup(self.remove_containers)

    def remove_containers(self) -> None:
        names = docker(*self.engine, "ps", "-aq", "--filter", f"name={self.prefix}").stdout.split()
        if names:
            docker(*self.engine, "rm", "-f", *names, check=False)

    def create(self, name: str, *fake_args: str) -> dict[str, Any]:
        """`docker create` a fake backend container; return its llmswap model entry."""
        port = free_port()
        container = f"{self.prefix}-{name}"
        docker(
            *self.engine, "create", "--name", container, "--network", "host", "--pid", "host",
            *host_mounts(self.tmp), IMAGE,
            sys.executable, FAKE, "--port", str(port), "--name", name,
            "--ledger", self.ledger, *fake_args,
        )  # fmt: skip
        return {
            "container_name": container,
            "backend_url": f"http://127.0.0.1:{port}/v1",
            "health_url": f"http://127.0.0.1:{port}/health",
            "startup_timeout": 30,
            "stop_timeout": 3,
        }

    def daemon(self, models: dict[str, Any], **globals_: Any) -> Daemon:
        d = Daemon(models, os.path.join(self.tmp, "logs"), **globals_)
        d.start()
        self.addCleanup(d.stop)
        return d

    def chat(self, daemon: Daemon, model: str) -> Any:
        client = daemon.client()
        return in_thread(self.threads, client.chat.completions.create, model=model, messages=HI)

    @inlineCallbacks
    def swap_twice(self, **settings: Any) -> Any:
        """alpha, beta, alpha through a daemon: one container at a time (the ledger says so
        from the real processes), the evicted one exited."""
        models = {"alpha": self.create("alpha"), "beta": self.create("beta")}
        d = self.daemon(models, **settings)
        for name in ("alpha", "beta", "alpha"):
            r = yield self.chat(d, name)
            self.assertEqual(r.choices[0].message.content, f"Hello from {name}")
        self.assertEqual(self.starts(), ["alpha", "beta", "alpha"])
        self.assertEqual([e for e in read_ledger(self.ledger) if e["event"] == "overlap"], [])
        self.assertEqual(self.state(models["alpha"]["container_name"]), "running")
        self.assertEqual(self.state(models["beta"]["container_name"]), "exited")
        return models, d

    def starts(self) -> list[str]:
        return [e["name"] for e in read_ledger(self.ledger) if e["event"] == "start"]

    def state(self, container: str) -> str:
        return docker(*self.engine, "inspect", "-f", "{{.State.Status}}", container).stdout.strip()


class DockerBackendTests(DockerTestCase):
    @inlineCallbacks
    def test_swap_between_two_containers_one_at_a_time(self) -> Any:
        _, d = yield self.swap_twice()
        health = d.service.health()["models"]
        self.assertEqual(health["alpha"]["container_state"], "running")
        self.assertEqual(health["beta"]["container_state"], "exited")

    @inlineCallbacks
    def test_console_shows_a_containers_log_and_follows_it(self) -> Any:
        """The engine's log through the Docker SDK: recent lines, then new ones as they come."""
        d = self.daemon({"alpha": self.create("alpha")})
        yield self.chat(d, "alpha")
        http = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))
        response = yield http.get(d.url + "/admin/logs/alpha?lines=50")
        self.assertIn(
            'fake alpha: "POST /v1/chat/completions HTTP/1.1" 200', (yield response.text())
        )
        response = yield http.get(d.url + "/admin/logs/alpha?follow=1&lines=0", unbuffered=True)
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        yield self.chat(d, "alpha")
        yield wait_for(lambda: b"POST /v1/chat/completions" in b"".join(received), 20)
        done.cancel()
        done.addErrback(lambda _: None)

    @inlineCallbacks
    def test_missing_container_says_to_create_it(self) -> Any:
        d = self.daemon(
            {
                "ghost": {
                    "container_name": f"{self.prefix}-nope",
                    "backend_url": "http://127.0.0.1:9/v1",
                }
            }
        )
        import openai

        with self.assertRaises(openai.APIStatusError) as ctx:
            yield self.chat(d, "ghost")
        self.assertEqual(ctx.exception.status_code, 503)
        self.assertIn("does not exist. Create it first", ctx.exception.message)

    @inlineCallbacks
    def test_unreachable_engine_explains_the_socket_mount(self) -> Any:
        model = {"container_name": "x", "backend_url": "http://127.0.0.1:9/v1"}
        d = self.daemon({"m": model}, docker={"base_url": "unix:///nonexistent/docker.sock"})
        import openai

        with self.assertRaises(openai.APIStatusError) as ctx:
            yield self.chat(d, "m")
        self.assertEqual(ctx.exception.status_code, 503)
        self.assertIn("Cannot reach the Docker engine", ctx.exception.message)
        self.assertIn("/var/run/docker.sock", ctx.exception.message)

    @inlineCallbacks
    def test_container_crash_is_reported_with_exit_code_and_restarted(self) -> Any:
        models = {"crashy": self.create("crashy")}
        d = self.daemon(models)
        yield self.chat(d, "crashy")
        docker("kill", "--signal", "USR1", models["crashy"]["container_name"])  # a crash: code 7
        service = d.service
        yield wait_for(lambda: service.health()["models"]["crashy"]["state"] == "failed", 20)
        info = service.health()["models"]["crashy"]
        self.assertEqual(info["exit_code"], 7)
        self.assertIn("exit code 7", info["error"])
        r = yield self.chat(d, "crashy")
        self.assertEqual(r.choices[0].message.content, "Hello from crashy")
        self.assertEqual(self.starts(), ["crashy", "crashy"])

    @inlineCallbacks
    def test_container_ignoring_sigterm_is_killed_after_stop_timeout(self) -> Any:
        models = {
            "stubborn": self.create("stubborn", "--ignore-sigterm"),
            "beta": self.create("beta"),
        }
        models["stubborn"]["stop_timeout"] = 1
        d = self.daemon(models)
        yield self.chat(d, "stubborn")
        r = yield self.chat(d, "beta")
        self.assertEqual(r.choices[0].message.content, "Hello from beta")
        name = models["stubborn"]["container_name"]
        self.assertEqual(self.state(name), "exited")
        self.assertEqual(docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip(), "137")
        self.assertEqual([e for e in read_ledger(self.ledger) if e["event"] == "overlap"], [])
        scraped = yield in_thread(self.threads, _metrics, d.url)
        self.assertEqual(scraped[("llmswap_backend_killed_total", (("model", "stubborn"),))], 1)
        self.assertEqual(scraped[("llmswap_backend_killed_total", (("model", "beta"),))], 0)

    @inlineCallbacks
    def test_a_container_that_misses_its_stop_signal_is_asked_again_not_killed(self) -> Any:
        # As llama-server whose shutdown missed its wake-up: its second SIGTERM ends it.
        models = {"lost": self.create("lost", "--miss-first-sigterm"), "beta": self.create("beta")}
        models["lost"]["stop_timeout"] = 6  # the first stop: asked again at 3 s
        d = self.daemon(models)
        yield self.chat(d, "lost")
        r = yield self.chat(d, "beta")
        self.assertEqual(r.choices[0].message.content, "Hello from beta")
        name = models["lost"]["container_name"]
        self.assertEqual(docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip(), "1")
        events = [(e["event"], e.get("name")) for e in read_ledger(self.ledger)]
        self.assertIn(("sigterm_missed", "lost"), events)
        self.assertEqual([e for e in events if e[0] == "overlap"], [])
        backend = d.service.manager.backends["lost"].describe()
        self.assertEqual((backend["asked_again"], backend["killed"]), (1, 0))


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return samples(r.read().decode())


def _serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


# What the driver's state is made of: written by the reactor's thread, and by no other.
DRIVER_STATE = {"_running", "_stopping", "_engine_state", "_exit_code", "_log_tail", "_lost",
                "_watch", "lost", "_killed", "_stops"}  # fmt: skip


class DriverThreadTests(DockerTestCase):
    @inlineCallbacks
    def test_watchers_and_pool_threads_at_once_leave_the_reactor_the_engines_picture(
        self,
    ) -> Any:
        """Rounds of: three containers started at once (pool threads, then a watcher thread
        each), then at the same moment one crashes (its watcher sees the die), one is stopped
        by llmswap (a pool thread) and one by someone else (its watcher again).  Every time the
        state the reactor reads is the engine's, and no thread but the reactor's wrote it."""
        off_reactor: list[str] = []

        def witness(obj: object, name: str, value: Any) -> None:
            if name in DRIVER_STATE and threading.current_thread() is not threading.main_thread():
                off_reactor.append(f"{name} by {threading.current_thread().name}")
            object.__setattr__(obj, name, value)

        class Provider(DockerClientProvider):
            __setattr__ = witness

        class Backend(DockerBackend):
            __setattr__ = witness

        names = ("crashes", "stopped", "stopped-by-someone")
        models = {n: self.create(n) for n in names}
        config = parse({"models": models})
        provider = Provider(config.docker)
        backends = {n: Backend(config.models[n], provider, reactor) for n in names}
        exits: dict[str, list[str]] = {n: [] for n in names}
        for n, b in backends.items():
            b.on_exit(exits[n].append)
        self.addCleanup(lambda: DeferredList([b.shutdown() for b in backends.values()]))
        container = {n: m["container_name"] for n, m in models.items()}

        def cli(*args: str) -> Any:
            return in_thread(self.threads, docker, *args)

        for round_ in range(1, 5):
            started = yield DeferredList([b.start() for b in backends.values()], consumeErrors=True)
            self.assertTrue(all(ok for ok, _ in started), started)
            self.assertTrue(all(b.alive() for b in backends.values()))
            # Serving, so its signal handlers are in place (the daemon waits for this too).
            yield wait_for(lambda: all(_serves(m["health_url"]) for m in models.values()), 30)
            yield DeferredList([
                cli("kill", "--signal", "USR1", container["crashes"]),
                backends["stopped"].stop(),
                cli("stop", "-t", "5", container["stopped-by-someone"]),
            ], fireOnOneErrback=True)  # fmt: skip
            want = [round_, 0, round_]
            yield wait_for(lambda w=want: [len(exits[n]) for n in names] == w, 30)
            for n, b in backends.items():
                state, code = docker(
                    "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", container[n]
                ).stdout.split()
                described = b.describe()
                self.assertFalse(b.alive(), n)
                self.assertEqual((described["container_state"], described["exit_code"]),
                                 (state, int(code)), n)  # fmt: skip
            self.assertEqual(backends["crashes"].describe()["exit_code"], 7)
            self.assertIn("(exit code 7)", exits["crashes"][-1])
            self.assertIn("exited (exit code 0)", exits["stopped-by-someone"][-1])
        self.assertIsNone(provider.lost)
        self.assertEqual(off_reactor, [])


class ReconciliationTests(DockerTestCase):
    @inlineCallbacks
    def test_two_running_at_start_leaves_one_adopted(self) -> Any:
        models = {"alpha": self.create("alpha"), "beta": self.create("beta")}
        for m in models.values():
            docker("start", m["container_name"])
        yield wait_for(lambda: sorted(self.starts()) == ["alpha", "beta"], 20)
        d = self.daemon(models)
        service = d.service
        yield wait_for(lambda: service.health()["current_model"] is not None, 30)
        kept = service.health()["current_model"]
        other = "beta" if kept == "alpha" else "alpha"
        self.assertEqual(self.state(models[other]["container_name"]), "exited")
        self.assertEqual(len(live_peers(self.ledger)), 1)
        r = yield self.chat(d, kept)
        self.assertEqual(r.choices[0].message.content, f"Hello from {kept}")
        self.assertEqual(sorted(self.starts()), ["alpha", "beta"])  # nothing restarted

    @inlineCallbacks
    def test_restarted_daemon_adopts_the_running_container_without_restarting(self) -> Any:
        models = {"alpha": self.create("alpha"), "beta": self.create("beta")}
        first = Daemon(models, os.path.join(self.tmp, "logs"))
        first.start()
        yield self.chat(first, "alpha")
        yield first.stop()
        self.assertEqual(self.state(models["alpha"]["container_name"]), "running")
        second = self.daemon(models)
        service = second.service
        yield wait_for(lambda: service.health()["current_model"] == "alpha", 30)
        r = yield self.chat(second, "alpha")
        self.assertEqual(r.choices[0].message.content, "Hello from alpha")
        self.assertEqual(self.starts(), ["alpha"])


class SleepingContainerTests(DockerTestCase):
    @inlineCallbacks
    def test_containers_sleep_and_wake_and_a_restarted_daemon_adopts_the_sleeper(self) -> Any:
        gpu = os.path.join(self.tmp, "gpu")
        os.mkdir(gpu)
        sleepy = ("--sleep-mode", "--gpu-dir", gpu, "--max-peers", "99")
        models = {n: {**self.create(n, *sleepy), "sleep": {"kind": "vllm"}} for n in "ab"}
        first = Daemon(models, os.path.join(self.tmp, "logs"), linger=0)
        first.start()
        for name in "aba":
            r = yield self.chat(first, name)
            self.assertEqual(r.choices[0].message.content, f"Hello from {name}")
        yield first.stop()
        events = [(e["event"], e["name"]) for e in read_ledger(self.ledger)]
        self.assertEqual(self.starts(), ["a", "b"])
        self.assertIn(("wake", "a"), events)
        self.assertEqual([e for e in events if e[0] in ("overlap", "request_while_asleep")], [])
        # Both containers run (stop_on_exit is off): a awake, b asleep.
        for name in "ab":
            self.assertEqual(self.state(models[name]["container_name"]), "running")
        second = self.daemon(models, linger=0)
        yield wait_for(lambda: second.service.health()["current_model"] == "a", 30)
        self.assertEqual(second.service.health()["models"]["b"]["state"], "asleep")
        r = yield self.chat(second, "b")
        self.assertEqual(r.choices[0].message.content, "Hello from b")
        switches = [(e["event"], e["name"]) for e in read_ledger(self.ledger)
                    if e["event"] in ("sleep", "wake")]  # fmt: skip
        self.assertEqual(self.starts(), ["a", "b"])  # adopted asleep, woken: never restarted
        self.assertEqual(switches[-2:], [("sleep", "a"), ("wake", "b")])


class SecondEngineTests(DockerTestCase):
    """An engine reached over TCP with TLS client certificates, as a second box's would be."""

    engine = SECOND

    @inlineCallbacks
    def test_containers_on_an_engine_over_tls_swap_one_at_a_time(self) -> Any:
        models, _ = yield self.swap_twice(docker={"base_url": SECOND_URL, "tls": SECOND_TLS})
        # The first engine never heard of them.
        self.assertNotEqual(docker("inspect", models["alpha"]["container_name"],
                                   check=False).returncode, 0)  # fmt: skip

    @inlineCallbacks
    def test_an_engine_whose_certificate_does_not_verify_is_named_in_the_error(self) -> Any:
        models = {"alpha": self.create("alpha")}
        wrong = {**SECOND_TLS, "ca": f"{CERTS}/cert.pem"}  # not the CA that signed the engine
        d = self.daemon(models, docker={"base_url": SECOND_URL, "tls": wrong})
        with self.assertRaises(openai.APIStatusError) as caught:
            yield self.chat(d, "alpha")
        self.assertEqual(caught.exception.status_code, 503)
        self.assertIn(f"Cannot reach the Docker engine at {SECOND_URL}", caught.exception.message)
        self.assertEqual(self.starts(), [])


class LlamaContainerTests(DockerTestCase):
    timeout = 300

    @inlineCallbacks
    def test_swap_between_two_llama_server_containers(self) -> Any:
        from llmswap.config.defaults import llama_assets
        from tests.test_llama import llama_server_groups

        binary, gguf = llama_assets()
        models: dict[str, Any] = {}
        for name, extra in (
            ("chat", ["-c", "2048"]),
            ("creative", ["-c", "1024", "--temp", "1.2"]),
        ):
            port = free_port()
            container = f"{self.prefix}-{name}"
            docker(
                "create", "--name", container, "--network", "host", "--pid", "host",
                *host_mounts(), "-v", f"{os.path.dirname(gguf)}:{os.path.dirname(gguf)}:ro",
                IMAGE, os.path.realpath(binary), "-m", gguf, "--host", "127.0.0.1",
                "--port", str(port), *extra,
            )  # fmt: skip
            models[name] = {
                "container_name": container,
                "backend_url": f"http://127.0.0.1:{port}/v1",
                "startup_timeout": 120,
            }
        d = self.daemon(models)
        for name in ("chat", "creative", "chat"):
            client = d.client(timeout=120)
            r = yield in_thread(self.threads, client.chat.completions.create,
                model=name, messages=HI, max_tokens=8,
            )  # fmt: skip
            self.assertEqual(r.object, "chat.completion")
            self.assertEqual(len(llama_server_groups()), 1)
        self.assertEqual(self.state(models["creative"]["container_name"]), "exited")


class EngineErrorTests(DockerTestCase):
    @inlineCallbacks
    def test_container_that_fails_to_start_passes_the_engine_message_through(self) -> Any:
        # The host port the container publishes is taken: the engine refuses to start it.
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        container = f"{self.prefix}-busy"
        docker(
            "create", "--name", container, "-p", f"127.0.0.1:{port}:8081",
            *host_mounts(self.tmp), IMAGE, sys.executable, FAKE, "--port", "8081",
        )  # fmt: skip
        d = self.daemon(
            {"busy": {"container_name": container, "backend_url": f"http://127.0.0.1:{port}/v1"}}
        )
        client = d.client()
        with self.assertRaises(Exception) as ctx:
            yield in_thread(self.threads, client.chat.completions.create, model="busy", messages=HI)
        error = ctx.exception
        self.assertEqual(getattr(error, "status_code", None), 503)
        message = str(error)
        self.assertIn(f"container '{container}' failed to start", message)
        self.assertIn("address already in use", message)
        health = d.service.health()["models"]["busy"]
        self.assertEqual(health["state"], "failed")


def test_permission_denied_on_the_socket_says_how_to_fix_it(tmp_path: Path) -> None:
    """A user outside the socket's group: here root without CAP_DAC_OVERRIDE on a socket that
    only its owner's mode bits (none) would admit, which the kernel refuses alike."""
    sock_path = tmp_path / "docker.sock"
    engine = socket.socket(socket.AF_UNIX)
    engine.bind(str(sock_path))
    engine.listen()
    os.chmod(sock_path, 0)
    config = tmp_path / "llmswap.yaml"
    port = free_port()
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"tcp:{port}:interface=127.0.0.1",
                "log_dir": str(tmp_path),
                "docker": {"base_url": f"unix://{sock_path}"},
                "models": {"m": {"container_name": "m", "backend_url": "http://127.0.0.1:9/v1"}},
            }
        )
    )
    proc = subprocess.Popen(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
         TWISTD, "-n", "--pidfile=", "llmswap", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_listening(url, proc)
        request = urllib.request.Request(
            url + "/v1/chat/completions", data=json.dumps({"model": "m"}).encode(), method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as ctx:
            urllib.request.urlopen(request, timeout=30)
        assert ctx.value.code == 503
        error = json.load(ctx.value)["error"]
        assert error["code"] == "backend_unavailable"
        assert "Permission denied on the Docker engine socket" in error["message"]
        assert "--group-add" in error["message"]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
        engine.close()
    assert "Traceback" not in output
