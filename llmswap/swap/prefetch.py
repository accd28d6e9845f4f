"""Read ahead: the next model's weight files into the page cache while another model serves.

A backend loads its weights at the disk's speed unless they are already in the page cache; a
20 GB model on a 500 MB/s SSD is 40 s of reading.  When a request waits for a model the policy
will load next (the loaded model still answers its batch), or a load begins by draining the
models it evicts, those seconds can pass meanwhile: a thread reads the files, and the load that
follows reads memory.

It must not slow the model that serves now: its weights, mapped by the backend, are page cache
the kernel counts as available.  So a read-ahead takes at most ``MemAvailable`` minus
``prefetch_reserve`` minus what the loaded models' own files hold in the cache, skips what is
cached already, and stops when cancelled (nobody waits for the model any more, or its load
ended).  Residency is measured with ``mincore(2)`` on a read-only mapping: no data is read.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmswap.config.config import Config
from llmswap.config.model import ModelConfig
from llmswap.config.weights import weight_files

log = Logger()

PAGE = mmap.PAGESIZE
CHUNK = 8 * 2**20  # read and measured in these steps: a cancellation is seen within one
# A residency measurement this recent is good enough for /health.
MEASURE_EVERY = 2.0


@attrs.frozen
class Residency:
    """How much of a model's weight files is in the page cache, in bytes."""

    total: int
    cached: int


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value
_RESIDENT = bytes(b & 1 for b in range(256))  # mincore's byte per page: its low bit says cached


class _Mapping:
    """A read-only mapping of a file, to ask which of its pages are cached (nothing is read)."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if self.address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap failed")

    def cached(self, offset: int, length: int) -> int:
        """Bytes of [offset, offset + length) in the page cache (``offset`` page-aligned)."""
        pages = (length + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(self.address + offset), length, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        resident = bytes(vec).translate(_RESIDENT).count(1)  # C speed: this runs during loads
        return min(length, resident * PAGE)

    def close(self) -> None:
        _libc.munmap(self.address, self.size)


def _here(config: Config) -> dict[str, ModelConfig]:
    """The instances whose files are on this machine (another box's page cache is its own)."""
    return {n: m for n, m in config.instances.items() if config.hosts[m.host].docker.local}


def residency(files: Iterable[str]) -> Residency:
    """Measure, in the calling thread (it makes system calls; never the reactor's)."""
    total = cached = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                total += size
                if size:
                    m = _Mapping(f.fileno(), size)
                    try:
                        cached += sum(
                            m.cached(o, min(CHUNK, size - o)) for o in range(0, size, CHUNK)
                        )
                    finally:
                        m.close()
        except OSError:
            continue
    return Residency(total, cached)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def read_ahead(files: Iterable[str], budget: Callable[[], int], cancelled: threading.Event) -> int:
    """Read the files' uncached chunks until ``budget()`` bytes are read or ``cancelled`` is set;
    returns the bytes read.  The budget is asked for at the first uncached chunk: files wholly
    cached (a model loaded before, as a swapping box's usually are) cost one residency pass."""
    done = 0
    buf = bytearray(CHUNK)
    allowed: int | None = None
    for path in files:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if not size:
                continue
            m = _Mapping(f.fileno(), size)
            try:
                for offset in range(0, size, CHUNK):
                    length = min(CHUNK, size - offset)
                    if cancelled.is_set():
                        return done
                    if m.cached(offset, length) < length:
                        if allowed is None:
                            allowed = budget()
                        if done + length > allowed:
                            return done
                        f.seek(offset)
                        f.readinto(memoryview(buf)[:length])
                        done += length
            finally:
                m.close()
    return done


class Prefetcher(Service):
    """Reads one model's files ahead at a time; :meth:`want` says which, or none."""

    name = "prefetch"

    def __init__(self, config: Callable[[], Config], reactor: Any) -> None:
        self._config = config
        self._reactor = reactor
        self._model: str | None = None
        self._cancelled = threading.Event()
        self._measured: dict[str, Residency] = {}
        self._measured_at = float("-inf")
        self._waiting: list[Deferred[dict[str, Residency]]] = []

    @property
    def reading(self) -> str | None:
        """The model whose files are read ahead (or were: until another or None is wanted)."""
        return self._model

    def want(self, model: str | None, loaded: Sequence[str] = ()) -> None:
        """Read ``model``'s files ahead, sparing the cache of the ``loaded`` models' files;
        None (or another model) cancels the read under way."""
        if model == self._model:
            return
        self._cancelled.set()
        self._model = None
        if model is None or not self.running:
            return
        config = self._config()
        ours = _here(config)
        if model not in ours or not ours[model].prefetch:
            return
        spared = [ours[n] for n in loaded if n in ours]
        self._model, self._cancelled = model, threading.Event()
        d = self._in_thread(_read, ours[model], spared, config.prefetch_reserve,
                            self._cancelled)  # fmt: skip
        d.addErrback(lambda f: log.failure("prefetch of {model} failed", f, model=model))

    def residency(self) -> Deferred[dict[str, Residency]]:
        """Each model's cache residency (models with weight files only), measured in a thread
        at most ``MEASURE_EVERY`` seconds ago."""
        now = self._reactor.seconds()
        if now - self._measured_at < MEASURE_EVERY:
            return succeed(self._measured)
        d: Deferred[dict[str, Residency]] = Deferred()
        self._waiting.append(d)
        if len(self._waiting) == 1:
            models = list(_here(self._config()).values())
            measuring = self._in_thread(_measure, models)
            measuring.addCallbacks(self._measured_now, self._not_measured, (now,))
        return d

    def _measured_now(self, result: dict[str, Residency], at: float) -> None:
        self._measured, self._measured_at = result, at
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(result)

    def _not_measured(self, failure: Failure) -> None:
        log.failure("measuring the page cache failed", failure)
        self._measured_now({}, float("-inf"))

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def stopService(self) -> None:
        super().stopService()
        self._cancelled.set()
        self._model = None


def _read(
    model: ModelConfig, spared: list[ModelConfig], reserve: int, cancelled: threading.Event
) -> None:
    """A prefetch, in a thread: the budget is measured once there is something to read (the
    loaded models' files can be tens of gigabytes of pages to ask about)."""

    def budget() -> int:
        kept = residency(f for m in spared for f in weight_files(m)).cached
        return max(0, mem_available() - reserve - kept)

    read = read_ahead(weight_files(model), budget, cancelled)
    log.info(
        "prefetch {model}: read {mib:.0f} MiB ahead{why}",
        model=model.name,
        mib=read / 2**20,
        why=" (cancelled)" if cancelled.is_set() else "",
    )


def _measure(models: list[ModelConfig]) -> dict[str, Residency]:
    files = {m.name: weight_files(m) for m in models}
    return {name: residency(f) for name, f in files.items() if f}
