"""Tests for proxy/upstream.py: endpoint choice (least outstanding, round robin), outlier
ejection, keep-alive pools against real loopback servers (RawServer), reload of
the pools, idle sweeping, and the active health check probe."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from proxy.core.config.load import parse_config
from proxy.core.config.model import Endpoint, Limits, OutlierConfig
from proxy.dataplane.upstream import (
    EndpointPool,
    UpstreamConnection,
    UpstreamError,
    Upstreams,
    VersionPool,
    probe,
)
from tests.helpers import RawServer, free_port, wait_until

NOW = 1000.0


def endpoint(port: int, host: str = "127.0.0.1") -> Endpoint:
    return Endpoint(f"http://{host}:{port}", host, port)


def make_pool(
    port: int = 9,
    *,
    limits: Limits | None = None,
    outlier: OutlierConfig | None = None,
    idle_timeout: float = 60.0,
    version: str = "blue",
) -> EndpointPool:
    return EndpointPool(
        endpoint(port),
        "shop",
        version,
        limits or Limits(),
        outlier or OutlierConfig(),
        idle_timeout,
    )


def version_pool(n: int, balance: str = "least_request", **kw: Any) -> VersionPool:
    eps = [make_pool(9000 + i, **kw) for i in range(n)]
    return VersionPool("shop", "blue", balance, eps)


# -- a real loopback upstream that holds connections open -----------------------------------


@dataclass
class HoldServer:
    raw: RawServer
    accepted: list[asyncio.StreamWriter] = field(default_factory=list)
    eofs: int = 0

    @property
    def port(self) -> int:
        return self.raw.port

    def close_client(self, i: int) -> None:
        self.accepted[i].close()


@pytest.fixture
async def hold_server() -> AsyncIterator[HoldServer]:
    holder: dict[str, HoldServer] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        srv = holder["s"]
        srv.accepted.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                continue  # drain until the pool closes its side
        srv.eofs += 1

    holder["s"] = HoldServer(await RawServer(handle).start())
    yield holder["s"]
    await holder["s"].raw.stop()


@pytest.fixture
def pools() -> Any:
    """Factory of EndpointPools whose connections are all closed at teardown."""
    made: list[EndpointPool] = []

    def make(port: int, **kw: Any) -> EndpointPool:
        p = make_pool(port, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
        for c in list(p.conns):
            c.close()


def is_live(conn: UpstreamConnection) -> bool:
    return not conn.closed and conn.transport is not None and not conn.transport.is_closing()


# -- choice among endpoints ----------------------------------------------------------------


def test_least_outstanding_wins() -> None:
    vp = version_pool(3)
    a, b, c = vp.endpoints
    a.outstanding, b.outstanding, c.outstanding = 2, 0, 1
    assert [vp.pick(NOW) for _ in range(6)] == [b] * 6
    b.outstanding = 5
    assert {vp.pick(NOW) for _ in range(6)} == {c}


def test_least_outstanding_ties_rotate() -> None:
    vp = version_pool(3)
    picks = [vp.pick(NOW) for _ in range(9)]
    assert Counter(map(id, picks)) == Counter({id(e): 3 for e in vp.endpoints})
    assert picks[0] is not picks[1] and picks[1] is not picks[2]


def test_least_outstanding_ties_among_two_of_three() -> None:
    vp = version_pool(3)
    a, b, c = vp.endpoints
    b.outstanding = 1
    picks = [vp.pick(NOW) for _ in range(8)]
    assert b not in picks
    assert Counter(map(id, picks)) == Counter({id(a): 4, id(c): 4})


def test_least_outstanding_ties_even_when_one_endpoint_is_ejected() -> None:
    # Rotation must spread ties evenly over the *available* endpoints; skipping an ejected
    # one must not hand its turn to its neighbour (which would then get twice the load).
    vp = version_pool(3)
    a, b, c = vp.endpoints
    b.ejected_until = NOW + 30
    picks = [vp.pick(NOW) for _ in range(12)]
    assert b not in picks
    assert Counter(map(id, picks)) == Counter({id(a): 6, id(c): 6})


def test_round_robin_ignores_outstanding() -> None:
    vp = version_pool(3, balance="round_robin")
    a, b, c = vp.endpoints
    a.outstanding = 50
    assert [vp.pick(NOW) for _ in range(6)] == [a, b, c, a, b, c]


def test_round_robin_even_when_one_endpoint_is_unavailable() -> None:
    vp = version_pool(3, balance="round_robin")
    a, b, c = vp.endpoints
    a.healthy = False
    picks = [vp.pick(NOW) for _ in range(12)]
    assert a not in picks
    assert Counter(map(id, picks)) == Counter({id(b): 6, id(c): 6})


@pytest.mark.parametrize("balance", ["least_request", "round_robin"])
def test_pick_skips_ejected_unhealthy_and_tried(balance: str) -> None:
    vp = version_pool(4, balance=balance)
    a, b, c, d = vp.endpoints
    a.ejected_until = NOW + 10
    b.healthy = False
    for _ in range(8):
        assert vp.pick(NOW, (c,)) is d
        assert vp.pick(NOW, (d,)) is c
        assert vp.pick(NOW) in (c, d)
    assert vp.pick(NOW, (c, d)) is None
    assert vp.any_available(NOW)
    d.healthy = False
    c.ejected_until = NOW + 1
    assert vp.pick(NOW) is None
    assert not vp.any_available(NOW)
    # Ejection ends by itself; the health verdict does not.
    assert {vp.pick(NOW + 10) for _ in range(6)} == {a, c}


def test_pick_single_endpoint() -> None:
    vp = version_pool(1)
    (a,) = vp.endpoints
    assert vp.pick(NOW) is a
    assert vp.pick(NOW, (a,)) is None
    a.healthy = False
    assert vp.pick(NOW) is None
    a.healthy = True
    a.ejected_until = NOW + 1
    assert vp.pick(NOW) is None
    assert vp.pick(NOW + 1) is a


# -- passive outlier detection ------------------------------------------------------------------

OUTLIER = OutlierConfig(consecutive_failures=3, base_ejection=10.0, max_ejection=35.0)


def test_ejected_after_n_consecutive_failures() -> None:
    vp = version_pool(2, outlier=OUTLIER)
    a, b = vp.endpoints
    assert a.failed(NOW, vp.endpoints) is False
    assert a.failed(NOW, vp.endpoints) is False
    assert a.available(NOW)
    assert a.failed(NOW, vp.endpoints) is True
    assert not a.available(NOW)
    assert a.ejected_until == pytest.approx(NOW + 10.0)
    assert not a.available(NOW + 9.9)
    assert a.available(NOW + 10.0)
    assert {vp.pick(NOW + 5) for _ in range(4)} == {b}


def test_ejection_duration_doubles_and_is_capped() -> None:
    vp = version_pool(2, outlier=OUTLIER)
    a, _ = vp.endpoints
    durations = []
    now = NOW
    for _ in range(4):
        for _ in range(3):
            a.failed(now, vp.endpoints)
        durations.append(a.ejected_until - now)
        now = a.ejected_until + 1.0
    assert durations == pytest.approx([10.0, 20.0, 35.0, 35.0])


def test_success_resets_the_failure_count() -> None:
    vp = version_pool(2, outlier=OUTLIER)
    a, _ = vp.endpoints
    for _ in range(5):
        assert a.failed(NOW, vp.endpoints) is False
        assert a.failed(NOW, vp.endpoints) is False
        a.succeeded()
    assert a.available(NOW)
    assert a.failures == 0


def test_never_ejects_the_last_available_endpoint() -> None:
    vp = version_pool(2, outlier=OUTLIER)
    a, b = vp.endpoints
    for _ in range(3):
        a.failed(NOW, vp.endpoints)
    assert not a.available(NOW)
    for _ in range(10):
        assert b.failed(NOW, vp.endpoints) is False
    assert b.available(NOW)
    assert vp.pick(NOW) is b


def test_never_ejects_a_single_endpoint() -> None:
    vp = version_pool(1, outlier=OUTLIER)
    (a,) = vp.endpoints
    for _ in range(20):
        assert a.failed(NOW, vp.endpoints) is False
    assert a.available(NOW)


def test_unhealthy_sibling_does_not_count_as_available() -> None:
    vp = version_pool(2, outlier=OUTLIER)
    a, b = vp.endpoints
    b.healthy = False
    for _ in range(6):
        assert a.failed(NOW, vp.endpoints) is False
    assert a.available(NOW)


# -- keep-alive pools against a real loopback server -----------------------------------------------


async def test_take_idle_returns_most_recently_released_live_connection(hold_server, pools):
    ep = pools(hold_server.port)
    c1, r1 = await ep.acquire(1.0)
    c2, r2 = await ep.acquire(1.0)
    c3, r3 = await ep.acquire(1.0)
    assert (r1, r2, r3) == (False, False, False)
    assert len({id(c1), id(c2), id(c3)}) == 3
    await wait_until(lambda: len(hold_server.accepted) == 3, 2.0)
    for c in (c1, c2, c3):
        ep.release(c, True)
    assert ep.take_idle() is c3
    assert ep.take_idle() is c2
    assert ep.take_idle() is c1
    assert ep.take_idle() is None
    for c in (c1, c2, c3):
        assert is_live(c)
        ep.release(c, True)
    conn, reused = await ep.acquire(1.0)
    assert (conn, reused) == (c3, True)
    assert len(hold_server.accepted) == 3


async def test_take_idle_skips_connections_the_upstream_closed(hold_server, pools):
    ep = pools(hold_server.port)
    c1, _ = await ep.acquire(1.0)
    c2, _ = await ep.acquire(1.0)
    await wait_until(lambda: len(hold_server.accepted) == 2, 2.0)
    ep.release(c1, True)
    ep.release(c2, True)
    # The server side of the most recent connection goes away.
    peer_ports = {w.get_extra_info("peername")[1]: i for i, w in enumerate(hold_server.accepted)}
    c2_port = c2.transport.get_extra_info("sockname")[1]
    hold_server.close_client(peer_ports[c2_port])
    await wait_until(lambda: c2.closed, 2.0)
    assert ep.take_idle() is c1
    assert ep.take_idle() is None
    await wait_until(lambda: ep.open == 1, 2.0)


async def test_release_not_reusable_closes(hold_server, pools):
    ep = pools(hold_server.port)
    c1, _ = await ep.acquire(1.0)
    await wait_until(lambda: len(hold_server.accepted) == 1, 2.0)
    assert ep.open == 1
    ep.release(c1, False)
    assert c1.closed
    assert ep.take_idle() is None
    await wait_until(lambda: hold_server.eofs == 1, 2.0)
    await wait_until(lambda: ep.open == 0 and not ep.conns, 2.0)


async def test_max_idle_per_endpoint_respected(hold_server, pools):
    ep = pools(hold_server.port, limits=Limits(max_idle_per_endpoint=2))
    conns = [(await ep.acquire(1.0))[0] for _ in range(4)]
    await wait_until(lambda: len(hold_server.accepted) == 4, 2.0)
    for c in conns:
        ep.release(c, True)
    assert len(ep.idle) == 2
    assert sum(1 for c in conns if c.closed) == 2
    await wait_until(lambda: hold_server.eofs == 2, 2.0)
    await wait_until(lambda: ep.open == 2, 2.0)


async def test_max_idle_zero_keeps_nothing(hold_server, pools):
    ep = pools(hold_server.port, limits=Limits(max_idle_per_endpoint=0))
    c, _ = await ep.acquire(1.0)
    ep.release(c, True)
    assert c.closed and not ep.idle


async def test_acquire_waits_for_a_slot_and_gets_the_released_connection(hold_server, pools):
    ep = pools(hold_server.port, limits=Limits(max_connections_per_endpoint=1))
    c1, _ = await ep.acquire(1.0)
    waiter = asyncio.create_task(ep.acquire(1.0))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    ep.release(c1, True)
    conn, reused = await asyncio.wait_for(waiter, 1.0)
    assert conn is c1 and reused is True
    assert len(hold_server.accepted) == 1
    assert ep.open == 1


async def test_acquire_waits_and_opens_anew_when_the_busy_one_is_closed(hold_server, pools):
    ep = pools(hold_server.port, limits=Limits(max_connections_per_endpoint=1))
    c1, _ = await ep.acquire(1.0)
    waiter = asyncio.create_task(ep.acquire(1.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    ep.release(c1, False)
    conn, reused = await asyncio.wait_for(waiter, 1.0)
    assert conn is not c1 and reused is False and is_live(conn)
    assert ep.open == 1


async def test_waiters_served_in_order(hold_server, pools):
    ep = pools(hold_server.port, limits=Limits(max_connections_per_endpoint=1))
    c1, _ = await ep.acquire(1.0)
    order: list[int] = []

    async def wait(i: int) -> UpstreamConnection:
        conn, _ = await ep.acquire(1.0)
        order.append(i)
        return conn

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0.05)
    conn = c1
    for task in tasks:
        ep.release(conn, True)
        conn = await asyncio.wait_for(task, 1.0)
        assert conn is c1
    assert order == [0, 1, 2]


async def test_cancelled_waiter_does_not_lose_the_wakeup(hold_server, pools):
    # A waiter woken for a released connection may be cancelled before it runs (its client
    # went away, or its deadline hit). The connection must then go to the next waiter, not
    # sit idle while that waiter blocks until its own deadline.
    ep = pools(hold_server.port, limits=Limits(max_connections_per_endpoint=1))
    c1, _ = await ep.acquire(1.0)
    first = asyncio.create_task(ep.acquire(1.0))
    second = asyncio.create_task(ep.acquire(1.0))
    await asyncio.sleep(0.05)
    ep.release(c1, True)  # wakes `first`
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    try:
        conn, reused = await asyncio.wait_for(second, 1.0)
    except TimeoutError:
        pytest.fail("the second waiter was never woken although a connection is idle")
    assert conn is c1 and reused


async def test_max_pending_overflow_raises_unavailable(hold_server, pools):
    ep = pools(hold_server.port, limits=Limits(max_connections_per_endpoint=1, max_pending=2))
    c1, _ = await ep.acquire(1.0)
    waiters = [asyncio.create_task(ep.acquire(1.0)) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(UpstreamError) as info:
        await asyncio.wait_for(ep.acquire(1.0), 1.0)
    assert info.value.kind == "unavailable"
    assert info.value.status == 503
    assert info.value.retryable is False
    ep.release(c1, True)
    conn, _ = await asyncio.wait_for(waiters[0], 1.0)
    ep.release(conn, True)
    await asyncio.wait_for(waiters[1], 1.0)


async def test_max_pending_zero_fails_at_once_when_full(hold_server, pools):
    ep = pools(hold_server.port, limits=Limits(max_connections_per_endpoint=1, max_pending=0))
    await ep.acquire(1.0)
    with pytest.raises(UpstreamError) as info:
        await asyncio.wait_for(ep.acquire(1.0), 1.0)
    assert info.value.kind == "unavailable"


async def test_connect_refused_is_a_retryable_connect_error(pools):
    port = free_port()  # nothing listens there
    ep = pools(port)
    t0 = time.monotonic()
    with pytest.raises(UpstreamError) as info:
        await ep.acquire(1.0)
    assert time.monotonic() - t0 < 1.0
    err = info.value
    assert err.kind == "connect"
    assert err.retryable is True
    assert err.status == 502
    assert str(port) in err.detail
    assert ep.open == 0 and not ep.conns


async def test_connect_refused_frees_the_slot_for_a_waiter(pools):
    ep = pools(free_port(), limits=Limits(max_connections_per_endpoint=1))
    results = await asyncio.gather(*(ep.acquire(1.0) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, UpstreamError) and r.kind == "connect" for r in results)
    assert ep.open == 0 and not ep.waiters


async def test_bytes_on_an_idle_connection_close_it(pools):
    # An upstream that talks while nobody asked is confused: never reuse that connection.
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.1)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await reader.read()

    server = await RawServer(chatty).start()
    try:
        ep = pools(server.port)
        c, _ = await ep.acquire(1.0)
        ep.release(c, True)
        await wait_until(lambda: c.closed, 2.0)
        assert ep.take_idle() is None
    finally:
        await server.stop()


# -- Upstreams: reload and idle sweeping ---------------------------------------------------


def config(blue: list[str], green: list[str], **top: Any) -> Any:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "routes": [
            {
                "name": "shop",
                "versions": {"blue": {"endpoints": blue}, "green": {"endpoints": green}},
                "stable": "blue",
                "weights": {"blue": 100, "green": 0},
            }
        ],
    }
    data.update(top)
    return parse_config(data, env={})


async def test_reconfigure_keeps_unchanged_pools_and_closes_removed(hold_server):
    port = hold_server.port
    a, b, c, d = (f"http://127.0.0.1:{p}" for p in (port, port + 1, port + 2, port + 3))
    ups = Upstreams(config([a, b], [c]))
    try:
        blue = ups.versions["shop"]["blue"]
        pa, pb = blue.endpoints
        pc = ups.versions["shop"]["green"].endpoints[0]
        pa.outstanding = 3
        pa.ejections = 2
        conn_a, _ = await pa.acquire(1.0)
        pa.release(conn_a, True)
        # b points at the same real server so it can hold an idle connection too.
        pb.endpoint = endpoint(port)
        conn_b, _ = await pb.acquire(1.0)
        pb.release(conn_b, True)
        await wait_until(lambda: len(hold_server.accepted) == 2, 2.0)

        ups.reconfigure(config([a], [c, d], limits={"max_idle_per_endpoint": 7}))
        blue2 = ups.versions["shop"]["blue"]
        green2 = ups.versions["shop"]["green"]
        assert blue2.endpoints == [pa]
        assert blue2.endpoints[0] is pa and green2.endpoints[0] is pc
        assert pa.outstanding == 3 and pa.ejections == 2
        assert pa.limits.max_idle_per_endpoint == 7  # new limits apply to kept pools
        assert pa.max_idle == 7  # and its compiled copy
        assert [p.url for p in green2.endpoints] == [c, d]
        assert green2.endpoints[1] is not pc
        assert pb.retired and conn_b.closed
        assert not pa.retired and is_live(conn_a)
        assert ep_urls(ups) == {a, c, d}
        await wait_until(lambda: hold_server.eofs == 1, 2.0)
        assert pa.take_idle() is conn_a
    finally:
        await ups.close()


def ep_urls(ups: Upstreams) -> set[str]:
    return {p.url for p in ups.pools()}


async def test_reconfigure_removed_route_closes_its_pools(hold_server):
    url = f"http://127.0.0.1:{hold_server.port}"
    ups = Upstreams(config([url], [url]))
    try:
        green = ups.versions["shop"]["green"].endpoints[0]
        conn, _ = await green.acquire(1.0)
        ups.reconfigure(config([url], [f"http://127.0.0.1:{hold_server.port + 1}"]))
        assert green.retired
        green.release(conn, True)  # the exchange ends after the reload
        assert conn.closed and not green.idle
    finally:
        await ups.close()


async def test_sweep_idle_closes_connections_idle_too_long(hold_server):
    url = f"http://127.0.0.1:{hold_server.port}"
    ups = Upstreams(config([url], [url], timeouts={"upstream_idle": "1s"}))
    loop = asyncio.get_running_loop()
    try:
        pool = ups.versions["shop"]["blue"].endpoints[0]
        old, _ = await pool.acquire(1.0)
        new, _ = await pool.acquire(1.0)
        pool.release(old, True)
        t_old = loop.time()
        await asyncio.sleep(0.2)
        pool.release(new, True)
        ups.sweep_idle(t_old + 0.5)  # nothing is a second old yet
        assert is_live(old) and is_live(new) and len(pool.idle) == 2
        ups.sweep_idle(t_old + 1.1)
        assert old.closed and is_live(new)
        assert list(pool.idle) == [new]
        await wait_until(lambda: hold_server.eofs == 1, 2.0)
        await wait_until(lambda: pool.open == 1, 2.0)
        ups.sweep_idle(loop.time() + 5)
        assert new.closed and not pool.idle
    finally:
        await ups.close()


# -- active health checks -------------------------------------------------------------------------


async def test_probe_true_on_200_false_on_500(upstreams):
    async def health(request: web.Request) -> web.Response:
        return web.Response(status=int(request.query.get("s", "200")))

    up = await upstreams("blue", health)
    # The limit is not what is tested here: generous, for a busy CI machine.
    assert await probe("127.0.0.1", up.port, "/healthz", 5.0) is True
    assert await probe("127.0.0.1", up.port, "/healthz?s=204", 5.0) is True
    assert await probe("127.0.0.1", up.port, "/healthz?s=302", 5.0) is True
    assert await probe("127.0.0.1", up.port, "/healthz?s=500", 5.0) is False
    assert await probe("127.0.0.1", up.port, "/healthz?s=503", 5.0) is False
    assert await probe("127.0.0.1", up.port, "/healthz?s=404", 5.0) is False
    assert up.requests[0]["path"] == "/healthz"
    assert ("Host", f"127.0.0.1:{up.port}") in [
        (k.decode(), v.decode()) for k, v in up.requests[0]["headers"]
    ]


async def test_probe_false_when_refused():
    t0 = time.monotonic()
    assert await probe("127.0.0.1", free_port(), "/", 1.0) is False
    assert time.monotonic() - t0 < 1.0


async def test_probe_false_when_silent_within_timeout(hold_server):
    t0 = time.monotonic()
    assert await probe("127.0.0.1", hold_server.port, "/", 0.3) is False
    assert 0.25 < time.monotonic() - t0 < 1.5


async def test_probe_false_on_garbage_answer():
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")

    server = await RawServer(garbage).start()
    try:
        assert await probe("127.0.0.1", server.port, "/", 1.0) is False
    finally:
        await server.stop()


async def test_health_checks_mark_endpoint_unhealthy_and_back(upstreams):
    state = {"status": 200}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=state["status"])

    a = await upstreams("a", health)
    b = await upstreams("b", health)
    data = {
        "listen": "127.0.0.1:0",
        "routes": [
            {
                "name": "shop",
                "versions": {"blue": {"endpoints": [a.url, b.url]}},
                "stable": "blue",
                "weights": {"blue": 100},
                "health_check": {"path": "/health", "interval": "50ms", "timeout": "500ms"},
            }
        ],
    }
    ups = Upstreams(parse_config(data, env={}))
    loop = asyncio.get_running_loop()
    try:
        ups.start_health_checks()
        vp = ups.versions["shop"]["blue"]
        await wait_until(lambda: len(a.requests) >= 2 and len(b.requests) >= 2, 2.0)
        assert vp.any_available(loop.time())
        state["status"] = 500
        await wait_until(lambda: not vp.any_available(loop.time()), 2.0)
        assert vp.pick(loop.time()) is None
        state["status"] = 200
        await wait_until(lambda: all(p.healthy for p in vp.endpoints), 2.0)
        assert vp.pick(loop.time()) is not None
    finally:
        await ups.close()
    seen = len(a.requests)
    await asyncio.sleep(0.2)
    assert len(a.requests) == seen, "health checks go on after Upstreams.close()"
