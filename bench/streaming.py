"""Benchmark: streaming relay throughput and the delay each event gains, direct vs llmswap.

The fast backend stamps every SSE event with the time it generated it; the client (aiohttp)
counts events and measures how late each arrived.  One long stream shows the relay's ceiling;
256 concurrent streams show it under fan-in.  Every stream must end with ``[DONE]`` and carry
every event, or it counts as an error.

    python -m bench.streaming [--events 20000] [--streams 256] [--per-stream 500]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp

from bench.harness import fast_backend_model, free_port, llmswap, percentile, post, save


async def one_stream(
    session: aiohttp.ClientSession, port: int, events: int, interval: float, delays: list[float]
) -> int:
    """Relay one stream; returns the number of events received (``[DONE]`` excluded)."""
    body = {"model": "bench", "stream": True, "events": events, "interval": interval}
    got = 0
    async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            return -1
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            now = time.time()
            sent = float(line[line.rindex(b'"t": ') + 5 : line.rindex(b"}")])
            delays.append(now - sent)
            got += 1
    return got


async def run(port: int, streams: int, events: int, interval: float = 0.0) -> dict[str, float]:
    delays: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        counts = await asyncio.gather(
            *(one_stream(session, port, events, interval, delays) for _ in range(streams)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
    complete = sum(1 for c in counts if c == events)
    received = sum(c for c in counts if isinstance(c, int) and c > 0)
    return {
        "streams": streams,
        "events_per_stream": events,
        "complete_streams": complete,
        "events_lost": streams * events - received,
        "events_per_s": received / elapsed,
        "delay_p50_ms": percentile(delays, 0.5) * 1e3,
        "delay_p99_ms": percentile(delays, 0.99) * 1e3,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=20000, help="events in the single stream")
    p.add_argument("--streams", type=int, default=256, help="concurrent streams")
    p.add_argument("--per-stream", type=int, default=500, help="events per concurrent stream")
    p.add_argument(
        "--interval", type=float, default=0.02, help="s between events in the paced streams"
    )
    p.add_argument("--json")
    args = p.parse_args(argv)
    backend = free_port()
    results: dict[str, dict[str, dict[str, float]]] = {}
    model = fast_backend_model(backend, concurrency=max(64, args.streams))
    with llmswap({"bench": model}, queue_size=max(100, args.streams)) as (proxy, _):
        post(proxy, "/v1/chat/completions", b'{"model": "bench"}')
        for name, port in (("direct", backend), ("llmswap", proxy)):
            results[name] = {
                "one": asyncio.run(run(port, 1, args.events)),
                "many": asyncio.run(run(port, args.streams, args.per_stream)),
                "paced": asyncio.run(run(port, args.streams, 100, args.interval)),
            }
    print("Streaming relay (SSE), fast backend, aiohttp client")
    print(
        "| target | case | events/s | event delay p50 ms | p99 ms | complete streams "
        "| events lost |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, cases in results.items():
        for case, r in cases.items():
            label = "1 stream" if case == "one" else f"{r['streams']:.0f} streams"
            if case == "paced":
                label += f" paced {args.interval * 1e3:g} ms"
            cells = [
                name,
                f"{label} x {r['events_per_stream']:.0f} events",
                f"{r['events_per_s']:.0f}",
                f"{r['delay_p50_ms']:.2f}",
                f"{r['delay_p99_ms']:.2f}",
                f"{r['complete_streams']:.0f}/{r['streams']:.0f}",
                f"{r['events_lost']:.0f}",
            ]
            print("| " + " | ".join(cells) + " |")
    for case in ("one", "many"):
        ratio = results["llmswap"][case]["events_per_s"] / results["direct"][case]["events_per_s"]
        print(f"llmswap/direct events/s ({case}): {ratio:.2f}")
    gained = (
        results["llmswap"]["paced"]["delay_p50_ms"] - results["direct"]["paced"]["delay_p50_ms"]
    )
    print(f"delay an event gains through llmswap (paced, p50): {gained:.2f} ms")
    out = {"args": vars(args), "results": results}
    return save(out, args.json)


if __name__ == "__main__":
    main()
