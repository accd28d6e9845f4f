"""End to end with the real llama.cpp llama-server and the real Gemma 3 270M GGUF.

The models are the built-in defaults of `make run` (llmswap.defaults), on free ports.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from llmswap.defaults import MAX_TOKENS, default_config, llama_assets
from tests.fakebackend import live_processes
from tests.support import Daemon, free_port

HI = [{"role": "user", "content": "Write one short sentence about the sea."}]
# Chat-template tokens (ChatML's, Gemma's) that must never reach a user's answer.
TEMPLATE_TOKENS = r"<\|im_|<start_of_turn>|<end_of_turn>|<\|endoftext"


def llama_server_groups() -> set[int]:
    """Process groups of live llama-server processes (each backend is its own group)."""
    binary = os.path.realpath(llama_assets()[0])
    return {
        pgid
        for _, pgid, argv in live_processes()
        if argv[0] and os.path.realpath(argv[0].decode()) == binary
    }


class LlamaServerTests(unittest.TestCase):
    timeout = 300

    def setUp(self) -> None:
        self.threads = ThreadPool(minthreads=0, maxthreads=4, name="test-clients")
        self.threads.start()
        self.addCleanup(self.threads.stop)
        config = default_config(base_port=free_port())
        self.daemon = Daemon.from_config(config, os.path.abspath(self.mktemp()))
        self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.client = self.daemon.client(timeout=120)
        self.seen_groups: list[int] = []
        self.sampler = LoopingCall(lambda: self.seen_groups.append(len(llama_server_groups())))
        self.sampler.start(0.02)
        self.addCleanup(lambda: self.sampler.running and self.sampler.stop())

    def call(self, f: Any, *args: Any, **kw: Any) -> Any:
        return deferToThreadPool(reactor, self.threads, f, *args, **kw)

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
