"""Upstream faults end to end: refused connects, timeouts, garbage and truncated responses,
retry rules, passive outlier ejection, failover and the error metrics. Real upstreams
(aiohttp apps, or raw asyncio servers that misbehave on purpose), the real in-process App
and real clients."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.helpers import RawServer, free_port, metric_sum, route_config, scrape_samples

FAST = {"connect": "500ms", "read": "1s", "request": "3s"}
QUICK_OUTLIER = {"consecutive_failures": 3, "base_ejection": "2s", "max_ejection": "10s"}
NO_EJECTION = {"consecutive_failures": 1000, "base_ejection": "1s", "max_ejection": "1s"}


def refused_url() -> str:
    """A loopback port nobody listens on: connects are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


# -- raw upstreams that misbehave on purpose ---------------------------------------------------

Behaviour = Callable[
    ["RawUpstream", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]
]


@dataclass
class RawUpstream:
    """An asyncio server whose per-connection behaviour is a coroutine; counts what it saw."""

    behaviour: Behaviour
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)  # request heads seen
    raw: RawServer = field(init=False)

    def __post_init__(self) -> None:
        self.raw = RawServer(self._serve)

    @property
    def port(self) -> int:
        return self.raw.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        await self.raw.start()
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self.behaviour(self, reader, writer, self.connections)  # RawServer ends it on EOF

    async def read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request head (None at EOF); bodies are ignored: probes send none."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        self.requests.append(head)
        return head

    async def stop(self) -> None:
        await self.raw.stop()


@pytest.fixture
async def raw_upstreams():
    started: list[RawUpstream] = []

    async def start(behaviour: Behaviour) -> RawUpstream:
        up = await RawUpstream(behaviour).start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- helpers -----------------------------------------------------------------------------------


def upstream_errors(samples, version: str, kind: str) -> float:
    return metric_sum(
        samples, "graygate_upstream_errors_total", route="shop", version=version, kind=kind
    )


async def get(url: str, **kw) -> tuple[int, CIMultiDict[str], bytes, float]:
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.get(url, timeout=aiohttp.ClientTimeout(total=10), **kw) as r,
    ):
        body = await r.read()
        return r.status, r.headers.copy(), body, time.monotonic() - t0


