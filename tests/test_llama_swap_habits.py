"""What users bring from llama-swap, through real sockets and fake backends as real processes:
aliases, ``${PORT}``, filters, multipart uploads, ``/upstream/``, Anthropic's Messages API, the
loading status as reasoning, ``/v1/models/<id>``.  (The real llama-server's answers to the same
are in tests/test_llama.py.)"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from typing import Any

import anthropic
import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.web.http_headers import Headers

from tests.support import FAKE, HI, anthropic_stream, read_ledger
from tests.test_daemon import DaemonTestCase


def consecutive_free_ports(n: int) -> int:
    """The first of ``n`` consecutive ports free on loopback now."""
    for start in range(20000, 60000, 17):
        socks = []
        try:
            for port in range(start, start + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free ports")


class HabitTests(DaemonTestCase):
    def starts(self) -> list[str]:
        return [e["name"] for e in read_ledger(self.ledger) if e["event"] == "start"]

    @inlineCallbacks
    def test_aliases_share_one_backend_and_unlisted_models_are_served_not_listed(self) -> Any:
        daemon = self.start({
            "gemma": {**self.fake("gemma"), "aliases": ["gpt-4o-mini", "fast"]},
            "hidden": {**self.fake("hidden"), "unlisted": True},
        })  # fmt: skip
        pids = set()
        for name in ("gemma", "gpt-4o-mini", "fast"):
            raw = yield self.in_thread(
                daemon.client().chat.completions.with_raw_response.create,
                model=name, messages=HI,
            )  # fmt: skip
            pids.add(raw.headers["x-backend-pid"])
        self.assertEqual(len(pids), 1)  # one process served the model and its aliases
        self.assertEqual(self.starts(), ["gemma"])
        listed = yield self.in_thread(daemon.client().models.list)
        self.assertEqual([m.id for m in listed.data], ["gemma"])
        answer = yield self.chat("hidden")
        self.assertEqual(answer.choices[0].message.content, "Hello from hidden")
        for name in ("fast", "hidden"):
            found = yield self.in_thread(daemon.client().models.retrieve, name)
            self.assertEqual(found.id, name)
        response = yield self.http.get(daemon.url + "/v1/models/nope")
        body = yield response.json()
        self.assertEqual((response.code, body["error"]["code"]), (404, "model_not_found"))

    @inlineCallbacks
    def test_a_config_without_port_numbers_runs_three_models(self) -> Any:
        start = consecutive_free_ports(3)
        cmd = (
            f"{sys.executable} {FAKE} --port ${{PORT}} --name ${{MODEL_ID}} --ledger {self.ledger}"
        )
        daemon = self.start({n: {"cmd": cmd} for n in ("a", "b", "c")}, start_port=start)
        for name in ("a", "b", "c"):
            answer = yield self.chat(name)
            self.assertEqual(answer.choices[0].message.content, f"Hello from {name}")
        config = daemon.service.config
        self.assertEqual(config.ports, {"a": start, "b": start + 1, "c": start + 2})
        self.assertEqual(config.models["c"].backend_url, f"http://127.0.0.1:{start + 2}/v1")

    @inlineCallbacks
    def test_filters_change_exactly_the_named_fields_and_nothing_else(self) -> Any:
        filtered = {
            **self.fake("vllm", echo=True),
            "use_model_name": "Qwen/Qwen2.5-7B-Instruct",
            "strip_params": ["top_k", "seed"],
            "set_params": {"temperature": 0.2, "max_tokens": 512},
        }
        self.start({"vllm": filtered, "plain": self.fake("plain", echo=True)})
        sent = {"model": "vllm", "messages": HI, "top_k": 40, "temperature": 1.5, "seed": 7,
                "top_p": 0.9, "user": "ü"}  # fmt: skip
        response, body = yield self.post_json("/v1/chat/completions", sent)
        received = json.loads(body["choices"][0]["message"]["content"])
        self.assertEqual(
            received,
            {"model": "Qwen/Qwen2.5-7B-Instruct", "messages": HI, "temperature": 0.2,
             "top_p": 0.9, "user": "ü", "max_tokens": 512},
        )  # fmt: skip
        # Keys keep their order; a forced one not sent comes last.
        self.assertEqual(
            list(received), ["model", "messages", "temperature", "top_p", "user", "max_tokens"]
        )
        # Without filters the body arrives byte for byte.
        raw = b'{"model":"plain",  "messages":[{"role":"user","content":"hi"}], "top_k": 40}'
        response = yield self.post("/v1/chat/completions", None, raw=raw)
        yield response.content()
        self.assertEqual(
            response.headers.getRawHeaders("x-body-sha256"), [hashlib.sha256(raw).hexdigest()]
        )

    @inlineCallbacks
    def test_an_audio_transcription_is_routed_by_its_form_field_and_relayed_unchanged(self) -> Any:
        daemon = self.start({"whisper": self.fake("whisper"), "other": self.fake("other")})
        yield self.chat("other")
        audio = os.urandom(300_000)
        client = daemon.client()
        raw = yield self.in_thread(
            client.audio.transcriptions.with_raw_response.create,
            model="whisper", file=("hello.wav", io.BytesIO(audio), "audio/wav"), language="fr",
        )  # fmt: skip
        echo = json.loads(raw.content)
        self.assertEqual(echo["text"], "heard whisper")
        self.assertEqual(echo["fields"], {"model": "whisper", "language": "fr"})
        self.assertEqual(
            echo["files"]["file"],
            {"bytes": len(audio), "sha256": hashlib.sha256(audio).hexdigest()},
        )
        self.assertEqual(self.starts(), ["other", "whisper"])  # the swap the form asked for
        # A form without a model is the client's error, OpenAI-shaped.
        response = yield self.http.post(
            daemon.url + "/v1/audio/transcriptions",
            data=b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n"
                 b"abc\r\n--x--\r\n",
            headers=Headers({"Content-Type": ["multipart/form-data; boundary=x"]}),
        )  # fmt: skip
        body = yield response.json()
        self.assertEqual((response.code, body["error"]["param"]), (400, "model"))

    @inlineCallbacks
    def test_upstream_loads_the_model_and_relays_any_method_and_path(self) -> Any:
        daemon = self.start({"a": self.fake("a"), "b": self.fake("b")})
        yield self.chat("a")
        response = yield self.http.get(daemon.url + "/upstream/b/v1/models")
        body = yield response.json()
        self.assertEqual((response.code, body["data"][0]["id"]), (200, "b"))
        self.assertEqual(self.starts(), ["a", "b"])
        payload = os.urandom(200_000)  # not JSON: relayed as it is
        response = yield self.http.post(daemon.url + "/upstream/b/anything?x=1", data=payload)
        body = yield response.json()
        self.assertEqual(body, {"path": "/anything?x=1", "bytes": len(payload),
                                "sha256": hashlib.sha256(payload).hexdigest()})  # fmt: skip
        response = yield self.http.get(daemon.url + "/upstream/nope/props")
        body = yield response.json()
        self.assertEqual((response.code, body["error"]["code"]), (404, "model_not_found"))

    @inlineCallbacks
    def test_the_key_must_be_allowed_the_upstream_model(self) -> Any:
        keys = [{"name": "alice", "key": "sk-alice-0123456789abcdef", "models": ["a"],
                 "upstream": True}]  # fmt: skip
        daemon = self.start({"a": self.fake("a"), "b": self.fake("b")}, auth={"keys": keys})
        headers = Headers({"Authorization": ["Bearer sk-alice-0123456789abcdef"]})
        response = yield self.http.get(daemon.url + "/upstream/b/health", headers=headers)
        self.assertEqual(response.code, 403)
        response = yield self.http.get(daemon.url + "/upstream/a/health", headers=headers)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.starts(), ["a"])

    @inlineCallbacks
    def test_anthropic_clients_send_their_key_as_x_api_key_and_get_events_relayed(self) -> Any:
        keys = [{"name": "claude-code", "key": "sk-ant-0123456789abcdef"}]
        daemon = self.start({"a": self.fake("a")}, auth={"keys": keys})
        client = anthropic.Anthropic(base_url=daemon.url, api_key="sk-ant-0123456789abcdef",
                                     max_retries=0, timeout=30)  # fmt: skip
        messages = [{"role": "user", "content": "hi"}]
        raw = yield self.in_thread(
            client.messages.with_raw_response.create, model="a", max_tokens=16, messages=messages
        )
        self.assertEqual(raw.headers["x-got-api-key"], "no")  # llmswap's key stays here
        message = raw.parse()
        self.assertEqual(json.loads(message.content[0].text)["messages"], messages)
        self.assertEqual(message.usage.output_tokens, 2)

        kinds, text = yield self.in_thread(anthropic_stream, client, "a", messages)
        self.assertIn("content_block_delta", kinds)
        self.assertEqual(json.loads(text)["stream"], True)
        # llmswap's own errors in Anthropic's shape, which the client raises as such.
        error = yield self.in_thread(
            self.assertRaises, anthropic.NotFoundError, client.messages.create,
            model="nope", max_tokens=16, messages=messages,
        )  # fmt: skip
        self.assertEqual(error.body["type"], "error")
        self.assertIn("nope", error.body["error"]["message"])

    @inlineCallbacks
    def test_a_waiting_chat_stream_shows_loading_as_reasoning(self) -> Any:
        daemon = self.start(
            {"slow": {**self.fake("slow", startup_delay=1.5), "loading_status": "reasoning"}},
            keepalive_interval=0.5,
        )

        def stream() -> list[Any]:
            chunks = daemon.client().chat.completions.create(model="slow", messages=HI, stream=True)
            return [c.choices[0].delta for c in chunks if c.choices]

        deltas = yield self.in_thread(stream)
        reasoning = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
        self.assertGreaterEqual(len(reasoning), 2)
        self.assertTrue(reasoning[0].startswith("loading slow, 0 s"), reasoning)
        content = "".join(d.content or "" for d in deltas)
        self.assertEqual(content, "t0 t1 t2 t3 t4 ")
        # Once loaded, it says how long a load usually takes.
        yield daemon.service.manager.unload("slow")
        deltas = yield self.in_thread(stream)
        reasoning = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
        self.assertRegex(reasoning[0], r"^loading slow, 0 s, usually [12] s\n$")


LLAMA_SWAP = """
healthCheckTimeout: 60
logLevel: debug
startPort: {port}
macros:
  fake: "{python} {fake} --ledger {ledger}"
