"""Shared fixtures: real aiohttp upstreams on loopback ports, an in-process gateway
(App with its real listeners), raw upstreams, and the real `graygate` command. What they
are built from (and whatever a test imports) lives in tests/helpers/."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

# tests/ is not a package and pytest puts only tests/ itself on sys.path: the checkout goes
# at the end, for `tests.helpers`, so that `import proxy` stays whichever copy is installed.
_CHECKOUT = str(Path(__file__).resolve().parent.parent)
if _CHECKOUT not in sys.path:
    sys.path.append(_CHECKOUT)

from tests.helpers import (  # noqa: E402
    Handler,
    Process,
    RawClient,
    RedisServer,
    RunningGateway,
    Script,
    ScriptedUpstream,
    Upstream,
    compiled_sources,
    serve_app,
    start_gateway,
    stop_gateway,
    version_app,
)

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


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    """Factory: `await upstreams("blue", handler=None)` starts a real aiohttp upstream."""
    started: list[Upstream] = []

    async def start(name: str, handler: Handler | None = None) -> Upstream:
        seen: list[dict[str, Any]] = []
        runner, port = await serve_app(version_app(name, seen, handler))
        up = Upstream(name, port, runner, seen)
        started.append(up)
        return up

    yield start
    for up in started:
        await up.runner.cleanup()


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


@pytest.fixture
async def scripted_upstream() -> AsyncIterator[Callable[[Script], Awaitable[ScriptedUpstream]]]:
    """Factory: `await scripted_upstream(script)` starts a raw upstream on loopback."""
    started: list[ScriptedUpstream] = []

    async def start(script: Script) -> ScriptedUpstream:
        up = await ScriptedUpstream(script).start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


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


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (the test may stop and restart it)."""
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def raw_clients() -> AsyncIterator[Callable[[int], Awaitable[RawClient]]]:
    """Factory: `await raw_clients(port)` opens a raw client connection (closed at teardown)."""
    opened: list[RawClient] = []

    async def open_(port: int) -> RawClient:
        c = await RawClient.open(port)
        opened.append(c)
        return c

    yield open_
    for c in opened:
        await c.close()
