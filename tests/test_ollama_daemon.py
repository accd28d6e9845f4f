"""Ollama's API on real sockets, with the official ``ollama`` client and fake backends.

The fakes (real processes) answer what no real backend here does: tool calls, and ``--echo``,
which answers a chat with the exact OpenAI body llmswap sent it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import ollama
from twisted.internet.defer import gatherResults, inlineCallbacks

from tests.fakebackend import live_peers
from tests.support import HI, wait_for
from tests.test_daemon import DaemonTestCase

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


class OllamaClientTests(DaemonTestCase):
    timeout = 120

    def client(self) -> ollama.Client:
        return ollama.Client(host=self.daemon.url, timeout=30)

    def call(self, method: str, *args: Any, **kw: Any) -> Any:
        return self.in_thread(getattr(self.client(), method), *args, **kw)

    @inlineCallbacks
    def test_tool_calls_both_ways_streamed_and_not(self) -> Any:
        self.start({"a": self.fake("a")})
        messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
        answer = yield self.call(
            "chat", model="a", messages=messages, tools=[WEATHER], stream=False
        )
        (call,) = answer.message.tool_calls
        self.assertEqual((call.function.name, dict(call.function.arguments)),
                         ("weather", {"city": "Paris", "days": 2}))  # fmt: skip
        chunks = yield self.call("chat", model="a", messages=messages, tools=[WEATHER], stream=True)
        chunks = yield self.in_thread(list, chunks)
        streamed = [c for c in chunks if c.message.tool_calls]
        self.assertEqual(len(streamed), 1)  # the fragments arrive as one whole call
        self.assertEqual(dict(streamed[0].message.tool_calls[0].function.arguments),
                         {"city": "Paris", "days": 2})  # fmt: skip
        self.assertTrue(chunks[-1].done)
        # The tool's answer goes back with the id of the call it answers.
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
            {"role": "tool", "content": "sunny", "tool_name": "weather"},
        ]
        answer = yield self.call("chat", model="a", messages=messages, stream=False)
        self.assertEqual(answer.message.content, "the tool said sunny for call_1_0")

    @inlineCallbacks
    def test_options_format_and_think_reach_the_backend_as_openai_fields(self) -> Any:
        self.start({"echo": self.fake("echo", echo=True)})
        schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
        answer = yield self.call(
            "chat",
            model="echo:latest",
            messages=HI,
            format=schema,
            think=True,
            options={"temperature": 0.1, "num_predict": 7, "seed": 5, "num_ctx": 99},
            stream=False,
        )
        self.assertGreater(answer.load_duration, 0)  # it waited for the model's load
        sent = json.loads(answer.message.content)
        self.assertEqual(sent["model"], "echo")
        self.assertEqual(sent["messages"], HI)
        self.assertEqual(sent["response_format"]["json_schema"]["schema"], schema)
        self.assertEqual((sent["temperature"], sent["max_tokens"], sent["seed"]), (0.1, 7, 5))
        self.assertEqual(sent["chat_template_kwargs"], {"enable_thinking": True})
        self.assertNotIn("num_ctx", sent)
        streamed = yield self.call(
            "generate", model="echo", prompt="hi", format="json", stream=True
        )
        pieces = yield self.in_thread(list, streamed)
        sent = json.loads("".join(p.response for p in pieces))
        self.assertEqual(sent["response_format"], {"type": "json_object"})
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        final = pieces[-1]
        self.assertTrue(final.done)
        self.assertEqual((final.prompt_eval_count, final.eval_count), (3, 2))
        self.assertEqual(final.eval_duration, 2_500_000)  # llama.cpp's timings, in ns
        self.assertEqual(final.load_duration, 0)  # loaded already
        self.assertGreater(final.total_duration, 0)

    @inlineCallbacks
    def test_list_show_ps_embed_and_keep_alive(self) -> Any:
        self.start({"a": self.fake("a", ttl=600), "b": self.fake("b")})
        listed = yield self.call("list")
        self.assertEqual([m.model for m in listed.models], ["a:latest", "b:latest"])
        running = yield self.call("ps")
        self.assertEqual(running.models, [])
        embedded = yield self.call("embed", model="a", input=["x", "y"])
        self.assertEqual(embedded.embeddings, [[0.25, 0.5, 0.75]])
        legacy = yield self.call("embeddings", model="a", prompt="x")
        self.assertEqual(list(legacy.embedding), [0.25, 0.5, 0.75])
        # keep_alive 30 m replaces a's ttl of 10 min, for this load of a.
        yield self.call("generate", model="a", prompt="hi", keep_alive="30m", stream=False)
        (loaded,) = (yield self.call("ps")).models
        left = loaded.expires_at.timestamp() - time.time()
        self.assertTrue(1700 < left <= 1800, left)
        shown = yield self.call("show", "a")
        self.assertEqual(shown.capabilities, ["completion"])
        # keep_alive 0: unloaded once answered, checked on the real process list.
        answer = yield self.call("chat", model="a", messages=HI, keep_alive=0, stream=False)
        self.assertEqual(answer.message.content, "Hello from a")
        yield wait_for(lambda: not live_peers(self.ledger), 10)
        self.assertEqual((yield self.call("ps")).models, [])

    @inlineCallbacks
    def test_errors_are_raised_by_the_client_with_their_status(self) -> Any:
        self.start({"a": self.fake("a")})
        with self.assertRaises(ollama.ResponseError) as e:
            yield self.call("chat", model="nope", messages=HI)
        self.assertEqual(e.exception.status_code, 404)
        self.assertIn("a:latest", e.exception.error)
        with self.assertRaises(ollama.ResponseError) as e:
            yield self.call("pull", "llama3")
        self.assertEqual(e.exception.status_code, 501)

    @inlineCallbacks
    def test_a_whole_answer_cut_by_the_backend_is_an_error_the_client_raises(self) -> Any:
        self.start({"a": self.fake("a")})
        cut = [{"role": "user", "content": "fake cut"}]
        with self.assertRaises(ollama.ResponseError) as e:
            yield self.call("chat", model="a", messages=cut, stream=False)
        self.assertEqual(e.exception.status_code, 502)
        self.assertIn("Model 'a' answer interrupted: the backend closed", e.exception.error)
        answer = yield self.call("chat", model="a", messages=HI, stream=False)
        self.assertEqual(answer.message.content, "Hello from a")  # and the model goes on

    @inlineCallbacks
    def test_ollama_and_openai_requests_share_one_queue_and_policy(self) -> Any:
        """While a's only slot is busy, an Ollama request for b waits, then an OpenAI request
        for a arrives: swap-aware serves the loaded model's request first, whichever API."""
        self.start({"a": self.fake("a"), "b": self.fake("b")}, linger=0)
        busy = self.post("/v1/chat/completions", {"model": "a", "fake_sleep": 1.0})
        yield wait_for(lambda: self.daemon.service.health()["in_flight"] == 1)
        finished: list[str] = []
        ollama_b = self.call("chat", model="b", messages=HI, stream=False)
        ollama_b.addCallback(lambda _: finished.append("ollama b"))
        yield wait_for(lambda: self.daemon.service.health()["queue_size"] == 1)
        openai_a = self.chat("a")
        openai_a.addCallback(lambda _: finished.append("openai a"))
        yield wait_for(lambda: self.daemon.service.health()["queue_size"] == 2)
        queue = self.daemon.service.health()["queue"]
        self.assertEqual([w["model"] for w in queue], ["b", "a"])  # one queue, arrival order
        yield gatherResults([busy, ollama_b, openai_a])
        self.assertEqual(finished, ["openai a", "ollama b"])
        self.assert_one_at_a_time()

    @inlineCallbacks
    def test_keys_and_model_permissions_apply_here_too(self) -> Any:
        alice_key = "sk-alice-0123456789abcdefghij"
        keys = [{"name": "alice", "key": alice_key, "models": ["a"]}]
        self.start({"a": self.fake("a"), "b": self.fake("b")}, auth={"keys": keys})
        with self.assertRaises(ollama.ResponseError) as e:
            yield self.call("list")
        self.assertEqual(e.exception.status_code, 401)
        alice = ollama.Client(
            host=self.daemon.url, timeout=30, headers={"Authorization": f"Bearer {alice_key}"}
        )
        listed = yield self.in_thread(alice.list)
        self.assertEqual([m.model for m in listed.models], ["a:latest"])
        with self.assertRaises(ollama.ResponseError) as e:
            yield self.in_thread(alice.chat, model="b", messages=HI)
        self.assertEqual(e.exception.status_code, 403)
        with self.assertRaises(ollama.ResponseError) as e:
            yield self.in_thread(alice.chat, model="zz", messages=HI)
        self.assertEqual(e.exception.status_code, 404)
        self.assertIn("a:latest", e.exception.error)
        self.assertNotIn("b:latest", e.exception.error)  # what the key may not use stays unseen
        answer = yield self.in_thread(alice.chat, model="a:latest", messages=HI)
        self.assertEqual(answer.message.content, "Hello from a")
