"""The real command and its admin plane as the end-to-end rollout tests drive them: client
traffic with who-served-whom (Traffic, Hit), admin API calls, route state and event waits,
/metrics scraped into a dict, the CLI run as a process, a graygate process's start and stop.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.paths import ROOT


@dataclass
class Hit:
    seq: int
    user: str | None
    upstream: str | None  # X-Upstream: which upstream really answered
    version: str | None  # X-Graygate-Version: what the gateway says it chose
    status: int
    forced: bool
    at: float


@dataclass
class Traffic:
    """Paced background load: `rate` req/s spread over `workers` keep-alive connections,
    cycling through `users` (sent as X-User-Id), optionally all forced with X-Canary."""

    url: str
    rate: float
    users: list[str] = field(default_factory=list)
    workers: int = 8
    headers: dict[str, str] = field(default_factory=dict)
    max_seconds: float = 25.0
    hits: list[Hit] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._seq = itertools.count()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> Traffic:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.workers),
            timeout=aiohttp.ClientTimeout(total=5),
        )
        deadline = time.monotonic() + self.max_seconds
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker(i, deadline)) for i in range(self.workers)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if self._session is not None:
            await self._session.close()

    async def _worker(self, index: int, deadline: float) -> None:
        assert self._session is not None
        period = self.workers / self.rate
        next_at = time.monotonic() + index * period / self.workers
        forced = "X-Canary" in self.headers
        while not self._stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            if next_at > now:
                await asyncio.sleep(next_at - now)
            else:
                next_at = max(next_at, now - period)  # late: no burst to catch up
            next_at += period
            seq = next(self._seq)
            user = self.users[seq % len(self.users)] if self.users else None
            headers = dict(self.headers)
            if user is not None:
                headers["X-User-Id"] = user
            try:
                async with self._session.get(self.url + f"/r/{seq}", headers=headers) as resp:
                    await resp.read()
                    self.hits.append(
                        Hit(
                            seq,
                            user,
                            resp.headers.get("X-Upstream"),
                            resp.headers.get("X-Graygate-Version"),
                            resp.status,
                            forced,
                            time.monotonic(),
                        )
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append(repr(exc))


async def api(
    session: aiohttp.ClientSession, admin: str, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    async with session.request(method, admin + "/api/v1" + path, **kwargs) as resp:
        return resp.status, await resp.json()


async def route_state(session: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    status, body = await api(session, admin, "GET", "/routes/shop")
    assert status == 200, body
    state: dict[str, Any] = body["state"]
    return state


async def wait_state(
    session: aiohttp.ClientSession,
    admin: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state = await route_state(session, admin)
    while not done(state):
        assert time.monotonic() < deadline, f"state not reached in {timeout}s: {state}"
        await asyncio.sleep(0.05)
        state = await route_state(session, admin)
    return state


async def events(session: aiohttp.ClientSession, admin: str) -> list[dict[str, Any]]:
    status, body = await api(session, admin, "GET", "/events?route=shop")
    assert status == 200, body
    result: list[dict[str, Any]] = body["events"]
    return result


async def scrape(session: aiohttp.ClientSession, admin: str) -> dict[tuple[str, ...], float]:
    """Every sample of /metrics as {(name, *sorted label values): value}."""
    async with session.get(admin + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items())))] = s.value
    return out


async def run_cli(*args: str, timeout: float = 15.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(ROOT),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def wait_listening(port: int, proc: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.proc.poll() is None, proc.output()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"port {port} not listening: {proc.output()}"
        await asyncio.sleep(0.05)


async def stop_process(proc: Any, timeout: float = 10.0) -> int:
    proc.proc.terminate()
    deadline = time.monotonic() + timeout
    while proc.proc.poll() is None:
        assert time.monotonic() < deadline, "graygate did not exit after SIGTERM"
        await asyncio.sleep(0.05)
    return int(proc.proc.returncode)
