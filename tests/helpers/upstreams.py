"""Loopback upstreams: a real aiohttp app per version (`upstreams` fixture), and a raw
asyncio server that answers scripted bytes (`scripted_upstream` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.helpers.client import split_head
from tests.helpers.net import free_port


async def serve_app(app: web.Application, **runner: Any) -> tuple[web.AppRunner, int]:
    """Serve an aiohttp app on a free loopback port: (its runner, to clean up; the port)."""
    started = web.AppRunner(app, **{"access_log": None, **runner})
    await started.setup()
    port = free_port()
    await web.TCPSite(started, "127.0.0.1", port).start()
    return started, port


async def stop_serving(server: asyncio.Server | None, tasks: set[asyncio.Task[None]]) -> None:
    """Close a raw server and end the connection tasks it is still running."""
    if server is not None:
        server.close()
    for task in list(tasks):
        task.cancel()
    for task in list(tasks):
        with contextlib.suppress(BaseException):
            await task
    if server is not None:
        await server.wait_closed()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Upstream:
    name: str
    port: int
    runner: web.AppRunner
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def version_app(name: str, seen: list[dict[str, Any]], serve: Handler | None) -> web.Application:
    async def default(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.json_response(
            {"version": name, "path": request.path_qs, "method": request.method, "len": len(body)},
            headers={"X-Upstream": name},
        )

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "raw_path": request.raw_path,
                "headers": list(request.raw_headers),
            }
        )
        return await handler(request)

    app = web.Application(middlewares=[record], client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", serve or default)
    return app


Script = Callable[["ScriptedUpstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class ScriptedUpstream:
    """A raw asyncio upstream that misbehaves on purpose: `script` serves each connection
    by hand. Counts connections, and those graygate closed (EOF while reading a request)."""

    script: Script
    port: int = 0
    connections: int = 0
    closed_by_proxy: int = 0
    heads: list[bytes] = field(default_factory=list)  # request heads, in arrival order
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next request head (requests in these tests carry no body); None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_proxy += 1
            return None
        self.heads.append(head)
        return head

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # graygate dropped the connection mid-script: that ends the script
        finally:
            self.tasks.discard(task)
            writer.close()

    async def start(self) -> ScriptedUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        await stop_serving(self.server, self.tasks)

    async def wait_closed_by_proxy(self, count: int, within: float = 3.0) -> None:
        deadline = time.monotonic() + within
        while self.closed_by_proxy < count:
            assert time.monotonic() < deadline, (
                f"graygate closed {self.closed_by_proxy} upstream connections, expected {count}"
            )
            await asyncio.sleep(0.02)


async def read_request(
    reader: asyncio.StreamReader,
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes] | None:
    """One request off a raw upstream connection (line, headers with lowercase names, body
    by Content-Length) or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    line, headers = split_head(head)
    length = int(dict(headers).get(b"content-length", 0))
    body = await reader.readexactly(length) if length else b""
    return line, headers, body
