"""Read-ahead: which files are a model's weights, what of them is cached (mincore), reading
them within a budget, and the manager asking for the model the policy will load next."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.defer import CancelledError, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest

from llmswap.config.config import parse
from llmswap.config.model import ModelConfig
from llmswap.config.weights import weight_files
from llmswap.swap.manager import SwapManager
from llmswap.swap.prefetch import CHUNK, Prefetcher, read_ahead, residency
from llmswap.swap.queue import Lease
from llmswap.testing import MemoryBackend, MemoryHTTP
from tests.support import HI, wait_for
from tests.test_daemon import DaemonTestCase


def model(**settings: Any) -> Any:
    raw = {"backend_url": "http://a:1/v1", "cmd": "x", **settings}
    return parse({"models": {"a": raw}}).models["a"]


def evicted(path: Path, size: int) -> str:
    """A file of ``size`` bytes written to disk and dropped from the page cache."""
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return str(path)


def test_weight_files_come_from_the_command_with_split_parts_or_from_files(
    tmp_path: Path,
) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    parts = [tmp_path / f"big-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for p in parts:
        p.write_bytes(b"x")
    assert weight_files(model(cmd=["llama-server", "-m", str(gguf), "--port", "1"])) == [str(gguf)]
    assert weight_files(model(cmd=f"llama-server --model={parts[0]}")) == list(map(str, parts))
    assert weight_files(model(cmd=f"llama-server -m {tmp_path}/missing.gguf")) == []
    # files: replaces what the command says; a directory (vLLM's model dir) brings its files.
    assert weight_files(
        model(cmd=f"x -m {gguf}", files=[str(tmp_path / "big-00001-of-00003.gguf"), str(tmp_path)])
    ) == [
        *map(str, parts),
        str(gguf),
    ]


def test_residency_and_read_ahead_within_a_budget(tmp_path: Path) -> None:
    size = 6 * CHUNK
    path = evicted(tmp_path / "w.gguf", size)
    before = residency([path])
    if before.cached > size // 2:
        pytest.skip("this filesystem keeps the file cached (tmpfs?)")
    assert before.total == size
    # A budget of two chunks reads two chunks; a cancelled read reads nothing.
    assert read_ahead([path], lambda: 2 * CHUNK, threading.Event()) == 2 * CHUNK
    assert residency([path]).cached >= 2 * CHUNK
    stop = threading.Event()
    stop.set()
    assert read_ahead([path], lambda: size, stop) == 0
    # What is cached already (the two chunks, and what the kernel's own readahead brought) is
    # not read again.
    assert read_ahead([path], lambda: size, threading.Event()) <= 4 * CHUNK
    # (This machine's kernel reclaims a few cold pages on its own: not all need be left.)
    assert residency([path]).cached >= 0.95 * size


def test_files_wholly_cached_cost_no_budget(tmp_path: Path) -> None:
    """The budget asks about the loaded models' files, tens of gigabytes of pages: not when
    there is nothing to read."""
    path = tmp_path / "w.gguf"
    path.write_bytes(os.urandom(2 * CHUNK))  # just written: in the page cache
    if residency([str(path)]).cached < 2 * CHUNK:
        pytest.skip("this machine dropped the file from the cache at once")

    def budget() -> int:
        raise AssertionError("asked for a budget with nothing to read")

    assert read_ahead([str(path)], budget, threading.Event()) == 0


class Recorder:
    """Stands in for the Prefetcher: what the manager asked for, in order."""

    def __init__(self) -> None:
        self.wanted: list[tuple[str | None, list[str]]] = []

    @property
    def reading(self) -> str | None:
        return self.wanted[-1][0] if self.wanted else None

    def want(self, model: str | None, loaded: list[str]) -> None:
        self.wanted.append((model, loaded))


def test_the_manager_reads_ahead_the_model_it_will_load_next_and_stops_when_nobody_waits() -> None:
    clock, log, recorder = Clock(), list[str](), Recorder()
    models = {n: {"backend_url": f"http://{n}:1/v1", "cmd": "x"} for n in "ab"}
    config = parse({"models": models, "linger": 0})
    backends = {n: MemoryBackend(n, log) for n in "ab"}
    manager = SwapManager(config, backends, MemoryHTTP(backends), clock, None, recorder)  # type: ignore[arg-type]
    manager.startService()
    try:
        lease = manager.acquire("a")
        held = cast(Lease, lease.result)
        # a's own load read it ahead; once loaded, nothing is wanted.
        assert recorder.wanted[-2:] == [("a", []), (None, ["a"])]
        waiting = manager.acquire("b")  # a is busy: b is next, read while a answers
        assert recorder.wanted[-1] == ("b", ["a"])
        waiting.addErrback(lambda f: f.trap(CancelledError))
        waiting.cancel()  # the client went away: the read stops
        assert recorder.wanted[-1:] == [(None, ["a"])]
        held.release()
    finally:
        manager.stopService()


class PrefetchDaemonTests(DaemonTestCase):
    @inlineCallbacks
    def test_the_next_models_files_are_read_while_the_loaded_one_answers(self) -> Any:
        size = 8 * CHUNK
        weights = evicted(Path(self.mktemp() + ".gguf"), size)
        if residency([weights]).cached > size // 2:
            raise SkipTest("this filesystem keeps the file cached (tmpfs?)")
        daemon = self.start(
            {
                # a answers slowly (80 tokens, 0.1 s apart): b's request waits meanwhile.
                "a": self.fake("a", tokens=80, token_delay=0.1),
                "b": self.fake("b", files=[weights]),
            },
            linger=0,
        )
        slow = self.in_thread(self._stream, daemon, "a")
        yield wait_for(lambda: daemon.service.health()["models"]["a"]["in_flight"] == 1)
        health = yield self.health()
        self.assertLess(health["models"]["b"]["files"]["cached"], 0.5)
        waiting = self.chat("b")

        @inlineCallbacks
        def cached() -> Any:
            files = (yield self.health())["models"]["b"]["files"]
            return files["cached"] >= 0.95  # a few cold pages may be reclaimed meanwhile

        yield wait_for(cached, timeout=20, interval=0.1)
        # Read while a still answers: b is not loaded yet.
        health = yield self.health()
        self.assertEqual(health["models"]["a"]["in_flight"], 1)
        self.assertEqual(health["models"]["b"]["state"], "stopped")
        self.assertEqual(health["models"]["b"]["files"]["bytes"], size)
        self.assertNotIn("files", health["models"]["a"])  # no weight files known
        yield slow
        answer = yield waiting
        self.assertEqual(answer.choices[0].message.content, "Hello from b")

    def _stream(self, daemon: Any, model: str) -> str:
        chunks = daemon.client().chat.completions.create(model=model, messages=HI, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_prefetch_false_turns_it_off_and_another_model_cancels_the_read_under_way(
    tmp_path: Path,
) -> None:
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"x")
    models = {
        n: {"backend_url": f"http://{n}:1/v1", "cmd": f"llama-server -m {weights}", **extra}
        for n, extra in (("a", {}), ("b", {"prefetch": False}))
    }
    config = parse({"models": models})
    reads: list[tuple[str, threading.Event]] = []
    prefetcher = Prefetcher(lambda: config, Clock())

    def read(f: Any, m: ModelConfig, spared: Any, reserve: Any, cancelled: threading.Event) -> Any:
        reads.append((m.name, cancelled))
        return succeed(None)

    prefetcher._in_thread = read  # type: ignore[method-assign]
    prefetcher.startService()
    prefetcher.want("b")
    assert reads == []
    prefetcher.want("a")
    prefetcher.want("a")  # already reading it
    assert [name for name, _ in reads] == ["a"]
    prefetcher.want(None)
    assert reads[0][1].is_set()
    prefetcher.stopService()
