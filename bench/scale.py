"""Benchmark: many waiting requests and many concurrent streams.

1. Queue: one request holds the only slot of the model (the backend is "paused" on it), then
   ``--waiting`` more requests arrive and wait in llmswap's queue.  Measured: llmswap's resident
   memory per waiting request, and ``/health`` latency while they all wait (is the event loop
   still responsive?).  Then the holding client hangs up, the queue drains, and every waiting
   request must get its 200.  Once with plain requests, once with streams (which get
   keep-alive comments while they wait), each in a fresh llmswap.
2. Open requests, side by side: as many requests relayed at once while the backend holds them,
   through llmswap and through the two bare floors (bench/floors.py): each one's memory per open
   request, i.e. what the HTTP stack alone costs to hold a request.
3. Streams: ``--streams`` concurrent SSE streams relayed at once; no error, no event lost.

    python -m bench.scale [--waiting 10000] [--streams 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

import aiohttp

from bench.harness import (
    FLOORS,
    PYTHON,
    ROOT,
    fast_backend_model,
    floor,
    free_port,
    get,
    llmswap,
    percentile,
    post,
    process,
    rss_bytes,
    save,
)
from bench.streaming import run as run_streams


def _client() -> aiohttp.ClientSession:
    """A client for thousands of requests at once, each allowed to wait long."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=1800)
    )


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


async def queue_case(port: int, pid: int, waiting: int, stream: bool) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with _client() as session:
        before = rss_bytes(pid)
        hold = asyncio.ensure_future(session.post(url, json={"model": "bench", "hold": 3600}))

        async def queued() -> int:
            async with session.post(url, json={"model": "bench", "stream": stream}) as r:
                await r.read()
                return r.status

        async def health() -> Any:
            return json.loads((await asyncio.to_thread(get, port, "/health", 60))[1])

        async def latencies(path: str, n: int = 50) -> list[float]:
            out = []
            for _ in range(n):
                t = time.monotonic()
                await asyncio.to_thread(get, port, path, 30)
                out.append(time.monotonic() - t)
            return out

        while (await health())["in_flight"] != 1:
            await asyncio.sleep(0.05)
        scrape_idle = await latencies("/metrics")
        started = time.monotonic()
        calls = [asyncio.ensure_future(queued()) for _ in range(waiting)]
        while (await health())["queue_size"] < waiting:
            await asyncio.sleep(0.2)
        enqueued = time.monotonic() - started
        await asyncio.sleep(1)
        during = rss_bytes(pid)
        health_waiting = await latencies("/health")
        scrape_waiting = await latencies("/metrics")
        hold.cancel()  # the holding client hangs up: llmswap releases the slot at once
        drained_from = time.monotonic()
        statuses = await asyncio.gather(*calls, return_exceptions=True)
        drained = time.monotonic() - drained_from
    return {
        "waiting": waiting,
        "enqueue_s": enqueued,
        "rss_before_mb": before / 2**20,
        "rss_waiting_mb": during / 2**20,
        "bytes_per_waiting_request": (during - before) / waiting,
        "health_p50_ms": percentile(health_waiting, 0.5) * 1e3,
        "health_max_ms": max(health_waiting) * 1e3,
        "metrics_idle_p50_ms": percentile(scrape_idle, 0.5) * 1e3,
        "metrics_waiting_p50_ms": percentile(scrape_waiting, 0.5) * 1e3,
        "answered_200": sum(1 for s in statuses if s == 200),
        "drain_s": drained,
    }


def _connections_to(port: int) -> int:
    """Established TCP connections whose local end is ``port`` (the backend's side)."""
    local = f":{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        rows = (row.split() for row in table)
        return sum(1 for row in rows if row[1].endswith(local) and row[3] == "01")


