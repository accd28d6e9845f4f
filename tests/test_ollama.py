"""Ollama's API in memory: translation both ways, the NDJSON writer, the /api routes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from llmswap import errors
from llmswap.access import Gate
from llmswap.config.config import parse
from llmswap.events import EventBus
from llmswap.metrics import Metrics
from llmswap.ollama import stream, translate
from llmswap.ollama.routes import OllamaProxy, OllamaRoutes
from llmswap.proxy import Proxy
from llmswap.relay.forward import Relay
from llmswap.resource import OpenAIResource
from llmswap.swap.manager import SwapManager
from llmswap.testing import MemoryBackend, MemoryHTTP

MODELS = {"gemma3": None, "qwen3:8b": None}


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (0, 0.0), ("0", 0.0), (300, 300.0), ("5m", 300.0), ("1h30m", 5400.0),
     ("250ms", 0.25), ("-1", float("inf")), (-1, float("inf")), ("-1m", float("inf"))],
)  # fmt: skip
def test_keep_alive_takes_seconds_and_go_durations(value: Any, seconds: float | None) -> None:
    assert translate.keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", True, [1]])
def test_a_keep_alive_that_is_no_duration_is_a_400(value: Any) -> None:
    with pytest.raises(errors.APIError) as e:
        translate.keep_alive(value)
    assert e.value.status == 400


def test_names_resolve_with_or_without_the_latest_tag_and_through_aliases() -> None:
    def lookup(name: str) -> str | None:
        return name if name in MODELS else {"gpt-4o-mini": "gemma3"}.get(name)

    assert translate.resolve("gemma3", lookup, MODELS) == "gemma3"
    assert translate.resolve("gemma3:latest", lookup, MODELS) == "gemma3"
    assert translate.resolve("qwen3:8b", lookup, MODELS) == "qwen3:8b"
    assert translate.resolve("gpt-4o-mini:latest", lookup, MODELS) == "gemma3"
    assert translate.tagged("gemma3") == "gemma3:latest"
    with pytest.raises(errors.APIError) as e:
        translate.resolve("llama3:latest", lookup, MODELS)
    assert e.value.status == 404
    assert "gemma3:latest, qwen3:8b" in e.value.message


def test_chat_translates_images_tools_tool_results_options_format_and_think() -> None:
    request = {
        "messages": [
            {"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo="]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny", "tool_name": "weather"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        "options": {"temperature": 0.2, "top_k": 5, "num_predict": 9, "stop": ["x"],
                    "repeat_penalty": 1.1, "seed": 3, "num_ctx": 4096, "mirostat": 1},
        "format": {"type": "object"},
        "think": False,
    }  # fmt: skip
    body = translate.chat(request, "gemma3", stream=True)
    user, assistant, tool = body["messages"]
    assert user["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    call = assistant["tool_calls"][0]
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
    assert tool == {
        "role": "tool",
        "content": "sunny",
        "tool_call_id": call["id"],
        "name": "weather",
    }
    assert body["tools"] == request["tools"]
    assert (body["temperature"], body["top_k"], body["max_tokens"], body["stop"]) == (
        0.2,
        5,
        9,
        ["x"],
    )
    assert (body["repeat_penalty"], body["seed"]) == (1.1, 3)
    assert "num_ctx" not in body and "mirostat" not in body  # no OpenAI meaning: ignored
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "response", "schema": {"type": "object"}}
    }  # fmt: skip
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_generate_is_a_chat_unless_raw_or_with_a_suffix() -> None:
    path, body = translate.generate(
        {"prompt": "hi", "system": "be brief", "format": "json"}, "m", stream=False
    )
    assert path == "/chat/completions"
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert body["response_format"] == {"type": "json_object"} and "stream" not in body
    path, body = translate.generate({"prompt": "def f(", "suffix": "return x"}, "m", True)
    assert path == "/completions"
    assert (body["prompt"], body["suffix"]) == ("def f(", "return x")
    path, _ = translate.generate({"prompt": "[INST] hi [/INST]", "raw": True}, "m", True)
    assert path == "/completions"


def test_tool_calls_come_back_with_arguments_as_objects() -> None:
    calls = [{"id": "c", "function": {"name": "f", "arguments": '{"a": 1}'}},
             {"id": "d", "function": {"name": "g", "arguments": "not json"}}]  # fmt: skip
    assert translate.tool_calls(calls) == [
        {"function": {"name": "f", "arguments": {"a": 1}}},
        {"function": {"name": "g", "arguments": {"_raw": "not json"}}},
    ]


def _sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks) + (
        b"data: [DONE]\n\n"
    )


def _writer(kind: str, stream_: bool = True) -> tuple[stream.OllamaWriter, Any, Clock]:
    clock = Clock()
    request: Any = DummyRequest([b""])
    writer = stream.OllamaWriter(request, clock, kind, "gemma3:latest", stream_, 0.0, 1.25)
    return writer, request, clock


def test_a_stream_becomes_one_ndjson_object_per_chunk_whatever_the_chunk_boundaries() -> None:
    body = _sse(
        {"choices": [{"delta": {"role": "assistant", "content": "Hel"}}]},
        {"choices": [{"delta": {"reasoning_content": "hmm"}}]},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": "length"}],
         "timings": {"prompt_n": 4, "prompt_ms": 2.0, "predicted_n": 2, "predicted_ms": 8.0}},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
    )  # fmt: skip
    writer, request, clock = _writer(stream.CHAT)
    writer.start(200, Headers())
    written = 0
    for i in range(0, len(body), 7):  # 7-byte pieces: events split anywhere
        writer.data(body[i : i + 7])
        complete = b"".join(request.written).count(b"\n")
        assert complete >= written  # what is complete is written at once
        written = complete
    clock.advance(3)
    writer.end()
    lines = [json.loads(line) for line in b"".join(request.written).splitlines()]
    assert [m["message"].get("content") for m in lines[:3]] == ["Hel", "", "lo"]
    assert lines[1]["message"]["thinking"] == "hmm"
    assert not any(m["done"] for m in lines[:3])
    final = lines[3]
    assert final["done"] and final["done_reason"] == "length"
    assert (final["prompt_eval_count"], final["eval_count"]) == (4, 2)
    assert (final["prompt_eval_duration"], final["eval_duration"]) == (2_000_000, 8_000_000)
    assert (final["total_duration"], final["load_duration"]) == (3_000_000_000, 1_250_000_000)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/x-ndjson"]


def test_streamed_tool_call_fragments_are_written_whole() -> None:
    body = _sse(
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c",
          "function": {"name": "weather", "arguments": '{"ci'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0,
          "function": {"arguments": 'ty": "Paris"}'}}]}, "finish_reason": "tool_calls"}]},
    )  # fmt: skip
    writer, request, _ = _writer(stream.CHAT)
    writer.start(200, Headers())
    writer.data(body)
    writer.end()
    call, final = [json.loads(line) for line in b"".join(request.written).splitlines()]
    assert call["message"]["tool_calls"] == [
        {"function": {"name": "weather", "arguments": {"city": "Paris"}}}
    ]
    assert final["done"] and final["done_reason"] == "stop"


def test_a_backend_error_becomes_ollamas_error_with_its_status() -> None:
    writer, request, _ = _writer(stream.GENERATE)
    writer.start(400, Headers())
    writer.data(b'{"error": {"message": "context too long", "type": "x"}}')
    writer.end()
    assert request.responseCode == 400
    assert json.loads(b"".join(request.written)) == {"error": "context too long"}


def test_a_stream_that_breaks_off_ends_with_an_error_line() -> None:
    writer, request, _ = _writer(stream.GENERATE)
    writer.start(200, Headers())
    writer.data(_sse({"choices": [{"delta": {"content": "par"}}]})[: -len(b"data: [DONE]\n\n")])
    writer.fail("the backend closed the connection", 502)
    lines = [json.loads(line) for line in b"".join(request.written).splitlines()]
    assert lines[0]["response"] == "par"
    assert lines[-1] == {
        "error": "Model 'gemma3:latest' stream interrupted: the backend closed the connection"
    }


def test_a_whole_answer_that_breaks_off_is_an_error_not_an_empty_200() -> None:
    # An answer, or the backend's own error, cut short; closed, or silent too long.
    for status, reason, code in ((200, "the backend closed the connection", 502),
                                 (500, "the backend closed the connection", 502),
                                 (200, "no data for request_timeout (9 s)", 504)):  # fmt: skip
        writer, request, _ = _writer(stream.CHAT, stream_=False)
        writer.start(status, Headers())
        writer.data(b'{"choices": [{"mess')
        writer.fail(reason, code)
        assert request.responseCode == code
        assert json.loads(b"".join(request.written)) == {
            "error": f"Model 'gemma3:latest' answer interrupted: {reason}"
        }


def test_a_stream_that_ends_unfinished_is_never_done() -> None:
    # The backend's body ended (its connection closed) before [DONE] or a finish reason.
    writer, request, _ = _writer(stream.GENERATE)
    writer.start(200, Headers())
    writer.data(_sse({"choices": [{"delta": {"content": "par"}}]})[: -len(b"data: [DONE]\n\n")])
    writer.end()
    lines = [json.loads(line) for line in b"".join(request.written).splitlines()]
    assert lines[0]["response"] == "par"
    assert not any(line.get("done") for line in lines)
    assert lines[-1] == {"error": "Model 'gemma3:latest' stream interrupted: it ended unfinished"}


def test_a_backends_error_event_ends_the_stream_with_its_message_not_done() -> None:
    writer, request, _ = _writer(stream.CHAT)
    writer.start(200, Headers())
    writer.data(_sse({"choices": [{"delta": {"content": "par"}}]}, {"error": {
        "message": "engine died", "type": "InternalServerError", "code": 500}}))  # fmt: skip
    writer.end()
    lines = [json.loads(line) for line in b"".join(request.written).splitlines()]
    assert not any(line.get("done") for line in lines)
    assert lines[-1] == {"error": "engine died"}


def test_answers_that_are_not_streamed_are_one_object() -> None:
    writer, request, _ = _writer(stream.EMBED, stream_=False)
    writer.start(200, Headers())
    writer.data(b'{"data": [{"embedding": [0.5, 1.0]}, {"embedding": [2.0]}], ')
    writer.data(b'"usage": {"prompt_tokens": 7}}')
    writer.end()
    answer = json.loads(b"".join(request.written))
    assert answer["embeddings"] == [[0.5, 1.0], [2.0]] and answer["prompt_eval_count"] == 7
    writer, request, _ = _writer(stream.COMPLETE, stream_=False)
    writer.start(200, Headers())
    writer.data(b'{"choices": [{"text": "42", "finish_reason": "stop"}]}')
    writer.end()
    answer = json.loads(b"".join(request.written))
    assert (answer["response"], answer["done"], answer["done_reason"]) == ("42", True, "stop")


class RoutesTests(unittest.TestCase):
    """The /api routes over an in-memory manager (StubTreq: no sockets)."""

    def setUp(self) -> None:
        self.clock = Clock()
        info = {"family": "gemma3", "parameter_size": "270M", "context_length": 4096,
                "capabilities": ["completion", "tools"]}  # fmt: skip
        models = {
            "gemma3": {"backend_url": "http://gemma3:1/v1", "cmd": "x", "info": info,
                       "memory": "2GiB"},
            "embed": {"backend_url": "http://embed:1/v1", "cmd": "x", "memory": "1GiB",
                      "info": {"capabilities": ["embedding"]}},
        }  # fmt: skip
        config = parse({"models": models, "devices": {"gpu": {"memory": "8GiB"}}, "linger": 0})
        self.backends = {n: MemoryBackend(n, []) for n in models}
        bus = EventBus()
        self.manager = SwapManager(
            config, self.backends, MemoryHTTP(self.backends), self.clock, bus
        )
        self.manager.startService()
        self.addCleanup(self.manager.stopService)
        gate = Gate(None, self.clock)
        relay = Relay(None, self.clock, 1.0)
        ollama = OllamaProxy(self.manager, relay, gate, bus, self.clock)
        routes = OllamaRoutes(self.manager, ollama, gate, MemoryHTTP({}), self.clock)
        api = OpenAIResource(
            self.manager, Proxy(self.manager, relay, gate, bus, self.clock), gate,
            Metrics(bus, self.manager.snapshot), self.clock, None, routes.resource(),
        )  # fmt: skip
        self.stub: Any = StubTreq(api.resource())

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
        d = self.stub.request(method, "http://localhost" + path, data=data)
        self.stub.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        try:
            return response.code, json.loads(content)
        except ValueError:
            return response.code, content

    def test_root_answers_as_ollama_does(self) -> None:
        self.assertEqual(self.call("GET", "/"), (200, b"Ollama is running"))
        self.assertEqual(self.call("HEAD", "/")[0], 200)
        self.assertEqual(self.call("GET", "/api/version")[1], {"version": "0.12.6"})

    def test_tags_list_every_model_with_its_tag_and_details(self) -> None:
        status, body = self.call("GET", "/api/tags")
        self.assertEqual(status, 200)
        names = [(m["name"], m["model"], m["size"]) for m in body["models"]]
        self.assertEqual(names, [("gemma3:latest", "gemma3:latest", 2 * 2**30),
                                 ("embed:latest", "embed:latest", 2**30)])  # fmt: skip
        details = body["models"][0]["details"]
        self.assertEqual((details["family"], details["parameter_size"]), ("gemma3", "270M"))

    def test_show_reports_capabilities_and_context_length_from_the_config(self) -> None:
        status, body = self.call("POST", "/api/show", {"model": "gemma3:latest"})
        self.assertEqual(status, 200)
        self.assertEqual(body["capabilities"], ["completion", "tools"])
        self.assertEqual(body["model_info"]["gemma3.context_length"], 4096)
        status, body = self.call("POST", "/api/show", {"model": "nope"})
        self.assertEqual(status, 404)
        self.assertIn("gemma3:latest", body["error"])

    def test_ps_shows_what_is_loaded_with_its_expiry_and_memory(self) -> None:
        self.assertEqual(self.call("GET", "/api/ps"), (200, {"models": []}))
        self.successResultOf(self.manager.acquire("embed")).release()
        self.manager.keep_alive("embed", 600)
        (loaded,) = self.call("GET", "/api/ps")[1]["models"]
        self.assertEqual((loaded["name"], loaded["size_vram"]), ("embed:latest", 2**30))
        self.assertTrue(loaded["expires_at"].endswith("Z"))

    def test_every_error_here_is_ollama_shaped(self) -> None:
        cases = [
            ("POST", "/api/pull", {"model": "llama3"}, 501, "serves the models in its config"),
            ("DELETE", "/api/delete", {"model": "gemma3"}, 501, "'delete' is not available"),
            ("GET", "/api/nothing", None, 404, "Unknown endpoint GET /api/nothing"),
            ("GET", "/api/chat", None, 405, "Method GET is not allowed"),
            ("POST", "/api/chat", b"{not json", 400, "not valid JSON"),
            ("POST", "/api/chat", {"model": "x" * 5000}, 404, "... (5000 characters)"),
            ("POST", "/api/generate", {"model": "gemma3", "keep_alive": "soon"}, 400, "keep_alive"),
            ("POST", "/api/embed", {"model": "embed", "input": 3}, 400, "input must be a string"),
        ]  # fmt: skip
        for method, path, body, status, message in cases:
            got_status, got = self.call(method, path, body)
            self.assertEqual((got_status, set(got)), (status, {"error"}), path)
            self.assertIn(message, got["error"])

    def test_an_empty_request_with_keep_alive_0_unloads_without_loading(self) -> None:
        body = self.call("POST", "/api/generate", {"model": "gemma3", "keep_alive": 0})[1]
        self.assertEqual(body["done_reason"], "unload")
        self.assertEqual(self.backends["gemma3"].log, [])  # never started
        status, body = self.call("POST", "/api/chat", {"model": "gemma3", "messages": []})
        self.assertEqual((status, body["done_reason"]), (200, "load"))
        self.assertTrue(self.backends["gemma3"].running)
        body = self.call("POST", "/api/chat", {"model": "gemma3:latest", "keep_alive": "0s"})[1]
        self.assertEqual(body["done_reason"], "unload")
        self.assertFalse(self.backends["gemma3"].running)
