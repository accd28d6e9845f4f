"""Two bare passthrough proxies, no queue and no logic: what the HTTP stacks alone cost here.

``klein``: Klein + treq, llmswap's own stack (its floor).  ``aiohttp``: aiohttp server + client.
Both forward ``POST /v1/...`` to ``--backend`` and stream the answer back chunk by chunk.

    python -m bench.floors klein --port 9001 --backend http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
from typing import Any

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def klein_floor(port: int, backend: str) -> None:
    import treq
    from klein import Klein
    from twisted.internet import reactor
    from twisted.web.client import HTTPConnectionPool
    from twisted.web.http_headers import Headers
    from twisted.web.server import Site

    app = Klein()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64

    @app.route("/v1/", branch=True, methods=["POST"])
    async def proxy(request: Any) -> None:
        body = request.content.read()
        response = await treq.request(
            "POST", backend + request.uri.decode(), data=body, pool=pool, unbuffered=True,
            headers=Headers({b"content-type": [b"application/json"]}),
        )  # fmt: skip
        request.setResponseCode(response.code)
        for name, values in response.headers.getAllRawHeaders():
            if name.decode().lower() not in _HOP:
                request.responseHeaders.setRawHeaders(name, values)
        await treq.collect(response, request.write)

    site = Site(app.resource())
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    reactor.run()  # type: ignore[attr-defined]


def aiohttp_floor(port: int, backend: str) -> None:
    from aiohttp import ClientSession, TCPConnector, web

    async def proxy(request: web.Request) -> web.StreamResponse:
        session: ClientSession = request.app["session"]
        body = await request.read()
        async with session.post(
            backend + request.path_qs, data=body, headers={"content-type": "application/json"}
        ) as upstream:
            headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            response = web.StreamResponse(status=upstream.status, headers=headers)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def session(app: web.Application) -> Any:
        app["session"] = ClientSession(connector=TCPConnector(limit=0))
        yield
        await app["session"].close()

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/{tail:.*}", proxy)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=("klein", "aiohttp"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", required=True)
    args = p.parse_args()
    (klein_floor if args.kind == "klein" else aiohttp_floor)(args.port, args.backend)


if __name__ == "__main__":
    main()
