"""Loopback upstreams: a real aiohttp app per version (`upstreams` fixture), and a raw
asyncio server that answers scripted bytes (`scripted_upstream` fixture)."""

from __future__ import annotations

import asyncio
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


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """asyncio.start_server that loses no connection; a handler ends quietly when its peer
    hangs up (ConnectionError, IncompleteReadError). Each connection is recorded the moment it
    is made, before its handler task first runs, and stop() closes every one and waits
    until its socket is shut: a connection the loop outlived would otherwise be collected
    in some later test, as an unclosed-transport ResourceWarning (an error under pytest's
    filterwarnings) blamed on that test."""

    def __init__(self, handler: StreamHandler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> RawServer:
        self.server = await asyncio.start_server(self._made, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def _made(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Awaitable[None]:
        # Called inside connection_made; asyncio makes the returned coroutine a task.
        self.writers.append(writer)
        return self._run(reader, writer)

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer dropped the connection mid-handler: that ends the handler
        finally:
            self.tasks.discard(task)
            writer.close()

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        # A connection accepted just before close() is made a few loop turns later (the
        # accept task, then connection_made): let those turns run so it is recorded.
        for _ in range(5):
            await asyncio.sleep(0)
        for task in list(self.tasks):
            task.cancel()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        async with asyncio.timeout(5.0):
            await asyncio.gather(*(w.wait_closed() for w in self.writers), return_exceptions=True)
        await self.server.wait_closed()


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
    connections: int = 0
    closed_by_proxy: int = 0
    heads: list[bytes] = field(default_factory=list)  # request heads, in arrival order
    raw: RawServer = field(init=False)

    def __post_init__(self) -> None:
        self.raw = RawServer(self._serve)

    @property
    def port(self) -> int:
        return self.raw.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        """The connections whose script is still running."""
        return self.raw.tasks

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
        await self.script(self, reader, writer)  # RawServer ends it if graygate hangs up

    async def start(self) -> ScriptedUpstream:
        await self.raw.start()
        return self

    async def stop(self) -> None:
        await self.raw.stop()

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
