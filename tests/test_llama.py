"""End to end with the real llama.cpp llama-server and the real Gemma 3 270M GGUF.

The models are the built-in defaults of `make run` (llmswap.config.defaults), on free ports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import anthropic
import ollama
import pytest
import treq
from openai.types.chat import ChatCompletionMessageParam
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.web.client import Agent

from llmswap.config.defaults import MAX_TOKENS, default_config, llama_assets
from llmswap.memory.ram import RamProbe
from tests.fakebackend import live_processes
from tests.support import (
    GREEDY,
    Daemon,
    anthropic_stream,
    free_ports,
    in_thread,
    terminate,
    wait_answering,
    wait_for,
)

HI: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write one short sentence about the sea."}
]
# Special tokens (ChatML's, Gemma's turns, images and end) that must never reach an answer.
TEMPLATE_TOKENS = r"<\|im_|<start_of_|<end_of_|<eos>|<\|endoftext"


def llama_server_groups() -> set[int]:
    """Process groups of live llama-server processes (each backend is its own group)."""
    binary = os.path.realpath(llama_assets()[0])
    return {
        pgid
        for _, pgid, argv in live_processes()
        if argv[0] and os.path.realpath(argv[0].decode()) == binary
    }


@pytest.mark.llama
@pytest.mark.slow
class LlamaDaemonCase(unittest.TestCase):
    """llmswap serving the built-in llama-server models, clients in threads of their own."""

    timeout = 300

    def setUp(self) -> None:
        self.threads = ThreadPool(minthreads=0, maxthreads=4, name="test-clients")
        self.threads.start()
        self.addCleanup(self.threads.stop)
        a, b, c = free_ports(3)
        config = default_config((a, b, c))
        self.daemon = Daemon.from_config(config, os.path.abspath(self.mktemp()))
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    def call(self, f: Any, *args: Any, **kw: Any) -> Any:
        return in_thread(self.threads, f, *args, **kw)


class LlamaServerTests(LlamaDaemonCase):
    def setUp(self) -> None:
        super().setUp()
        self.client = self.daemon.client(timeout=120)
        self.seen_groups: list[int] = []
        self.sampler = LoopingCall(lambda: self.seen_groups.append(len(llama_server_groups())))
        self.sampler.start(0.02)
        self.addCleanup(self._stop_sampler)

    def _stop_sampler(self) -> None:
        if self.sampler.running:
            self.sampler.stop()

    @inlineCallbacks
    def test_the_users_messages_reach_the_model_in_gemmas_turns(self) -> Any:
        """The prompt llama-server renders holds the message, in Gemma's turn markers."""
        agent = treq.client.HTTPClient(Agent(reactor))
        said = "Name three colours of the sea."
        response = yield agent.post(
            self.daemon.url + "/upstream/gemma3/apply-template",
            json={"messages": [{"role": "user", "content": said}]},
        )
        self.assertEqual(response.code, 200)
        prompt = (yield response.json())["prompt"]
        self.assertIn(f"<start_of_turn>user\n{said}<end_of_turn>", prompt)
        self.assertTrue(prompt.endswith("<start_of_turn>model\n"), prompt)

        def asked(text: str) -> Any:
            return self.call(
                self.client.chat.completions.create,
                model="gemma3", max_tokens=16, extra_body=GREEDY,
                messages=[{"role": "user", "content": text}],
            )  # fmt: skip

        short = yield asked("Hi")
        long = yield asked("Hi. " + said + " Answer in one short sentence, please.")
        # Each word of the message is in the prompt the model read.
        self.assertGreater(long.usage.prompt_tokens, short.usage.prompt_tokens + 10)
        # A raw completion samples from any token; the image markers are banned at the source.
        raw = yield self.call(
            self.client.completions.create, model="gemma3", prompt="Once upon a time", max_tokens=64
        )
        for text in (short.choices[0].message.content, long.choices[0].message.content,
                     raw.choices[0].text):  # fmt: skip
            self.assertNotRegex(text, TEMPLATE_TOKENS)

    @inlineCallbacks
    def test_chat_stream_completions_embeddings_models_and_swaps(self) -> Any:
        chat = yield self.call(
            self.client.chat.completions.create, model="gemma3", messages=HI, max_tokens=24
        )
        self.assertTrue(chat.choices[0].message.content.strip())
        self.assertNotRegex(chat.choices[0].message.content, TEMPLATE_TOKENS)
        self.assertEqual(chat.model, "gemma3")  # its --alias, not the GGUF's path
        self.assertEqual(len(llama_server_groups()), 1)

        # No max_tokens: the demo models' own cap ends it, not the 4,096-token context.
        uncapped = yield self.call(self.client.chat.completions.create, model="gemma3", messages=HI)
        self.assertLessEqual(uncapped.usage.completion_tokens, MAX_TOKENS)
        self.assertNotRegex(uncapped.choices[0].message.content, TEMPLATE_TOKENS)

        stream = yield self.call(
            self.client.chat.completions.create,
            model="gemma3-creative",
            messages=HI,
            max_tokens=48,
            stream=True,
        )

        def consume() -> list[tuple[float, str]]:
            return [
                (time.monotonic(), c.choices[0].delta.content)
                for c in stream
                if c.choices and c.choices[0].delta.content
            ]

        chunks = yield self.call(consume)
        self.assertGreater(len(chunks), 1)
        self.assertNotRegex("".join(text for _, text in chunks), TEMPLATE_TOKENS)
        # Relayed as generated: the first token is in hand before the last one is produced.
        self.assertLess(chunks[0][0], chunks[-1][0])

        legacy = yield self.call(
            self.client.completions.create,
            model="gemma3",
            prompt="The capital of France is",
            max_tokens=8,
        )
        self.assertTrue(legacy.choices[0].text)

        emb = yield self.call(self.client.embeddings.create, model="gemma3-embed", input="hello")
        self.assertGreater(len(emb.data[0].embedding), 100)

        models = yield self.call(self.client.models.list)
        self.assertEqual([m.id for m in models.data], ["gemma3", "gemma3-creative", "gemma3-embed"])

        for model in ("gemma3-creative", "gemma3", "gemma3-creative"):
            r = yield self.call(
                self.client.chat.completions.create, model=model, messages=HI, max_tokens=8
            )
            self.assertEqual(r.object, "chat.completion")
        self.sampler.stop()
        self.assertLessEqual(max(self.seen_groups), 1)
        self.assertIn(1, self.seen_groups)
        health = self.daemon.service.health()
        self.assertEqual(health["current_model"], "gemma3-creative")
        self.assertGreater(health["models"]["gemma3"]["last_load_seconds"], 0)


