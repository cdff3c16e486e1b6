"""Sample upstream for demos, docs and tests: an aiohttp app that says which version
it is. Control plane side (aiohttp); never imported by the data plane.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

NAME = web.AppKey("sample_name", str)


async def _hello(request: web.Request) -> web.Response:
    name = request.app[NAME]
    body = {
        "version": name,
        "method": request.method,
        "path": request.path_qs,
        "user": request.headers.get("X-User-Id"),
        "forwarded_for": request.headers.get("X-Forwarded-For"),
    }
    return web.Response(
        text=json.dumps(body) + "\n",
        content_type="application/json",
        headers={"X-Sample-Version": name},
    )


def make_sample_app(name: str) -> web.Application:
    app = web.Application()
    app[NAME] = name
    app.router.add_route("*", "/{tail:.*}", _hello)
    return app


async def run_sample(name: str, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_sample_app(name), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve_sample(name: str, host: str, port: int) -> None:
    runner = await run_sample(name, host, port)
    print(f"sample upstream {name!r} on http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
