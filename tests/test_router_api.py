"""llama.cpp's router API on llmswap, asked the same calls as the real router.

The real ``llama-server --models-dir`` (the binary ``make venv`` builds, the bundled GGUF as
models ``a`` and ``b``) and llmswap serving the same two models with the same binary, both as
processes on loopback; every answer compared field by field: the router's keys must be in
llmswap's with the same JSON types, its status words the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.harness import get, post
from bench.router import router, swapper
from llmswap.config.defaults import llama_assets

pytestmark = [pytest.mark.llama, pytest.mark.slow]

WAIT = 180.0  # a bound on waiting for a load: never reached unless something is broken


def same_shape(theirs: Any, ours: Any, path: str = "") -> None:
    """Every key of the router's answer is in llmswap's, with a value of the same JSON type."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{path}: {ours!r} is not an object"
        for key, value in theirs.items():
            assert key in ours, f"{path}.{key} is missing from {sorted(ours)}"
            same_shape(value, ours[key], f"{path}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list), f"{path}: {ours!r} is not a list"
        if theirs and ours:
            same_shape(theirs[0], ours[0], f"{path}[0]")
    elif theirs is not None:
        assert type(ours) is type(theirs), f"{path}: {ours!r} is not like {theirs!r}"


def listed(port: int) -> dict[str, Any]:
    code, body = get(port, "/models")
    assert code == 200, body
    return {m["id"]: m for m in json.loads(body)["data"]}


def call(port: int, path: str, model: str) -> tuple[int, dict[str, Any]]:
    code, body = post(port, path, json.dumps({"model": model}).encode())
    return code, json.loads(body)


def until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.1)


def status(port: int, model: str) -> str:
    return str(listed(port)[model]["status"]["value"])


class Events(threading.Thread):
    """The ``data:`` events of ``GET /models/sse``, as they arrive (a raw socket, which the
    test shuts down when done: the stream never ends by itself)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.sendall(b"GET /models/sse HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.seen: list[dict[str, Any]] = []

    def run(self) -> None:
        with contextlib.suppress(OSError):
            for line in self.sock.makefile("rb"):
                if line.startswith(b"data: "):
                    self.seen.append(json.loads(line[6:]))

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.join(WAIT)
        self.sock.close()

    def statuses(self, model: str) -> list[str]:
        return [e["data"]["status"] for e in list(self.seen) if e["model"] == model]


def exercise(port: int) -> dict[str, Any]:
    """The same calls, in the same order, to either server."""
    out: dict[str, Any] = {"before": listed(port)}
    events = Events(port)
    events.start()
    out["load"] = call(port, "/models/load", "a")
    until(lambda: status(port, "a") == "loaded")
    out["loaded"] = listed(port)
    code, body = get(port, "/v1/models")
    out["v1"] = {m["id"]: m for m in json.loads(body)["data"]}
    out["load_again"] = call(port, "/models/load", "a")
    out["unload_idle"] = call(port, "/models/unload", "b")
    out["load_unknown"] = call(port, "/models/load", "zz")[0]
    out["props"] = json.loads(get(port, "/props")[1])
    code, body = get(port, "/props?model=a")
    out["props_a"] = (code, json.loads(body))
    code, body = get(port, "/slots?model=a")
    out["slots_a"] = (code, json.loads(body))
    until(lambda: "loaded" in events.statuses("a"))
    out["events"] = [e for e in events.seen if e["model"] == "a"]
    events.close()
    return out


def test_the_router_api_answers_as_llama_servers_router(tmp_path: Path) -> None:
    binary, gguf = llama_assets()
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    for n in ("a", "b"):
        os.symlink(gguf, models_dir / f"{n}.gguf")
    with router(binary, models_dir) as (theirs_port, _, _):
        theirs = exercise(theirs_port)
    with swapper(binary, models_dir) as (ours_port, _, _):
        ours = exercise(ours_port)
        unload_all(ours_port)
    for when in ("before", "loaded"):
        assert sorted(ours[when]) == sorted(theirs[when]) == ["a", "b"]
        for model in ("a", "b"):
            same_shape(theirs[when][model], ours[when][model], f"{when}.{model}")
            assert (ours[when][model]["status"]["value"]
                    == theirs[when][model]["status"]["value"])  # fmt: skip
    # While loaded: the backend's own meta (its context size among it), as the router shows it.
    assert ours["loaded"]["a"]["meta"]["n_ctx"] == theirs["loaded"]["a"]["meta"]["n_ctx"] == 2048
    assert "meta" not in ours["loaded"]["b"] and "meta" not in theirs["loaded"]["b"]
    assert ours["loaded"]["a"]["llmswap"]["state"] == "ready"
    for model in ("a", "b"):
        same_shape(
            {k: theirs["v1"][model][k] for k in ("id", "object", "owned_by", "created", "status")},
            ours["v1"][model],
        )
    assert ours["v1"]["a"]["meta"]["n_ctx"] == 2048
    assert ours["load"] == theirs["load"] == (200, {"success": True})
    for change in ("load_again", "unload_idle"):
        (code, body), (their_code, their_body) = ours[change], theirs[change]
        assert code == their_code == 400
        assert body["error"]["message"] == their_body["error"]["message"]
    assert ours["load_unknown"] == theirs["load_unknown"] == 404
    same_shape(theirs["props"], ours["props"])
    assert ours["props"]["role"] == "router"
    # A loaded model's /props is its backend's own.
    (code, props), (their_code, their_props) = ours["props_a"], theirs["props_a"]
    assert code == their_code == 200
    same_shape(their_props, props)
    assert props["default_generation_settings"]["n_ctx"] == 2048
    (code, slots), (their_code, their_slots) = ours["slots_a"], theirs["slots_a"]
    assert code == their_code == 200
    same_shape(their_slots, slots)
    assert [s["n_ctx"] for s in slots] == [s["n_ctx"] for s in their_slots]
    # The load as events: loading, then loaded.
    same_shape(theirs["events"][-1], ours["events"][-1])
    statuses = [e["data"]["status"] for e in ours["events"]]
    assert statuses[-2:] == ["loading", "loaded"]


def unload_all(port: int) -> None:
    """pi's "unload all", with curl as llama.cpp's docs write it: list, unload each loaded."""
    base = f"http://127.0.0.1:{port}"
    models = json.loads(subprocess.run(["curl", "-s", f"{base}/models"], capture_output=True,
                                       check=True, timeout=30).stdout)["data"]  # fmt: skip
    loaded = [m["id"] for m in models if m["status"]["value"] == "loaded"]
    assert loaded == ["a"]
    for model in loaded:
        answer = subprocess.run(
            ["curl", "-s", "-X", "POST", f"{base}/models/unload", "-H",
             "Content-Type: application/json", "-d", json.dumps({"model": model})],
            capture_output=True, check=True, timeout=30,
        )  # fmt: skip
        assert json.loads(answer.stdout) == {"success": True}
    until(lambda: all(m["status"]["value"] == "unloaded" for m in listed(port).values()))
    assert all(m["llmswap"]["state"] == "stopped" for m in listed(port).values())