class OllamaOnLlamaServerTests(LlamaDaemonCase):
    """The official ``ollama`` client against the real llama-server models."""

    def setUp(self) -> None:
        super().setUp()
        self.client = ollama.Client(host=self.daemon.url, timeout=120)

    def ask(self, method: str, *args: Any, **kw: Any) -> Any:
        return in_thread(self.threads, getattr(self.client, method), *args, **kw)

    @inlineCallbacks
    def test_list_show_ps_chat_generate_embed_and_keep_alive_0(self) -> Any:
        listed = yield self.ask("list")
        self.assertEqual(
            [m.model for m in listed.models],
            ["gemma3:latest", "gemma3-creative:latest", "gemma3-embed:latest"],
        )
        chat = yield self.ask("chat", model="gemma3", messages=HI, options={"num_predict": 24})
        self.assertTrue(chat.message.content.strip())
        self.assertNotRegex(chat.message.content, TEMPLATE_TOKENS)
        self.assertTrue(chat.done)
        self.assertGreater(chat.load_duration, 0)  # the real swap time llmswap measured
        self.assertGreater(chat.eval_count, 0)
        self.assertGreater(chat.eval_duration, 0)  # llama-server's timings
        shown = yield self.ask("show", "gemma3:latest")
        self.assertEqual(shown.modelinfo["gemma3.context_length"], 4096)  # from /props
        (loaded,) = (yield self.ask("ps")).models
        self.assertEqual(loaded.model, "gemma3:latest")

        stream = yield self.ask(
            "chat", model="gemma3-creative", messages=HI, stream=True, options={"num_predict": 24}
        )
        chunks = yield in_thread(self.threads, list, stream)
        self.assertGreater(len(chunks), 2)  # relayed piece by piece
        self.assertTrue(chunks[-1].done and not any(c.done for c in chunks[:-1]))
        self.assertNotRegex("".join(c.message.content for c in chunks), TEMPLATE_TOKENS)

        generated = yield self.ask(
            "generate", model="gemma3", prompt="The sea is", options={"num_predict": 8}
        )
        self.assertTrue(generated.response)
        embedded = yield self.ask("embed", model="gemma3-embed", input=["hello", "sea"])
        self.assertEqual(len(embedded.embeddings), 2)
        self.assertGreater(len(embedded.embeddings[0]), 100)

        # Open WebUI's eject: an empty generate with keep_alive 0 stops the real process.
        self.assertEqual(len(llama_server_groups()), 1)
        ejected = yield self.ask("generate", model="gemma3-embed", keep_alive=0)
        self.assertEqual(ejected.done_reason, "unload")
        self.assertEqual(llama_server_groups(), set())
        self.assertEqual((yield self.ask("ps")).models, [])


