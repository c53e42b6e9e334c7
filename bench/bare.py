"""A bare aiohttp-on-uvloop forwarder: the floor for any aiohttp proxy, for comparison.

It adds a fixed ``auth`` parameter and relays the answer, with none of the sidecar's checks,
token handling, metrics or logging. ``python -m bench.bare --port P --upstream U``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web


def create_app(upstream: int) -> web.Application:
    """Build the forwarder."""
    app = web.Application()
    base = f"http://127.0.0.1:{upstream}"

    async def session(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            app["http"] = http
            yield

    async def forward(request: web.Request) -> web.Response:
        http: aiohttp.ClientSession = request.app["http"]
        url = f"{base}{request.path}?{request.query_string}&auth=fixed"
        async with http.request(request.method, url, data=await request.read()) as up:
            return web.Response(status=up.status, body=await up.read(),
                                content_type=up.content_type)

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/rest/{method}", forward)
    return app


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None,
                print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
