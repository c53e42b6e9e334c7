"""A minimal, fast stand-in for a portal: answers REST calls like Bitrix24, with no checks.

It also answers the token endpoint (any code), naming itself as the portal, so a sidecar can be
authorized against it. Run it in its own process: ``python -m bench.upstream --port 9100``.
"""

from __future__ import annotations

import argparse
import json
import time

import uvloop
from aiohttp import web


def payload(size: int) -> bytes:
    """Return a REST success body of about ``size`` bytes."""
    filler = "x" * max(0, size - 200)
    return json.dumps({"result": {"ID": "1", "DATA": filler},
                       "time": {"start": 0, "finish": 0, "duration": 0, "processing": 0,
                                "operating": 0, "operating_reset_at": 0}}).encode()


def create_app(port: int) -> web.Application:
    """Build the app."""
    small, large = payload(1024), payload(1024 * 1024)
    headers = {"Content-Type": "application/json; charset=utf-8",
               "X-Bitrix-Rest-Time": "0.000100"}

    async def rest(request: web.Request) -> web.Response:
        body = large if request.match_info["method"].startswith("bench.large") else small
        return web.Response(body=body, headers=headers)

    async def token(request: web.Request) -> web.Response:
        base = f"http://127.0.0.1:{port}"
        return web.json_response({
            "access_token": "a" * 64, "refresh_token": "r" * 64, "expires_in": 3600,
            "expires": int(time.time()) + 3600, "scope": "crm", "member_id": "m" * 32,
            "client_endpoint": f"{base}/rest/", "server_endpoint": f"{base}/rest/",
            "domain": f"127.0.0.1:{port}", "status": "L", "user_id": 1,
        })

    app = web.Application()
    app.router.add_route("*", "/rest/{method}", rest)
    app.router.add_route("*", "/oauth/token/", token)
    return app


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(args.port), host="127.0.0.1", port=args.port, access_log=None,
                print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
