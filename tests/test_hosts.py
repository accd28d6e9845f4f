"""Several boxes: one llmswap in front of two real Docker engines on this machine.

The first engine is the local socket (`make docker-up`); the second is its own dockerd over
``tcp://127.0.0.1`` with TLS client certificates (tests/tools/docker-second-up.sh), as another
box's engine would be.  Each box keeps its own ledger, so the fake backends report two live
instances on one box (the GPU-safety promise is per box), while two boxes may each run one.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import urllib.request
from typing import Any

import openai
import pytest
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks

from tests.support import FAKE, free_port, in_thread, read_ledger, wait_for
from tests.test_docker import (
    IMAGE,
    ROOT,
    SECOND,
    SECOND_TLS,
    SECOND_URL,
    DockerTestCase,
    docker,
    ensure_image,
    host_mounts,
)

pytestmark = pytest.mark.docker

ENGINES = {"box1": (), "box2": SECOND}
HOSTS = {
    "box1": {"docker": {"base_url": "unix:///var/run/docker.sock"}},
    "box2": {"docker": {"base_url": SECOND_URL, "tls": SECOND_TLS, "timeout": 5},
             "address": "127.0.0.2"},
}  # fmt: skip
TOOLS = ROOT / "tests" / "tools"


def engine_times(box: str, container: str) -> tuple[float, float]:
    """When the engine says the container last started and finished (epoch seconds)."""
    out = docker(*ENGINES[box], "inspect", "-f", "{{.State.StartedAt}} {{.State.FinishedAt}}",
                 container).stdout.split()  # fmt: skip
    return tuple(_epoch(t) for t in out)  # type: ignore[return-value]


def _epoch(stamp: str) -> float:
    # Go's RFC 3339 with nanoseconds; Python reads microseconds.
    day, _, rest = stamp.partition("T")
    clock, _, fraction = rest.rstrip("Z").partition(".")
    parsed = datetime.datetime.fromisoformat(f"{day}T{clock}+00:00")
    return parsed.timestamp() + float(f"0.{fraction or 0}")


class HostsTestCase(DockerTestCase):
    timeout = 240

    def setUp(self) -> None:
        super().setUp()
        ensure_image(*SECOND)
        self.addCleanup(self.remove_on_second)

    def remove_on_second(self) -> None:
        names = docker(*SECOND, "ps", "-aq", "--filter", f"name={self.prefix}").stdout.split()
        if names:
            docker(*SECOND, "rm", "-f", *names, check=False)

    def ledger_of(self, box: str) -> str:
        return os.path.join(self.tmp, f"ledger-{box}")

    def create_on(
        self, box: str, name: str, *fake_args: str, port: int | None = None, address: str = ""
    ) -> dict[str, Any]:
        """A fake backend container on ``box`` (answering on ``address``, else 127.0.0.1);
        its model entry, with ``${HOST}`` in its URLs."""
        port = port or free_port()
        container = f"{self.prefix}-{name}"
        docker(
            *ENGINES[box], "create", "--name", container, "--network", "host", "--pid", "host",
            *host_mounts(self.tmp), IMAGE, sys.executable, FAKE, "--port", str(port),
            "--name", f"{name}@{box}", "--host", address or "127.0.0.1",
            "--ledger", self.ledger_of(box), *fake_args,
        )  # fmt: skip
        return {
            "container_name": container,
            "backend_url": f"http://${{HOST}}:{port}/v1",
            "startup_timeout": 30,
            "stop_timeout": 3,
        }

    def in_thread(self, fn: Any, *args: Any) -> Deferred[Any]:
        return in_thread(self.threads, fn, *args)

    def events(self, box: str, kind: str) -> list[str]:
        return [e["name"] for e in read_ledger(self.ledger_of(box)) if e["event"] == kind]


class TwoBoxesTests(HostsTestCase):
    @inlineCallbacks
    def test_swaps_on_two_boxes_overlap_and_never_two_on_one(self) -> Any:
        """Each box swaps its own model at the same time as the other, each one at a time:
        from the engines' own start and finish times."""
        loading = ("--startup-delay", "2")
        models = {
            "a1": {**self.create_on("box1", "a1", *loading), "host": "box1"},
            "a2": {**self.create_on("box1", "a2", *loading), "host": "box1"},
            "b1": {**self.create_on("box2", "b1", *loading, address="127.0.0.2"), "host": "box2"},
            "b2": {**self.create_on("box2", "b2", *loading, address="127.0.0.2"), "host": "box2"},
        }
        d = self.daemon(models, hosts=HOSTS, linger=0)
        yield gatherResults([self.chat(d, "a1"), self.chat(d, "b1")])
        answers = yield gatherResults([self.chat(d, "a2"), self.chat(d, "b2")])
        self.assertEqual([r.choices[0].message.content for r in answers],
                         ["Hello from a2@box1", "Hello from b2@box2"])  # fmt: skip
        times = {n: engine_times(m["host"], m["container_name"]) for n, m in models.items()}
        # On each box the new container started after the old one had finished.
        self.assertGreaterEqual(times["a2"][0], times["a1"][1])
        self.assertGreaterEqual(times["b2"][0], times["b1"][1])
        # Across boxes the loads ran at once: each container started before the other's
        # backend served its first request (it was loading). One lock for both would have
        # started the second load only after the first was ready.
        served = {box: {e["name"]: e["begin"] for e in read_ledger(self.ledger_of(box))
                        if e["event"] == "served"} for box in ENGINES}  # fmt: skip
        self.assertLess(times["b2"][0], served["box1"]["a2@box1"])
        self.assertLess(times["a2"][0], served["box2"]["b2@box2"])
        for box in ENGINES:
            self.assertEqual(self.events(box, "overlap"), [])
        health = d.service.health()
        self.assertEqual(health["hosts"]["box2"]["models"], ["b1", "b2"])
        self.assertEqual(health["models"]["b2"]["host"], "box2")
        self.assertTrue(health["hosts"]["box2"]["reachable"])

    @inlineCallbacks
    def test_a_model_on_both_boxes_runs_where_it_evicts_nothing(self) -> Any:
        port = free_port()  # the same container on both boxes, as users run it
        both = {
            "box1": self.create_on("box1", "g", port=port),
            "box2": self.create_on("box2", "g", port=port, address="127.0.0.2"),
        }
        models = {
            "a": {**self.create_on("box1", "a"), "host": "box1"},
            "g": {**both["box1"], "hosts": ["box1", "box2"]},
        }
        d = self.daemon(models, hosts=HOSTS)
        yield self.chat(d, "a")
        # box1 holds a: g goes to box2, where it evicts nothing, and stays there.
        for _ in range(2):
            r = yield self.chat(d, "g")
            self.assertEqual(r.choices[0].message.content, "Hello from g@box2")
        r = yield self.chat(d, "a")
        self.assertEqual(r.choices[0].message.content, "Hello from a@box1")
        self.assertEqual(self.events("box1", "start"), ["a@box1"])
        self.assertEqual(self.events("box2", "start"), ["g@box2"])
        states = {n: m["state"] for n, m in d.service.health()["models"].items()}
        self.assertEqual(states, {"a": "ready", "g@box1": "stopped", "g@box2": "ready"})
        listed = yield self.in_thread(d.client().models.list)
        self.assertEqual(sorted(m.id for m in listed.data), ["a", "g"])
        ps = yield self.in_thread(get_json, d.url + "/api/ps")  # Ollama's loaded models
        self.assertEqual(sorted(m["name"] for m in ps["models"]), ["a:latest", "g:latest"])


