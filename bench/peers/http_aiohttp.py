"""The aiohttp peer: a greeting at ``/`` and a static route under ``/files/``,
on aiohttp's own defaults (asyncio's loop, no access log)."""

from __future__ import annotations

import sys

from aiohttp import web

GREETING = "Hello from aiohttp (sockproto bench peer)\n"


async def greeting(request: web.Request) -> web.Response:
    return web.Response(text=GREETING)


def main(port: int, files: str) -> None:
    app = web.Application()
    app.router.add_get("/", greeting)
    app.router.add_static("/files/", files)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=1024)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