async def wait_unavailable(gw, version: str, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        samples = await scrape_samples(gw)
        if metric_sum(samples, "graygate_endpoint_available", version=version) == 0 and any(
            n == "graygate_endpoint_available" and dict(lbls).get("version") == version
            for n, lbls in samples
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{version} endpoints still available after {within}s")


async def expect_truncated(url: str) -> None:
    """aiohttp sees the head, then a body that breaks off: never a complete response."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


def failing_health(ok_body: str):
    """Handler: /healthz answers 500 (unhealthy), everything else 200."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.Response(status=500, text="sick")
        return web.Response(text=ok_body)

    return handler


# -- connect failures and retries --------------------------------------------------------------


async def test_refused_endpoint_is_retried_on_the_other_endpoint(upstreams, gateway):
    good = await upstreams("blue")
    gw = await gateway(
        [route_config([refused_url(), good.url], outlier=NO_EJECTION)], timeouts=FAST
    )
    for i in range(6):
        status, headers, body, _ = await get(f"{gw.url}/r{i}")
        assert status == 200, body
        assert headers["X-Upstream"] == "blue"
    assert [r["path"] for r in good.requests] == [f"/r{i}" for i in range(6)]
    # The refused endpoint really was tried first at least once (and then retried).
    assert upstream_errors(await scrape_samples(gw), "blue", "connect") >= 1


async def test_all_endpoints_refused_is_a_quick_502(gateway):
    gw = await gateway([route_config([refused_url(), refused_url()])], timeouts=FAST)
    status, headers, body, elapsed = await get(gw.url + "/")
    assert status == 502
    assert headers["X-Graygate-Error"] == "connect"
    assert elapsed < 1.0
    assert 0 < len(body) < 300


async def test_upstream_errors_metric_counts_refused_connects(gateway):
    gw = await gateway([route_config(refused_url())], timeouts=FAST)
    for _ in range(3):
        status, *_ = await get(gw.url + "/")
        assert status == 502
    samples = await scrape_samples(gw)
    assert upstream_errors(samples, "blue", "connect") == 3
    assert (
        metric_sum(samples, "graygate_requests_total", route="shop", version="blue", code="502")
        == 3
    )


async def test_no_available_endpoint_is_503_with_retry_after(upstreams, gateway):
    sick = await upstreams("blue", failing_health("fine"))
    check = {"path": "/healthz", "interval": "100ms", "timeout": "500ms"}
    gw = await gateway([route_config(sick.url, health_check=check)], timeouts=FAST)
    await wait_unavailable(gw, "blue")
    status, headers, body, elapsed = await get(gw.url + "/page")
    assert status == 503
    assert headers.get("Retry-After", "").isdigit()
    assert headers.get("X-Graygate-Error")
    assert len(body) < 300 and elapsed < 1.0
    assert [r["path"] for r in sick.requests if r["path"] != "/healthz"] == []


# -- timeouts ----------------------------------------------------------------------------------


async def test_upstream_slower_than_read_timeout_is_504(raw_upstreams, gateway):
    async def silent(up, reader, writer, index):
        await up.read_head(reader)
        await asyncio.sleep(10)  # never answers; cancelled at teardown

    slow = await raw_upstreams(silent)
    gw = await gateway(
        [route_config(slow.url)], timeouts={"connect": "500ms", "read": "500ms", "request": "5s"}
    )
    status, headers, body, elapsed = await get(gw.url + "/")
    assert status == 504
    assert headers["X-Graygate-Error"] == "timeout"
    assert 0.4 <= elapsed <= 2.0
    assert len(body) < 300
    assert len(slow.requests) == 1  # a GET that timed out after being sent is not re-sent
    assert upstream_errors(await scrape_samples(gw), "blue", "timeout") == 1


# -- malformed and truncated responses ---------------------------------------------------------

GARBAGE = {
    "not_http": b"HELLO\r\n\r\n",
    "bad_status_line": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
    "bad_header": b"HTTP/1.1 200 OK\r\nContent Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("answer", list(GARBAGE.values()), ids=list(GARBAGE))
async def test_garbage_response_is_502_and_connection_discarded(raw_upstreams, gateway, answer):
    async def first_garbage(up, reader, writer, index):
        while await up.read_head(reader) is not None:
            writer.write(answer if len(up.requests) == 1 else OK_RESPONSE)
            await writer.drain()

    up = await raw_upstreams(first_garbage)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    status, headers, body, elapsed = await get(gw.url + "/")
    assert status == 502
    assert headers["X-Graygate-Error"] == "protocol"
    assert elapsed < 1.0
    for i in range(3):
        status, _, body, _ = await get(f"{gw.url}/next{i}")
        assert (status, body) == (200, b"ok")
    # The connection that carried garbage was thrown away, never reused.
    assert up.connections >= 2
    assert upstream_errors(await scrape_samples(gw), "blue", "protocol") == 1


async def test_bad_chunked_framing_never_looks_complete(raw_upstreams, gateway):
    bad = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\nzz\r\nmore\r\n0\r\n\r\n"
    )

    async def first_garbage(up, reader, writer, index):
        while await up.read_head(reader) is not None:
            writer.write(bad if len(up.requests) == 1 else OK_RESPONSE)
            await writer.drain()

    up = await raw_upstreams(first_garbage)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.get(gw.url + "/", timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        # A 502 (with X-Graygate-Error: protocol) or a cut connection would be safe too, but
        # graygate streams: the head is on its way before the bad chunk, so the body breaks.
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert time.monotonic() - t0 < 1.0
    status, _, body, _ = await get(gw.url + "/next")
    assert (status, body) == (200, b"ok")
    assert up.connections >= 2


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_upstream_reset_mid_body_is_truncated(raw_upstreams, gateway, how):
    async def cut(up, reader, writer, index):
        await up.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.05)
        if how == "rst":
            rst(writer)

    up = await raw_upstreams(cut)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    await expect_truncated(gw.url + "/")
    # Raw client: fewer bytes than announced, then EOF (not a hang until a timeout).
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
    data = b""
    t0 = time.monotonic()
    async with asyncio.timeout(3):
        while chunk := await reader.read(65536):
            data += chunk
    writer.close()
    assert time.monotonic() - t0 < 2.0
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: 1000000" in head.lower()
    assert len(body) < 1000000
    samples = await scrape_samples(gw)
    assert upstream_errors(samples, "blue", "reset") == 2


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_chunked_response_cut_before_last_chunk_is_truncated(raw_upstreams, gateway, how):
    async def cut(up, reader, writer, index):
        await up.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            writer.write(b"400\r\n" + b"y" * 0x400 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        if how == "rst":
            rst(writer)

    up = await raw_upstreams(cut)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    await expect_truncated(gw.url + "/")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
    data = b""
    async with asyncio.timeout(3):
        while chunk := await reader.read(65536):
            data += chunk
    writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert not data.endswith(b"0\r\n\r\n")  # the terminating chunk was never forged


# -- what may be re-sent -----------------------------------------------------------------------


async def test_post_is_never_resent(raw_upstreams, gateway):
    async def swallow(up, reader, writer, index):
        await up.read_head(reader)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(65536), 0.05)  # the body, if separate

    a = await raw_upstreams(swallow)
    b = await raw_upstreams(swallow)
    gw = await gateway([route_config([a.url, b.url], retries=3)], timeouts=FAST)
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/pay", data=b"amount=5", timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        assert r.status == 502
        assert r.headers["X-Graygate-Error"] == "reset"
    await asyncio.sleep(0.1)
    assert len(a.requests) + len(b.requests) == 1
    assert a.connections + b.connections == 1


async def test_post_on_stale_pooled_connection_is_not_resent(raw_upstreams, gateway):
    # The upstream answers one request per connection but does not say so; the second
    # request on a connection is read and dropped (it lost the race with the close).
    async def one_per_connection(up, reader, writer, index):
        await up.read_head(reader)
        writer.write(OK_RESPONSE)
        await writer.drain()
        await up.read_head(reader)

    up = await raw_upstreams(one_per_connection)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/warm") as r:
            assert r.status == 200
        async with s.post(gw.url + "/pay", data=b"") as r:
            status = r.status
    posts = [h for h in up.requests if h.startswith(b"POST")]
    assert len(posts) == 1, posts
    assert up.connections == 1  # the POST went on the pooled connection, and only there
    assert status == 502


@pytest.mark.parametrize("mode", ["close_after_response", "close_on_next_request"])
async def test_get_on_stale_pooled_connection_is_retried(raw_upstreams, gateway, mode):
    dropped = []

    async def one_per_connection(up, reader, writer, index):
        await up.read_head(reader)
        writer.write(OK_RESPONSE)  # keep-alive by default, yet the upstream closes
        await writer.drain()
        if mode == "close_on_next_request" and await up.read_head(reader) is not None:
            dropped.append(index)

    up = await raw_upstreams(one_per_connection)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    statuses = []
    async with aiohttp.ClientSession() as s:
        for i in range(20):
            async with s.get(f"{gw.url}/r{i}", timeout=aiohttp.ClientTimeout(total=5)) as r:
                statuses.append((r.status, await r.read()))
    assert statuses == [(200, b"ok")] * 20
    served = {h.split(b" ")[1] for h in up.requests}
    assert served == {f"/r{i}".encode() for i in range(20)}
    if mode == "close_on_next_request":
        # Pooled connections really were reused, hit the close, and the GET was re-sent.
        assert len(dropped) >= 10
        assert len(up.requests) == 20 + len(dropped)


# -- passive outlier detection -----------------------------------------------------------------


def always(status: int, text: str):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=text)

    return handler


async def test_failing_endpoint_is_ejected_for_the_ejection_time(upstreams, gateway):
    good = await upstreams("good")
    bad = await upstreams("bad", always(500, "boom"))
    gw = await gateway([route_config([good.url, bad.url], outlier=QUICK_OUTLIER)], timeouts=FAST)
    statuses = []
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        for i in range(30):
            async with s.get(f"{gw.url}/a{i}") as r:
                statuses.append(r.status)
        assert time.monotonic() - t0 < 1.5  # all of it inside the 2 s ejection
        assert len(bad.requests) == 3
        assert statuses.count(500) == 3 and statuses.count(200) == 27
        samples = await scrape_samples(gw)
        assert metric_sum(samples, "graygate_endpoint_available", endpoint=bad.url) == 0
        await asyncio.sleep(2.2)  # the ejection ends: the endpoint gets traffic again
        for i in range(20):
            async with s.get(f"{gw.url}/b{i}") as r:
                await r.read()
        assert len(bad.requests) == 6  # three more failures, then ejected again (4 s now)
    assert len(good.requests) == 27 + 17


async def test_single_failing_endpoint_is_never_ejected(upstreams, gateway):
    bad = await upstreams("bad", always(500, "boom"))
    gw = await gateway([route_config(bad.url, outlier=QUICK_OUTLIER)], timeouts=FAST)
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            async with s.get(gw.url + "/") as r:
                assert r.status == 500
                assert await r.text() == "boom"
    assert len(bad.requests) == 10


async def test_single_refusing_endpoint_is_never_ejected(gateway):
    gw = await gateway([route_config(refused_url(), outlier=QUICK_OUTLIER)], timeouts=FAST)
    for _ in range(6):
        status, headers, _, _ = await get(gw.url + "/")
        assert (status, headers["X-Graygate-Error"]) == (502, "connect")
    assert upstream_errors(await scrape_samples(gw), "blue", "connect") == 6


# -- failover ----------------------------------------------------------------------------------

CANARY_FORCE = [{"header": "X-Canary", "value": "always", "to": "canary"}]


async def test_failover_when_green_refuses(upstreams, gateway):
    blue = await upstreams("blue")
    route = route_config(blue.url, refused_url(), failover=True, force=CANARY_FORCE)
    gw = await gateway([route], timeouts=FAST)
    for _ in range(3):
        status, headers, body, _ = await get(gw.url + "/", headers={"X-Canary": "always"})
        assert status == 200, body
        assert headers["X-Graygate-Version"] == "blue"
        assert headers["X-Upstream"] == "blue"
    samples = await scrape_samples(gw)
    green_errors = metric_sum(
        samples, "graygate_requests_total", route="shop", version="green"
    ) - sum(
        metric_sum(samples, "graygate_requests_total", route="shop", version="green", code=str(c))
        for c in range(100, 500)
    )
    assert green_errors >= 1
    assert metric_sum(samples, "graygate_requests_total", version="blue", reason="failover") == 3


async def test_failover_when_green_is_unhealthy(upstreams, gateway):
    blue = await upstreams("blue")
    green = await upstreams("green", failing_health("green"))
    check = {"path": "/healthz", "interval": "100ms", "timeout": "500ms"}
    route = route_config(blue.url, green.url, failover=True, force=CANARY_FORCE, health_check=check)
    gw = await gateway([route], timeouts=FAST)
    await wait_unavailable(gw, "green")
    for _ in range(3):
        status, headers, _, _ = await get(gw.url + "/", headers={"X-Canary": "always"})
        assert status == 200
        assert headers["X-Graygate-Version"] == "blue"
    assert [r["path"] for r in green.requests if r["path"] != "/healthz"] == []
    samples = await scrape_samples(gw)
    assert metric_sum(samples, "graygate_requests_total", version="green", code="503") == 3
    assert metric_sum(samples, "graygate_requests_total", version="blue", reason="failover") == 3


async def test_without_failover_unavailable_green_is_503(upstreams, gateway):
    blue = await upstreams("blue")
    green = await upstreams("green", failing_health("green"))
    check = {"path": "/healthz", "interval": "100ms", "timeout": "500ms"}
    route = route_config(blue.url, green.url, force=CANARY_FORCE, health_check=check)
    gw = await gateway([route], timeouts=FAST)
    await wait_unavailable(gw, "green")
    status, headers, _, _ = await get(gw.url + "/", headers={"X-Canary": "always"})
    assert status == 503
    assert "Retry-After" in headers
    assert [r["path"] for r in blue.requests if r["path"] != "/healthz"] == []


# -- upstream 5xx pass through -----------------------------------------------------------------


@pytest.mark.parametrize("code", [500, 502, 503, 504])
async def test_upstream_5xx_passes_through_unchanged(upstreams, gateway, code):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=code, body=b"upstream says no\x00\xff", headers={"X-Why": "maintenance"}
        )

    up = await upstreams("blue", handler)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    status, headers, body, _ = await get(gw.url + "/x")
    assert status == code
    assert body == b"upstream says no\x00\xff"
    assert headers["X-Why"] == "maintenance"
    assert "X-Graygate-Error" not in headers
    assert len(up.requests) == 1
    samples = await scrape_samples(gw)
    assert metric_sum(samples, "graygate_requests_total", version="blue", code=str(code)) == 1
    assert metric_sum(samples, "graygate_upstream_errors_total") == 0