class LlamaSwapHabitsOnLlamaServerTests(LlamaDaemonCase):
    """Anthropic's Messages API, llama.cpp's own routes and ``/upstream/`` on the real
    llama-server, which answers them natively."""

    @inlineCallbacks
    def test_anthropic_messages_llama_cpp_routes_and_upstream(self) -> Any:
        client = anthropic.Anthropic(base_url=self.daemon.url, api_key="unused", max_retries=0,
                                     timeout=120)  # fmt: skip
        messages = [{"role": "user", "content": "Write one short sentence about the sea."}]
        # Greedy (temperature 0): a sampled 270M answer is sometimes only whitespace.
        message = yield self.call(
            client.messages.create,
            model="gemma3", max_tokens=24, messages=messages, extra_body=GREEDY,
        )  # fmt: skip
        self.assertEqual(message.type, "message")
        self.assertTrue(message.content[0].text.strip())
        self.assertGreater(message.usage.output_tokens, 0)

        kinds, text = yield self.call(anthropic_stream, client, "gemma3", messages)
        self.assertEqual(kinds[0], "message_start")
        self.assertIn("content_block_delta", kinds)
        self.assertTrue(text.strip())
        counted = yield self.call(client.messages.count_tokens, model="gemma3", messages=messages)
        self.assertGreater(counted.input_tokens, 0)

        agent = treq.client.HTTPClient(Agent(reactor))
        response = yield agent.post(
            self.daemon.url + "/tokenize", json={"model": "gemma3", "content": "hello world"}
        )
        tokens = (yield response.json())["tokens"]
        self.assertTrue(tokens)
        response = yield agent.post(
            self.daemon.url + "/detokenize", json={"model": "gemma3", "tokens": tokens}
        )
        self.assertIn("hello world", (yield response.json())["content"])

        # /upstream/ loads the model asked for, then reaches llama-server's own routes.
        response = yield agent.get(self.daemon.url + "/upstream/gemma3-creative/props")
        props = yield response.json()
        self.assertEqual(response.code, 200)
        self.assertEqual(props["default_generation_settings"]["n_ctx"], 2048)
        self.assertEqual(self.daemon.service.health()["current_model"], "gemma3-creative")


