"""Benchmark: Python heap per pending request, layer by layer of llmswap's HTTP stack.

Each layer runs in its own process, holds ``--pending`` requests open (an aiohttp client in a
child process sends them) and reports what tracemalloc counts per pending request:

- ``twisted.web``: a bare resource that returns NOT_DONE_YET (the server alone);
- ``klein``: a Klein route returning a Deferred that has not fired;
- ``klein async``: a Klein ``async def`` route awaiting such a Deferred;
- ``klein, answered later``: a Klein route that returns at once with a resource rendering
  NOT_DONE_YET, the request answered later by callbacks (llmswap's route shape);
- ``llmswap``: requests waiting in llmswap's queue behind one that holds the model's only slot.

Each row also says what it holds above the bare server, so what a route shape costs, and what
llmswap adds to the shape it uses.

    python -m bench.memory [--pending 2000]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import tempfile
import tracemalloc
from typing import Any

from bench.harness import PYTHON, ROOT, fast_backend_model, free_port, save
from bench.scale import raise_fd_limit

LAYERS = ("twisted.web", "klein", "klein async", "klein, answered later", "llmswap")

# The client: one warm-up request, then (on a line from stdin) ``pending`` requests left open.
_CLIENT = """
import asyncio, sys, aiohttp
async def main(port, pending, path):
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=None))
    warm = asyncio.ensure_future(session.post(f"http://127.0.0.1:{port}{path}",
                                              json={"model": "bench", "hold": 3600}))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    calls = [asyncio.ensure_future(session.post(url, json={"model": "bench"}))
             for _ in range(pending)]
    await asyncio.sleep(3600)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
"""


def measure(layer: str, pending: int) -> float:
    """Run one layer in this process; bytes of Python heap per pending request."""
    from klein import Klein
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.task import LoopingCall
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    held: list[Any] = []

    class Bare(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> int:
            request.content.read()
            held.append(request)
            return NOT_DONE_YET  # type: ignore[no-any-return]

    class Routes:
        app = Klein()

        @app.route("/v1/<path:_p>", methods=["POST"])
        def plain(self, request: Any, _p: str) -> Deferred[bytes]:
            request.content.read()
            held.append(Deferred())
            return held[-1]  # type: ignore[no-any-return]

    class Later(Resource):
        isLeaf = True

        def render(self, request: Any) -> int:
            return NOT_DONE_YET  # type: ignore[no-any-return]

    later = Later()

    class LaterRoutes:
        app = Klein()

        @app.route("/v1/<path:_p>", methods=["POST"])
        def answered_later(self, request: Any, _p: str) -> Resource:
            request.content.read()
            held.append(request)
            return later

    class AsyncRoutes:
        app = Klein()

        @app.route("/v1/<path:_p>", methods=["POST"])
        async def awaiting(self, request: Any, _p: str) -> bytes:
            request.content.read()
            held.append(Deferred())
            return await held[-1]  # type: ignore[no-any-return]

    service = None
    if layer == "llmswap":
        from llmswap.config.config import parse
        from llmswap.service import make_service

        port = free_port()
        config = parse(
            {
                "listen": f"tcp:{port}:interface=127.0.0.1:backlog=4096",
                "log_dir": tempfile.mkdtemp(prefix="llmswap-bench-"),
                "queue_size": pending + 10,
                "request_timeout": 3600,
                "models": {"bench": fast_backend_model(free_port(), concurrency=1)},
            }
        )
        service = make_service(config, reactor)
        service.startService()

        def count() -> int:
            health = service.health()
            return int(health["queue_size"]) + int(health["in_flight"]) - 1

    else:
        resource = {
            "twisted.web": Bare,
            "klein": lambda: Routes().app.resource(),
            "klein async": lambda: AsyncRoutes().app.resource(),
            "klein, answered later": lambda: LaterRoutes().app.resource(),
        }[layer]()
        listening = reactor.listenTCP(  # type: ignore[attr-defined]
            0,
            Site(resource),  # type: ignore[arg-type]
            backlog=4096,
            interface="127.0.0.1",
        )
        port = listening.getHost().port  # type: ignore[attr-defined]

        def count() -> int:
            return len(held) - 1

    client = subprocess.Popen(
        [PYTHON, "-c", _CLIENT, str(port), str(pending), "/v1/chat/completions"],
        stdin=subprocess.PIPE,
        text=True,
    )
    result: list[float] = []
    baseline: list[Any] = []

    def check() -> None:
        if not baseline:
            if count() < 0:  # the warm-up request is not held yet
                return
            gc.collect()
            tracemalloc.start()
            baseline.append(tracemalloc.take_snapshot())
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        elif count() >= pending:
            gc.collect()
            diff = tracemalloc.take_snapshot().compare_to(baseline[0], "filename")
            result.append(sum(stat.size_diff for stat in diff) / pending)
            poll.stop()
            client.kill()
            stopped = service.stopService() if service is not None else None
            if stopped is not None:
                stopped.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
            else:
                reactor.stop()  # type: ignore[attr-defined]

    poll = LoopingCall(check)
    poll.start(0.2)
    reactor.run()  # type: ignore[attr-defined]
    client.wait()
    return result[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pending", type=int, default=2000)
    p.add_argument("--layer", choices=LAYERS, help="measure one layer here (used internally)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    raise_fd_limit(2 * args.pending + 1000)
    if args.layer:
        print(json.dumps(measure(args.layer, args.pending)))
        return {}
    results = {}
    for layer in LAYERS:
        out = subprocess.run(
            [PYTHON, "-m", "bench.memory", "--layer", layer, "--pending", str(args.pending)],
            capture_output=True, text=True, check=True, cwd=ROOT, timeout=600,
        ).stdout  # fmt: skip
        results[layer] = float(out.strip().splitlines()[-1])
    print(f"Python heap per pending request ({args.pending} pending, tracemalloc)")
    print("| layer | bytes per pending request | above twisted.web |")
    print("|---|---|---|")
    for layer, per in results.items():
        print(f"| {layer} | {per:.0f} | {per - results['twisted.web']:+.0f} |")
    return save({"args": vars(args), "results": results}, args.json)


if __name__ == "__main__":
    main()
