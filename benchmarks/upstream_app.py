"""A small aiohttp upstream whose failure mode can be switched on: the canary that goes bad.

`python -m benchmarks.upstream_app --port P --name green`; `POST /_fail` makes every later
request answer 500, `POST /_heal` undoes it. Loopback only.
"""

from __future__ import annotations

import argparse

from aiohttp import web

FAILING = web.AppKey("failing", dict)
NAME = web.AppKey("name", str)


async def handle(request: web.Request) -> web.Response:
    name = request.app[NAME]
    if request.app[FAILING]["on"]:
        return web.Response(status=500, text="canary failure", headers={"X-Upstream": name})
    return web.Response(text="hello", headers={"X-Upstream": name})


async def set_fail(request: web.Request) -> web.Response:
    request.app[FAILING]["on"] = True
    return web.json_response({"failing": True})


async def heal(request: web.Request) -> web.Response:
    request.app[FAILING]["on"] = False
    return web.json_response({"failing": False})


def make_app(name: str, failing: bool = False) -> web.Application:
    app = web.Application()
    app[NAME] = name
    app[FAILING] = {"on": failing}
    app.router.add_post("/_fail", set_fail)
    app.router.add_post("/_heal", heal)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="green")
    args = p.parse_args()
    web.run_app(make_app(args.name), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
