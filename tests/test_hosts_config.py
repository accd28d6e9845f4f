"""Hosts without Docker: how ``hosts:`` is read, where a model is placed, and that each host
swaps on its own (a swap manager on a Clock with in-memory backends)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from llmswap import health
from llmswap.config.config import parse, reload_changes
from llmswap.config.values import ConfigError
from llmswap.console import live
from llmswap.errors import APIError
from llmswap.swap import policy
from llmswap.swap.manager import SwapManager
from llmswap.testing import MemoryBackend, MemoryHTTP

BOXES = {
    "box1": {"docker": {"base_url": "unix:///run/box1.sock"}, "address": "10.0.0.1",
             "devices": {"gpu0": {"memory": "16GiB"}}},
    "box2": {"docker": {"base_url": "unix:///run/box2.sock"}, "address": "10.0.0.2",
             "devices": {"gpu0": {"memory": "24GiB"}, "gpu1": {"memory": "24GiB"}}},
}  # fmt: skip


def model(**extra: Any) -> dict[str, Any]:
    return {"container_name": "c", "backend_url": "http://${HOST}:8081/v1", **extra}


def test_a_model_on_several_hosts_is_one_instance_per_host_with_its_address() -> None:
    config = parse({
        "hosts": BOXES,
        "models": {
            "qwen": model(host="box2", device="gpu1", memory="20GiB"),
            "gemma": model(hosts=["box1", "box2"], device="gpu0"),
            "here": {"cmd": "llama-server --port ${PORT}"},
        },
    })  # fmt: skip
    assert list(config.models) == ["qwen", "gemma", "here"]  # what clients see
    assert config.placements["gemma"] == ("gemma@box1", "gemma@box2")
    urls = {n: m.backend_url for n, m in config.instances.items()}
    assert urls == {
        "qwen": "http://10.0.0.2:8081/v1",
        "gemma@box1": "http://10.0.0.1:8081/v1",
        "gemma@box2": "http://10.0.0.2:8081/v1",
        "here": "http://127.0.0.1:5800/v1",
    }
    # Each box's gpu0 is its own budget.
    assert config.footprint("qwen") == ("box2/gpu1", 20 * 2**30)
    assert config.footprint("gemma@box2") == ("box2/gpu0", 24 * 2**30)
    assert config.footprint("here") == ("default", 1.0)
    assert config.footprint("gemma@box1") == ("box1/gpu0", 16 * 2**30)
    assert config.capacities("box1") == {"box1/gpu0": 16 * 2**30}
    assert config.hosts["box2"].docker.where == "unix:///run/box2.sock (host box2)"


def test_one_engine_configuration_is_the_local_host_as_before() -> None:
    config = parse({"docker": {"base_url": "unix:///run/d.sock"}, "models": {"a": model()}})
    assert list(config.hosts) == ["local"]
    assert config.instances == config.models
    assert config.models["a"].backend_url == "http://127.0.0.1:8081/v1"
    assert config.capacities() == {"default": 1.0}


@pytest.mark.parametrize(
    ("hosts", "models", "message"),
    [
        ({"box2": {"docker": {"base_url": "tcp://box2.lan:2375"}}}, {"a": model()},
         "'hosts.box2.docker.base_url' tcp://box2.lan:2375 is plain TCP to another box"),
        (BOXES, {"a": model(host="box3")}, "'models.a' names unknown host 'box3'; hosts: "
         "local, box1, box2"),
        ({"box2": {"docker": {"base_url": "ssh://me@box2"}}}, {"a": {"cmd": "x --port ${PORT}",
         "host": "box2"}}, "'models.a' has a 'cmd', which runs on this machine"),
        ({"local": {"docker": {}}}, {"a": model()}, "'hosts.local': 'local' is this machine"),
        (BOXES, {"a": model(host="box1", hosts=["box2"])}, "has both 'host' and 'hosts'"),
        (BOXES, {"a": model(host="box1", device="gpu1")}, "names unknown device 'gpu1'; "
         "declared: gpu0"),
        (BOXES, {"a": model(host="box2")}, "'models.a.device' is required when several devices"),
        ({"box2": {"address": "x"}}, {"a": model()}, "'hosts.box2.docker' is required"),
        ({"box2": {"docker": {"base_url": "ssh://me@box2"}, "gpus": 1}}, {"a": model()},
         "unknown key 'hosts.box2.gpus'"),
    ],
)  # fmt: skip
def test_bad_hosts_are_refused_naming_the_key(hosts: Any, models: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"hosts": hosts, "models": models})
    assert message in str(caught.value)


def test_a_reload_restarts_the_models_of_a_host_whose_engine_changed() -> None:
    models = {"a": model(host="box1"), "b": model(host="box2", device="gpu0")}
    before = parse({"hosts": BOXES, "models": models})
    moved = {**BOXES, "box1": {**BOXES["box1"], "docker": {"base_url": "unix:///run/new.sock"}}}
    after = parse({"hosts": moved, "models": models})
    assert reload_changes(before, after) == ([], ["a"], [])


def view(models: dict[str, policy.ModelView], waiting: tuple[str, ...] = ()) -> policy.View:
    queued = [policy.Waiting(i, m, 0.0) for i, m in enumerate(waiting)]
    return policy.View(now=10.0, instances=models, waiting=queued)


def test_placement_prefers_where_it_is_loaded_then_where_it_evicts_least() -> None:
    idle = policy.ModelView("x", resident=True, ready=True)
    busy = policy.ModelView("x", resident=True, ready=True, in_flight=1)
    loaded_here = view({"g@1": policy.ModelView("g@1", resident=True, ready=True)})
    empty = view({"g@2": policy.ModelView("g@2")})
    assert policy.place([("g@2", empty), ("g@1", loaded_here)]) == "g@1"
    holds_idle = view({"x": idle, "g@1": policy.ModelView("g@1")})
    holds_busy = view({"x": busy, "g@2": policy.ModelView("g@2")})
    assert policy.place([("g@1", holds_idle), ("g@2", empty)]) == "g@2"  # evicts nothing
    assert policy.place([("g@2", holds_busy), ("g@1", holds_idle)]) == "g@1"  # idle first
    waited = view({"x": idle, "g@1": policy.ModelView("g@1")}, waiting=("g@1",))
    assert policy.place([("g@2", empty), ("g@1", waited)]) == "g@1"  # joins its waiters


class HostsOnAClockTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[str] = []
        cmd = {"cmd": "x", "backend_url": "http://${MODEL_ID}-${HOST}:1/v1", "startup_timeout": 60}
        models = {"a": {**cmd, "host": "box1"}, "b": {**cmd, "host": "box1"},
                  "c": {**cmd, "host": "box2"},
                  "g": {**cmd, "hosts": ["box1", "box2"]}}  # fmt: skip
        boxes = {h: {"docker": {"base_url": f"unix:///run/{h}.sock"}, "address": h}
                 for h in ("box1", "box2")}  # fmt: skip
        config = parse({"hosts": boxes, "models": models, "linger": 0})
        self.backends = {n: MemoryBackend(n, self.events) for n in config.instances}
        # MemoryHTTP answers by the URL's host name: model-box.
        by_url = {n.replace("@", "-") if "@" in n else f"{n}-{m.host}": self.backends[n]
                  for n, m in config.instances.items()}  # fmt: skip
        self.http = MemoryHTTP(by_url)
        self.manager = SwapManager(config, self.backends, self.http, self.clock)
        self.manager.startService()
        self.addCleanup(self.manager.stopService)

    def test_a_load_on_one_host_never_holds_a_request_for_another(self) -> None:
        self.backends["a"].healthy = False  # box1's load takes its time
        loading = self.manager.acquire("a")
        self.assertNoResult(loading)
        lease = self.successResultOf(self.manager.acquire("c"))  # box2 swaps meanwhile
        self.assertEqual(lease.backend_url, "http://c-box2:1/v1")
        self.assertEqual(self.events, ["start a", "start c"])
        waiting = self.manager.acquire("b")  # box1 stays one change at a time
        self.clock.advance(1)
        self.assertNoResult(waiting)
        self.assertEqual(self.events, ["start a", "start c"])
        for d in (loading, waiting):  # answered "shutting down" at the cleanup
            d.addErrback(lambda f: f.trap(APIError))

    def test_health_shows_each_host_and_where_each_instance_runs(self) -> None:
        self.successResultOf(self.manager.acquire("c")).release()
        doc = health.document(self.manager.snapshot())
        self.assertEqual(doc["hosts"]["box2"]["models"], ["c", "g@box2"])
        self.assertEqual(doc["hosts"]["box2"]["engine"], "unix:///run/box2.sock (host box2)")
        self.assertEqual(doc["models"]["c"]["host"], "box2")
        self.assertEqual(doc["loaded_models"], ["c"])
        console = live.state(self.manager.snapshot(), self.manager.config)
        self.assertEqual(console["models"]["g@box1"]["host"], "box1")
        self.assertEqual(console["hosts"]["box1"], {"engine": "unix:///run/box1.sock (host box1)",
                                                    "error": None})  # fmt: skip

    def test_a_reload_that_drops_a_host_stops_its_models_and_the_rest_serve_on(self) -> None:
        self.successResultOf(self.manager.acquire("c")).release()
        cmd = {"cmd": "x", "backend_url": "http://${MODEL_ID}-${HOST}:1/v1", "startup_timeout": 60}
        new = parse({
            "hosts": {"box1": {"docker": {"base_url": "unix:///run/box1.sock"}, "address": "box1"}},
            "models": {"a": {**cmd, "host": "box1"}, "b": {**cmd, "host": "box1"},
                       "g": {**cmd, "host": "box1"}},
            "linger": 0,
        })  # fmt: skip
        fresh = {"g": MemoryBackend("g", self.events)}
        fresh["g"].running = True  # its container was started by hand: counted nowhere
        summary = self.successResultOf(self.manager.reconfigure(new, fresh))
        self.assertEqual(summary, {"added": ["g"], "removed": ["c", "g@box1", "g@box2"],
                                   "changed": []})  # fmt: skip
        self.assertEqual(self.events, ["start c", "stop c", "stop g"])
        self.successResultOf(self.manager.acquire("a")).release()
        self.assertEqual(list(health.document(self.manager.snapshot())["hosts"]), ["local", "box1"])

    def test_a_host_whose_engine_hangs_at_start_up_holds_no_other_host(self) -> None:
        self.manager.stopService()
        hung: Deferred[bool] = Deferred()
        self.backends["c"].adopt = lambda: hung  # type: ignore[method-assign]
        manager = SwapManager(self.manager.config, self.backends, self.http, self.clock)
        manager.startService()
        self.addCleanup(manager.stopService)
        lease = self.successResultOf(manager.acquire("a"))  # box1 reconciled and serves
        lease.release()
        waiting = manager.acquire("c")  # box2 is still being reconciled
        self.assertNoResult(waiting)
        hung.callback(False)
        self.successResultOf(waiting).release()
        self.assertEqual(self.events, ["start a", "start c"])