class EngineFaultTests(HostsTestCase):
    @inlineCallbacks
    def test_a_stopped_engine_fails_its_models_naming_the_host_and_recovers(self) -> Any:
        models = {
            "a": {**self.create_on("box1", "a"), "host": "box1"},
            "b": {**self.create_on("box2", "b", address="127.0.0.2"), "host": "box2"},
        }
        d = self.daemon(models, hosts=HOSTS)
        yield gatherResults([self.chat(d, "a"), self.chat(d, "b")])
        self.addCleanup(second_engine, "up")
        yield self.in_thread(second_engine, "down")
        health = d.service.health
        yield wait_for(lambda: health()["models"]["b"]["state"] == "failed", 30)
        # Its container died with the engine (or the engine went first): the host is named.
        self.assertRegex(health()["models"]["b"]["error"],
                         "container .* on host box2 is exited|Docker engine at "
                         f"{SECOND_URL} \\(host box2\\) unreachable")  # fmt: skip
        # The other box serves on.
        r = yield self.chat(d, "a")
        self.assertEqual(r.choices[0].message.content, "Hello from a@box1")
        with self.assertRaises(openai.APIStatusError) as caught:
            yield self.chat(d, "b")
        self.assertEqual(caught.exception.status_code, 503)
        self.assertIn(f"Cannot reach the Docker engine at {SECOND_URL} (host box2)",
                      caught.exception.message)  # fmt: skip
        self.assertFalse(health()["hosts"]["box2"]["reachable"])
        self.assertTrue(health()["hosts"]["box1"]["reachable"])
        yield self.in_thread(second_engine, "up")
        r = yield self.chat(d, "b")
        self.assertEqual(r.choices[0].message.content, "Hello from b@box2")
        self.assertTrue(health()["hosts"]["box2"]["reachable"])
        self.assertEqual(self.events("box2", "start"), ["b@box2", "b@box2"])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def second_engine(how: str) -> None:
    """Stop the second engine (its containers die with it) or start it again."""
    subprocess.run([str(TOOLS / f"docker-second-{how}.sh")], check=True, timeout=120,
                   capture_output=True)  # fmt: skip
