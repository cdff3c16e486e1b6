"""Shared fixtures: real aiohttp upstreams on loopback ports, an in-process gateway
(App with its real listeners), and a helper to start the real `graygate` command."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import App
from proxy.core.config.load import parse_config

ROOT = Path(__file__).resolve().parent.parent
# The data plane serves on uvloop in production: its tests run on uvloop too, as well as
# on the standard loop (transports differ in pause/resume and half-close details).
BOTH_LOOPS = {
    "test_proxy",
    "test_downstream",
    "test_failures",
    "test_hostile",
    "test_exchange",
    "test_conformance",
    "test_response_framing",
    "test_slow_readers",
    "test_upgrades",
    "test_control_bytes",
}


def compiled_sources(root: Path = ROOT) -> list[Path]:
    """The sources that pyproject.toml [tool.graygate.mypyc] says to compile, as setup.py
    expands its globs (include minus exclude; package __init__ files are never compiled)."""
    mypyc = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["graygate"]["mypyc"]

    def matches(key: str) -> set[Path]:
        return {p for g in mypyc.get(key, []) for p in root.glob(g)}

    return sorted(p for p in matches("include") - matches("exclude") if p.name != "__init__.py")


def module_of(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


# Run again on the pure build (`make test-pure`): the data-plane and HTTP suites, the test
# file of every compiled module (tests mirror modules), and the build's own tests.
BOTH_BUILDS = BOTH_LOOPS | {f"test_{p.stem}" for p in compiled_sources()} | {"test_build"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in BOTH_BUILDS:
            item.add_marker(pytest.mark.both_builds)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    module = item.module.__name__.rsplit(".", 1)[-1] if hasattr(item, "module") else ""
    if module in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    """Factory: `await upstreams("blue", handler=None)` starts a real aiohttp upstream."""
    started: list[Upstream] = []

    async def start(name: str, handler: Handler | None = None) -> Upstream:
        seen: list[dict[str, Any]] = []
        runner = web.AppRunner(version_app(name, seen, handler), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        up = Upstream(name, port, runner, seen)
        started.append(up)
        return up

    yield start
    for up in started:
        await up.runner.cleanup()


def route_config(
    blue: str | list[str], green: str | list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    versions: dict[str, Any] = {"blue": {"endpoints": [blue] if isinstance(blue, str) else blue}}
    weights = {"blue": 100}
    if green is not None:
        versions["green"] = {"endpoints": [green] if isinstance(green, str) else green}
        weights["green"] = 0
    route: dict[str, Any] = {
        "name": "shop",
        "match": {"host": "*", "path_prefix": "/"},
        "versions": versions,
        "stable": "blue",
        "weights": weights,
    }
    route.update(extra)
    return route


@dataclass
class RunningGateway:
    app: App
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


async def start_gateway(
    directory: Path, index: int, routes: list[dict[str, Any]], **top: Any
) -> RunningGateway:
    """The real App in-process on free loopback ports, its files under `directory`."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "state": {"path": str(directory / f"state-{index}.json")},
        "grace_period": "2s",
        "routes": routes,
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = directory / f"graygate-{index}.yaml"
    path.write_text(yaml.safe_dump(data))
    app = App(str(path), parse_config(data, env={}, source=str(path)))
    await app.start()
    assert app.server is not None and app.admin_runner is not None
    port = app.server.sockets[0].getsockname()[1]
    admin_port = app.admin_runner.addresses[0][1]
    return RunningGateway(app, port, admin_port)


async def stop_gateway(gw: RunningGateway) -> None:
    gw.app.config = dataclasses.replace(gw.app.config, grace_period=0.5)
    await gw.app.shutdown()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """Factory: `await gateway(routes=[...], **top_level)` runs the real App in-process."""
    running: list[RunningGateway] = []

    async def start(routes: list[dict[str, Any]], **top: Any) -> RunningGateway:
        gw = await start_gateway(tmp_path, len(running), routes, **top)
        running.append(gw)
        return gw

    yield start
    for gw in running:
        await stop_gateway(gw)


async def raw_request(port: int, data: bytes, timeout: float = 5.0, read_all: bool = True) -> bytes:
    """Send raw bytes, return everything the server answers until it closes (or timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_all:
                break
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_framed_body(
    reader: asyncio.StreamReader,
    method: str,
    status: int,
    transfer_encoding: str | bytes | None,
    content_length: str | bytes | None,
) -> bytes:
    """The body of one response, read with exact HTTP/1.1 framing (RFC 9112 6.3), so the
    next response on the connection starts where it should."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    te = transfer_encoding.encode() if isinstance(transfer_encoding, str) else transfer_encoding
    if te is not None and b"chunked" in te.lower():
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16):
            parts.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n"
        while await reader.readuntil(b"\r\n") != b"\r\n":
            continue  # trailer fields, up to the empty line
        return b"".join(parts)
    if content_length is not None:
        return await reader.readexactly(int(content_length))
    return await reader.read()  # delimited by the close


async def read_response(
    reader: asyncio.StreamReader, method: str = "GET"
) -> tuple[int, bytes, dict[bytes, bytes], bytes]:
    """One response off a raw connection: (status, status line, headers with lowercase
    names, last value wins, body read with exact framing)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.lower()] = value.strip(b" \t")
    status = int(lines[0].split(b" ")[1])
    body = await read_framed_body(
        reader, method, status, headers.get(b"transfer-encoding"), headers.get(b"content-length")
    )
    return status, lines[0], headers, body


async def metric_value(gw: RunningGateway, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on the gateway's /metrics whose labels include `labels`."""
    async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


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

    async def wait_closed_by_proxy(self, count: int, within: float = 3.0) -> None:
        deadline = time.monotonic() + within
        while self.closed_by_proxy < count:
            assert time.monotonic() < deadline, (
                f"graygate closed {self.closed_by_proxy} upstream connections, expected {count}"
            )
            await asyncio.sleep(0.02)


@pytest.fixture
async def scripted_upstream() -> AsyncIterator[Callable[[Script], Awaitable[ScriptedUpstream]]]:
    """Factory: `await scripted_upstream(script)` starts a raw upstream on loopback."""
    started: list[ScriptedUpstream] = []

    async def start(script: Script) -> ScriptedUpstream:
        up = ScriptedUpstream(script)
        up.server = await asyncio.start_server(up._serve, "127.0.0.1", 0)
        up.port = up.server.sockets[0].getsockname()[1]
        started.append(up)
        return up

    yield start
    for up in started:
        assert up.server is not None
        up.server.close()
        for task in list(up.tasks):
            task.cancel()
        for task in list(up.tasks):
            with contextlib.suppress(BaseException):
                await task
        await up.server.wait_closed()


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture
def graygate_process(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """Factory: start the real `graygate` command (python -m proxy) with arguments."""
    procs: list[Process] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Process:
        log = tmp_path / f"graygate-{len(procs)}.log"
        with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=str(tmp_path),
                env={**os.environ, **(env or {})},
            )
        p = Process(proc, log)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.proc.terminate()
            try:
                p.proc.wait(10)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()


class RedisServer:
    """A real redis-server on a loopback port, without persistence, that a test can stop
    and start again on the same port (started empty: what a restart without a volume does)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(self.binary).exists():
            pytest.fail(
                "redis-server is not installed: these tests need the real server "
                "(benchmarks/install_tools.sh, or apt-get install redis-server)"
            )
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = ["--save", "", "--appendonly", "no", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [self.binary, *args, "--bind", "127.0.0.1"],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (the test may stop and restart it)."""
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
