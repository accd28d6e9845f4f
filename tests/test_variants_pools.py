"""Variants (an alias with its own ``set_params``/``strip_params``: one backend, no swap) and
pools (a virtual model served by whichever member suits), through real sockets and fake
backends as real processes; the pool choice itself as a pure function, table-driven and by
property."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks

from llmswap.config.config import parse
from llmswap.config.values import ConfigError
from llmswap.swap.pools import Member, choose
from tests.support import HI
from tests.test_daemon import DaemonTestCase, starts

THINK = {"chat_template_kwargs": {"enable_thinking": True}}


class VariantTests(DaemonTestCase):
    @inlineCallbacks
    def test_variants_are_one_backend_each_with_its_own_preset(self) -> Any:
        qwen = {
            **self.fake("qwen", echo=True),
            "set_params": {"temperature": 0.7},
            "aliases": [
                "qwen-latest",
                {"qwen-think": {"set_params": THINK}},
                {"qwen-fast": {"strip_params": ["reasoning_effort"],
                               "set_params": {"temperature": 0.1, "max_tokens": 64}}},
            ],
        }  # fmt: skip
        self.start({"qwen": qwen, "other": self.fake("other")})
        received = {}
        for name in ("qwen", "qwen-latest", "qwen-think", "qwen-fast"):
            sent = {"model": name, "messages": HI, "reasoning_effort": "high"}
            response, body = yield self.post_json("/v1/chat/completions", sent)
            self.assertEqual(response.headers.getRawHeaders("x-llmswap-model"), ["qwen"])
            received[name] = json.loads(body["choices"][0]["message"]["content"])
        base = {"messages": HI, "reasoning_effort": "high", "temperature": 0.7}
        self.assertEqual(received["qwen"], {"model": "qwen", **base})
        self.assertEqual(received["qwen-latest"], {"model": "qwen-latest", **base})
        self.assertEqual(received["qwen-think"], {"model": "qwen-think", **base, **THINK})
        self.assertEqual(
            received["qwen-fast"],
            {"model": "qwen-fast", "messages": HI, "temperature": 0.1, "max_tokens": 64},
        )
        self.assertEqual(starts(self.ledger), ["qwen"])  # four names, one load
        # Ollama's chat asks for the variant the same way.
        response, body = yield self.post_json(
            "/api/chat", {"model": "qwen-think", "messages": HI, "stream": False}
        )
        self.assertEqual(response.code, 200)
        seen = json.loads(body["message"]["content"])
        self.assertEqual(seen["chat_template_kwargs"], THINK["chat_template_kwargs"])
        self.assertEqual(starts(self.ledger), ["qwen"])


class PoolTests(DaemonTestCase):
    def models(self) -> dict[str, Any]:
        gpu = {"device": "gpu"}
        return {
            "a": {**self.fake("a"), **gpu, "memory": "1.8GiB"},
            "b": {**self.fake("b"), **gpu, "memory": "0.4GiB",
                  "aliases": [{"b-think": {"set_params": THINK}}]},
            "c": {**self.fake("c"), **gpu, "memory": "0.4GiB"},
        }  # fmt: skip

    def served_by(self, response: Any) -> str:
        [name] = response.headers.getRawHeaders("x-llmswap-model")
        return str(name)

    @inlineCallbacks
    def ask(self, model: str) -> Any:
        response, body = yield self.post_json(
            "/v1/chat/completions", {"model": model, "messages": HI}
        )
        self.assertEqual(response.code, 200, body)
        served = self.served_by(response)
        self.assertEqual(body["choices"][0]["message"]["content"], f"Hello from {served}")
        return served

    @inlineCallbacks
    def test_a_pool_serves_with_the_loaded_member_then_one_that_fits_then_the_first(self) -> Any:
        pools = {"chat": {"models": ["a", "b-think"]}, "strict": {"models": ["b", "a"],
                 "prefer": "order"}, "quiet": {"models": ["c"], "unlisted": True}}  # fmt: skip
        daemon = self.start(self.models(), devices={"gpu": {"memory": "2GiB"}}, pools=pools)
        self.assertEqual((yield self.ask("chat")), "a")  # nothing loaded: the first
        self.assertEqual((yield self.ask("chat")), "a")
        self.assertEqual((yield self.ask("c")), "c")  # evicts a: 1.8 + 0.4 > 2
        self.assertEqual(starts(self.ledger), ["a", "c"])
        # Nothing of the pool is loaded; a would evict c, b fits beside it.
        self.assertEqual((yield self.ask("chat")), "b")
        self.assertEqual(starts(self.ledger), ["a", "c", "b"])  # b fitted beside c: no eviction
        health = yield self.health()
        self.assertEqual(health["models"]["c"]["state"], "ready")
        self.assertEqual(health["pools"]["chat"], {"models": ["a", "b-think"], "prefer": "loaded",
                                                   "serving": "b-think"})  # fmt: skip
        response = yield self.http.get(daemon.url + "/metrics")
        text = (yield response.content()).decode()
        self.assertIn('llmswap_pool_requests_total{model="a",pool="chat"} 2.0', text)
        self.assertIn('llmswap_pool_requests_total{model="b",pool="chat"} 1.0', text)
        self.assertEqual((yield self.ask("strict")), "b")  # order: the first, loaded or not
        listed = yield self.in_thread(daemon.client().models.list)
        self.assertEqual([m.id for m in listed.data], ["a", "b", "c", "chat", "strict"])
        found = yield self.in_thread(daemon.client().models.retrieve, "quiet")
        self.assertEqual(found.id, "quiet")
        response = yield self.http.get(daemon.url + "/api/tags")
        tags = [m["name"] for m in (yield response.json())["models"]]
        self.assertEqual(tags, ["a:latest", "b:latest", "c:latest", "chat:latest",
                                "strict:latest"])  # fmt: skip

    @inlineCallbacks
    def test_a_key_is_served_only_by_the_members_it_may_use(self) -> Any:
        keys = [{"name": "bonly", "key": "k" * 32, "models": ["b"]}]
        self.start(self.models(), devices={"gpu": {"memory": "2GiB"}},
                   pools={"chat": {"models": ["a", "b"]}, "aonly": {"models": ["a"]}},
                   auth={"keys": keys})  # fmt: skip
        headers = {"Authorization": ["Bearer " + "k" * 32]}
        response = yield self.post(
            "/v1/chat/completions", {"model": "chat", "messages": HI}, headers=headers
        )
        body = yield response.json()
        self.assertEqual((response.code, self.served_by(response)), (200, "b"), body)
        response = yield self.post(
            "/v1/chat/completions", {"model": "aonly", "messages": HI}, headers=headers
        )
        body = yield response.json()
        self.assertEqual((response.code, body["error"]["code"]), (404, "model_not_found"))
        self.assertIn("Available models: b, chat", body["error"]["message"])


def test_pool_declarations_are_checked() -> None:
    fake = {"cmd": "x", "backend_url": "http://127.0.0.1:1/v1"}
    models = {"a": dict(fake), "b": {**fake, "aliases": ["bee"]}}
    config = parse({"models": models, "pools": {"p": {"models": ["a", "bee"]}}})
    assert config.pools["p"].members == ("a", "bee")
    assert config.known("p") == "p"
    for pools, message in (
        ({"a": {"models": ["b"]}}, "already a model's or an alias's name"),
        ({"p": {"models": ["zz"]}}, "names 'zz', no model or alias"),
        ({"p": {"models": ["b", "bee"]}}, "names one model twice"),
        ({"p": {"models": ["a"]}, "q": {"models": ["p"]}}, "a pool may not hold a pool"),
        ({"p": {"models": []}}, "at least one model"),
        ({"p": {"models": ["a"], "prefer": "fast"}}, "must be one of loaded, order"),
        ({"p": {"modles": ["a"]}}, "did you mean 'models'"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse({"models": models, "pools": pools})


def test_alias_presets_are_checked() -> None:
    fake = {"cmd": "x", "backend_url": "http://127.0.0.1:1/v1"}
    config = parse({"models": {"q": {**fake, "aliases": {"q-think": {"set_params": THINK},
                                                          "q2": None}}}})  # fmt: skip
    assert config.models["q"].aliases == ("q-think", "q2")
    assert config.preset("q", "q-think") is not None
    assert config.preset("q", "q2") is None and config.preset("q", "q") is None
    for aliases, message in (
        ([{"x": {"set_params": {"model": "y"}}}], "cannot set 'model'"),
        ([{"x": {"strip_params": ["model"]}}], "cannot remove 'model'"),
        ([{"x": {"temperature": 1}}], "may only have set_params and strip_params"),
        ([{"x": {}, "y": {}}], "one name mapped to its presets"),
        (["x", {"x": {"set_params": THINK}}], "names 'x' twice"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse({"models": {"q": {**fake, "aliases": aliases}}})


R, L, S, F, H = "ready", "loading", "asleep", "fits", "held_back"


@pytest.mark.parametrize(
    ("prefer", "members", "chosen"),
    [
        ("loaded", [("a", ()), ("b", (R,))], "b"),
        ("loaded", [("a", (F,)), ("b", (L,))], "b"),
        ("loaded", [("a", (F,)), ("b", (S,))], "b"),
        ("loaded", [("a", ()), ("b", (F,))], "b"),
        ("loaded", [("a", ()), ("b", ())], "a"),
        ("loaded", [("a", (R, H)), ("b", ())], "b"),  # held back: passed over
        ("loaded", [("a", (H,)), ("b", (H,))], "a"),  # all held back: its refusal answers
        ("order", [("a", ()), ("b", (R,))], "a"),
        ("order", [("a", (H,)), ("b", ())], "b"),
    ],
)
def test_the_pool_choice(
    prefer: str, members: list[tuple[str, tuple[str, ...]]], chosen: str
) -> None:
    made = [Member(name, **{flag: True for flag in flags}) for name, flags in members]
    found = choose(prefer, made)
    assert found is not None and found.name == chosen


_MEMBERS = st.lists(
    st.builds(Member, st.text("abcdef", min_size=1, max_size=2), st.booleans(), st.booleans(),
              st.booleans(), st.booleans(), st.booleans()),
    max_size=6,
)  # fmt: skip


@given(_MEMBERS, st.sampled_from(["loaded", "order"]))
def test_the_choice_is_a_member_and_never_costs_more_than_another(
    members: list[Member], prefer: str
) -> None:
    found = choose(prefer, members)
    if not members:
        assert found is None
        return
    assert found in members
    usable = [m for m in members if not m.held_back] or members
    assert found in usable
    if prefer == "loaded" and any(m.ready for m in usable):
        assert found.ready
    if prefer == "order":
        assert found is usable[0]