@pytest.mark.llama
@pytest.mark.slow
class MeasuredFootprintTests(unittest.TestCase):
    """The real llama-server on a probed host-memory device: what it holds is measured, kept,
    and known again after a restart, before the model is loaded."""

    timeout = 300

    def daemon(self, port: int, state: str) -> Daemon:
        binary, gguf = llama_assets()
        model = {
            "cmd": f"{shlex.quote(binary)} -m {shlex.quote(gguf)} --alias gemma3 --host 127.0.0.1"
                   f" --port {port} --no-jinja --chat-template gemma -c 2048 -n 16",
            "backend_url": f"http://127.0.0.1:{port}/v1",
            "startup_timeout": 120, "device": "ram", "memory": "2GiB",
        }  # fmt: skip
        daemon = Daemon({"gemma3": model}, os.path.abspath(self.mktemp()), state_dir=state,
                        devices={"ram": {"memory": "16GiB", "probe": "ram"}})  # fmt: skip
        daemon.start()
        self.addCleanup(daemon.stop)
        return daemon

    @inlineCallbacks
    def test_the_measured_footprint_is_recorded_and_survives_a_restart(self) -> Any:
        threads = ThreadPool(minthreads=0, maxthreads=2, name="test-clients")
        threads.start()
        self.addCleanup(threads.stop)
        (port,) = free_ports(1)
        state = os.path.abspath(self.mktemp())
        first = self.daemon(port, state)

        def memory(daemon: Daemon) -> dict[str, Any]:
            figures: dict[str, Any] = daemon.service.health()["models"]["gemma3"]["memory"]
            return figures

        self.assertIsNone(memory(first)["measured"])
        client = first.client(timeout=120)
        yield in_thread(threads, client.chat.completions.create, model="gemma3", messages=HI)
        yield wait_for(lambda: memory(first)["measured"] is not None, timeout=30)
        measured = memory(first)["measured"]
        # The 253 MB of weights are mapped and read in; far less than the declared 2 GiB.
        self.assertGreater(measured, 150 * 2**20)
        self.assertLess(measured, 2 * 2**30)
        yield first.stop()

        again = self.daemon(port, state)
        self.assertEqual(again.service.health()["models"]["gemma3"]["state"], "stopped")
        yield wait_for(lambda: memory(again)["measured"] == measured, timeout=10)


ALLOCATED = re.compile(r"(?:model|KV|output|compute) buffer size = +([\d.]+) MiB")


@pytest.mark.llama
def test_the_gguf_estimate_of_each_built_in_model_is_within_15_percent_of_llama_servers_own(
    tmp_path: Path,
) -> None:
    """``memory: auto``'s figure beside what llama-server itself reports allocating (its buffer
    lines: model, KV cache, output, compute) and what it is measured to hold once it answered.

    The embedding model reserves a compute buffer for a whole batch of outputs (553 MiB for the
    262,144-token vocabulary), which on the CPU stays untouched until a batch needs it: there the
    estimate is what it allocates, and more than it holds."""
    a, b, c = free_ports(3)
    config = default_config((a, b, c))
    for name, model in config.models.items():
        assert model.estimated is not None and model.cmd is not None
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            server = subprocess.Popen([*model.cmd, "-lv", "4"], stdout=out, stderr=out)
        try:
            path = "/v1/embeddings" if "--embeddings" in model.cmd else "/v1/chat/completions"
            wait_answering(model.health_url, server, timeout=120)
            body = {"model": name, "input": "hi", "messages": [{"role": "user", "content": "hi"}]}
            post(model.backend_url.removesuffix("/v1") + path, body)
            held = RamProbe().held_by([server.pid])
        finally:
            terminate(server)
        allocated = sum(float(m) for m in ALLOCATED.findall(log.read_text())) * 2**20
        assert allocated > 200 * 2**20, log.read_text()[-2000:]
        assert abs(model.estimated - allocated) <= 0.15 * allocated, (name, allocated)
        if "--embeddings" in model.cmd:
            assert model.estimated > held, name
        else:
            assert abs(model.estimated - held) <= 0.15 * held, (name, held)


def post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    urllib.request.urlopen(request, timeout=120).close()