async def held_case(port: int, pid: int, held: int, backend: int) -> float:
    """Bytes of resident memory per request relayed while the backend holds it.

    All are under way once the backend has that many connections (one may be the idle one the
    warm-up request left in the proxy's pool: one in thousands, noise).
    """
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with _client() as session:
        before = rss_bytes(pid)
        calls = [
            asyncio.ensure_future(session.post(url, json={"model": "bench", "hold": 3600}))
            for _ in range(held)
        ]
        deadline = time.monotonic() + 600
        while _connections_to(backend) < held:
            if time.monotonic() > deadline:
                raise SystemExit(f"port {port}: {held} requests never all reached the backend")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        during = rss_bytes(pid)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    return (during - before) / held


def held_everywhere(backend: int, held: int) -> dict[str, float]:
    """Memory per held request through llmswap and through each floor, one after another."""
    out = {}
    model = fast_backend_model(backend, concurrency=held)
    with llmswap({"bench": model}, queue_size=held + 10, request_timeout=1800) as (port, proc):
        post(port, "/v1/chat/completions", b'{"model": "bench"}')
        out["llmswap"] = asyncio.run(held_case(port, proc.pid, held, backend))
    # llmswap stopped the backend it started; the floors get one of their own, same port.
    backend_args = [PYTHON, "-m", "bench.backend", "--port", str(backend)]
    with process(backend_args, backend, cwd=ROOT):
        for kind, name in FLOORS.items():
            with floor(kind, backend) as (port, proc):
                post(port, "/v1/chat/completions", b'{"model": "bench"}')
                out[name] = asyncio.run(held_case(port, proc.pid, held, backend))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--waiting", type=int, default=10000)
    p.add_argument("--held", type=int, default=2000, help="open requests per server in part 2")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--events", type=int, default=50, help="per stream")
    p.add_argument("--json")
    args = p.parse_args(argv)
    raise_fd_limit(2 * max(args.waiting, args.held, args.streams) + 1000)  # children inherit it
    backend = free_port()
    model = fast_backend_model(backend, concurrency=1)
    settings = {"queue_size": args.waiting + 10, "request_timeout": 1800}
    queue = {}
    for kind in ("plain", "stream"):
        with llmswap({"bench": model}, **settings) as (port, proc):
            post(port, "/v1/chat/completions", b'{"model": "bench"}')
            queue[kind] = asyncio.run(queue_case(port, proc.pid, args.waiting, kind == "stream"))
    held = held_everywhere(backend, args.held)
    model = fast_backend_model(backend, concurrency=args.streams)
    with llmswap({"bench": model}, queue_size=args.streams + 10) as (port, _):
        post(port, "/v1/chat/completions", b'{"model": "bench"}')
        streams = asyncio.run(run_streams(port, args.streams, args.events))
    print(f"Queue: {args.waiting} requests waiting behind one held request")
    print(
        "| requests | RSS before MB | RSS waiting MB | bytes per waiting request "
        "| /health p50 ms | /health max ms | /metrics p50 ms, none waiting | /metrics p50 ms, "
        "all waiting | answered 200 | drain s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, q in queue.items():
        print(f"| {kind} | {q['rss_before_mb']:.1f} | {q['rss_waiting_mb']:.1f} "
              f"| {q['bytes_per_waiting_request']:.0f} | {q['health_p50_ms']:.1f} "
              f"| {q['health_max_ms']:.1f} | {q['metrics_idle_p50_ms']:.2f} "
              f"| {q['metrics_waiting_p50_ms']:.2f} | {q['answered_200']}/{q['waiting']} "
              f"| {q['drain_s']:.1f} |")  # fmt: skip
    print(f"Open requests: {args.held} relayed at once while the backend holds them")
    print("| server | bytes per open request |")
    print("|---|---|")
    for name, per in held.items():
        print(f"| {name} | {per:.0f} |")
    print(f"Streams: {streams['streams']:.0f} concurrent x {streams['events_per_stream']:.0f} "
          f"events: {streams['complete_streams']:.0f} complete, {streams['events_lost']:.0f} "
          f"events lost, {streams['events_per_s']:.0f} events/s")  # fmt: skip
    out = {"args": vars(args), "queue": queue, "held": held, "streams": streams}
    return save(out, args.json)


if __name__ == "__main__":
    main()