models:
  gemma:
    cmd: |
      # the fake stands in for llama-server
      ${{fake}} --port ${{PORT}}
      --name ${{MODEL_ID}} --echo
    aliases:
      - gpt-4o-mini
    ttl: 300
    useModelName: google/gemma-3
    filters:
      stripParams: "temperature, top_p"
  hidden:
    cmd: ${{fake}} --port ${{PORT}} --name hidden
    unlisted: true
    cmdStop: kill ${{PID}}
    concurrencyLimit: 4
"""


class ConvertTests(DaemonTestCase):
    @inlineCallbacks
    def test_a_llama_swap_config_converts_and_runs_and_what_does_not_carry_over_is_listed(
        self,
    ) -> Any:
        source = os.path.abspath(self.mktemp())
        with open(source, "w") as f:
            f.write(LLAMA_SWAP.format(port=consecutive_free_ports(2), python=sys.executable,
                                      fake=FAKE, ledger=self.ledger))  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "llmswap", "convert-llama-swap", source],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        self.assertEqual(
            done.stderr.splitlines(),
            [
                "not carried over: logLevel: llmswap logs through twistd (`--logfile`, or "
                "stdout with -n)",
                "not carried over: models.hidden.cmdStop: llmswap stops the process group "
                "(SIGTERM, then SIGKILL after `stop_timeout`); for a container use "
                "`container_name`",
                "not carried over: models.hidden.concurrencyLimit: llmswap queues beyond "
                "`concurrency` instead of answering 429",
            ],
        )
        self.assertIn("#   models.hidden.cmdStop:", done.stdout)
        converted = yaml.safe_load(done.stdout)
        daemon = self.start(converted.pop("models"), **converted)
        answer = yield self.in_thread(
            daemon.client().chat.completions.create,
            model="gpt-4o-mini", messages=HI, temperature=0.3,
        )  # fmt: skip
        self.assertEqual(
            json.loads(answer.choices[0].message.content),
            {"model": "google/gemma-3", "messages": HI},
        )
        answer = yield self.chat("hidden")
        self.assertEqual(answer.choices[0].message.content, "Hello from hidden")
        listed = yield self.in_thread(daemon.client().models.list)
        self.assertEqual([m.id for m in listed.data], ["gemma"])
        self.assertEqual(daemon.service.config.models["gemma"].ttl, 300)


class RouteTests(DaemonTestCase):
    @inlineCallbacks
    def test_json_routes_reach_the_backend_at_their_own_path(self) -> Any:
        self.start({"a": self.fake("a")})
        paths = ["/v1/audio/speech", "/v1/images/generations", "/v1/rerank", "/v1/reranking",
                 "/infill", "/completion", "/rerank", "/tokenize", "/detokenize"]  # fmt: skip
        for path in paths:
            response, body = yield self.post_json(path, {"model": "a", "input": "x"})
            self.assertEqual((response.code, body["path"]), (200, path))
