"""Connection management of proxy/downstream.py (DownstreamProtocol, Gateway) through the
real in-process gateway: pipelining depth and read pausing, half-close, drain, the
keep-alive timeout enforced by Gateway.watch, closing after an answer that left the request
body unread, and message framing that a client cannot strip."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest
from aiohttp import web

from proxy.dataplane.downstream import MAX_PIPELINE, DownstreamProtocol
from proxy.dataplane.gateway import Gateway
from tests.helpers import route_config, wait_until

FAST = {
    "connect": "500ms",
    "read": "2s",
    "request": "3s",
    "client_header": "2s",
    "client_body": "2s",
    "keepalive": "5s",
}


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: shop\r\n{extra}\r\n".encode()


def gateway_of(gw: Any) -> Gateway:
    return gw.app.gateway


def server_side(gw: Any) -> list[DownstreamProtocol]:
    return list(gateway_of(gw).connections)


# -- pipelining -------------------------------------------------------------------------------


async def test_forty_pipelined_gets_in_one_write_answered_in_order(upstreams, gateway, raw_clients):
    assert MAX_PIPELINE < 40
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    await c.send(b"".join(get(f"/p{i}") for i in range(40)))
    for i in range(40):
        r = await c.response()
        assert r.status == 200
        assert json.loads(r.body)["path"] == f"/p{i}"
    # The connection survives the burst and is no longer paused.
    await c.send(get("/after"))
    r = await c.response()
    assert json.loads(r.body)["path"] == "/after"
    (proto,) = server_side(gw)
    assert proto.paused == 0 and not proto.queue


async def test_pipeline_deeper_than_limit_pauses_reading_then_resumes(
    upstreams, gateway, raw_clients
):
    release = asyncio.Event()

    async def slow_first(request: web.Request) -> web.Response:
        if request.path == "/p0":
            await release.wait()
        return web.json_response({"path": request.path})

    blue = await upstreams("blue", slow_first)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    await c.send(b"".join(get(f"/p{i}") for i in range(40)))
    await wait_until(lambda: len(blue.requests) == 1 and len(server_side(gw)) == 1)
    (proto,) = server_side(gw)
    await wait_until(lambda: len(proto.queue) >= MAX_PIPELINE)
    assert proto.paused & proto.PAUSE_PIPELINE, "reading not paused past the pipeline depth"
    assert len(blue.requests) == 1, "pipelined requests must be forwarded one at a time"
    release.set()
    for i in range(40):
        r = await c.response()
        assert json.loads(r.body)["path"] == f"/p{i}"
    await wait_until(lambda: proto.paused == 0)
    assert [r["path"] for r in blue.requests] == [f"/p{i}" for i in range(40)]


async def test_pipeline_bigger_than_one_read_resumes_after_pause(upstreams, gateway, raw_clients):
    # ~600 KiB of pipelined heads: more than one read, so reading really is paused at the
    # transport and must be resumed for the later requests to be seen at all.
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    pad = "x" * 3000
    n = 200
    sender = asyncio.create_task(
        c.send(b"".join(get(f"/p{i}", f"X-Pad: {pad}\r\n") for i in range(n)))
    )
    try:
        for i in range(n):
            r = await c.response(timeout=5.0)
            assert json.loads(r.body)["path"] == f"/p{i}"
    finally:
        await asyncio.wait_for(sender, 5.0)


# -- half-close ----------------------------------------------------------------------------------


async def test_half_close_after_full_request_still_gets_the_answer(upstreams, gateway, raw_clients):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)  # the client's FIN arrives before the answer
        return web.Response(text="late answer")

    blue = await upstreams("blue", slow)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    await c.send(get("/x"))
    c.writer.write_eof()  # shutdown(SHUT_WR)
    r = await c.response()
    assert r.status == 200 and r.body == b"late answer"
    assert await c.closed_within(2.0)


async def test_half_close_after_pipelined_requests_answers_them_all(
    upstreams, gateway, raw_clients
):
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    body = b"hello"
    await c.send(
        get("/a")
        + b"POST /b HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\n"
        + body
        + get("/c")
    )
    c.writer.write_eof()
    paths = [json.loads((await c.response()).body)["path"] for _ in range(3)]
    assert paths == ["/a", "/b", "/c"]
    assert await c.closed_within(2.0)


async def test_half_close_after_deep_pipeline_answers_all_then_closes(
    upstreams, gateway, raw_clients
):
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    await c.send(b"".join(get(f"/p{i}") for i in range(40)))
    c.writer.write_eof()
    for i in range(40):
        assert json.loads((await c.response()).body)["path"] == f"/p{i}"
    assert await c.closed_within(2.0)


async def test_half_close_in_the_middle_of_a_body_is_not_waited_out(
    upstreams, gateway, raw_clients
):
    # After the client's FIN the rest of the body can never come: the exchange is abandoned
    # at once (nginx: "client prematurely closed connection"), not after client_body.
    async def reader(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    blue = await upstreams("blue", reader)
    gw = await gateway([route_config(blue.url)], timeouts={**FAST, "client_body": "5s"})
    c = await raw_clients(gw.port)
    await c.send(b"POST /cut HTTP/1.1\r\nHost: shop\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    await wait_until(lambda: len(blue.requests) == 1)
    c.writer.write_eof()
    t0 = time.monotonic()
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(4.0):
            while chunk := await c.reader.read(65536):
                data += chunk
    waited = time.monotonic() - t0
    assert not data.startswith(b"HTTP/1.1 2"), data
    g = gateway_of(gw)
    await wait_until(lambda: not g.connections)
    # The client gave up: that is no error of the version (it would sway the canary verdict).
    blue_stats = gw.app.stats.get("shop", "blue")
    problems = []
    if waited >= 1.0:
        problems.append(f"the connection was held {waited:.1f}s after the client's FIN")
    if blue_stats.window.errors or any(blue_stats.upstream_errors.values()):
        problems.append(
            f"counted as an upstream error: {blue_stats.upstream_errors}, answered {data[:40]!r}"
        )
    assert not problems, "; ".join(problems)


async def test_half_close_without_a_request_closes(upstreams, gateway, raw_clients):
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    c.writer.write_eof()
    assert await c.closed_within(1.0)
    await wait_until(lambda: not server_side(gw))


# -- drain ---------------------------------------------------------------------------------------


async def test_drain_closes_idle_keep_alive_connections_at_once(upstreams, gateway, raw_clients):
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    used = await raw_clients(gw.port)
    await used.send(get("/a"))
    assert (await used.response()).status == 200
    fresh = await raw_clients(gw.port)  # connected, nothing sent yet
    await wait_until(lambda: len(server_side(gw)) == 2)
    g = gateway_of(gw)
    t0 = time.monotonic()
    g.drain()
    assert await used.closed_within(1.0)
    assert await fresh.closed_within(1.0)
    assert time.monotonic() - t0 < 0.5
    await wait_until(lambda: g.drained.is_set())


async def test_drain_lets_busy_connection_finish_with_connection_close(
    upstreams, gateway, raw_clients
):
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="finished")

    blue = await upstreams("blue", slow)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    busy = await raw_clients(gw.port)
    idle = await raw_clients(gw.port)
    await busy.send(get("/slow"))
    await wait_until(lambda: len(blue.requests) == 1 and len(server_side(gw)) == 2)
    g = gateway_of(gw)
    g.drain()
    assert await idle.closed_within(1.0)
    assert not await busy.closed_within(0.3), "a busy connection was cut by the drain"
    assert not g.drained.is_set()
    release.set()
    r = await busy.response()
    assert r.status == 200 and r.body == b"finished"
    assert r.get("connection") == "close"
    assert await busy.closed_within(1.0)
    await wait_until(lambda: g.drained.is_set())


async def test_drain_closes_a_keep_alive_connection_after_its_next_answer(
    upstreams, gateway, raw_clients
):
    # A request whose head was being read when the drain began is answered, with close.
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    await c.send(b"GET /half HTTP/1.1\r\nHost: sh")
    await wait_until(lambda: any(p.in_head for p in server_side(gw)))
    gateway_of(gw).drain()
    await c.send(b"op\r\n\r\n")
    r = await c.response()
    assert r.status == 200 and json.loads(r.body)["path"] == "/half"
    assert r.get("connection") == "close"
    assert await c.closed_within(1.0)


# -- keep-alive timeout (Gateway.watch) -----------------------------------------------------------


async def test_idle_keep_alive_connection_closed_after_keepalive_timeout(
    upstreams, gateway, raw_clients
):
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts={**FAST, "keepalive": "300ms"})
    c = await raw_clients(gw.port)
    await c.send(get("/a"))
    assert (await c.response()).status == 200
    t0 = time.monotonic()
    assert await c.closed_within(2.0), "idle keep-alive connection never closed"
    waited = time.monotonic() - t0
    assert 0.2 <= waited < 1.0, f"closed after {waited:.2f}s, keepalive is 0.3s"


async def test_requests_within_keepalive_keep_the_connection(upstreams, gateway, raw_clients):
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts={**FAST, "keepalive": "400ms"})
    c = await raw_clients(gw.port)
    t0 = time.monotonic()
    for i in range(5):  # 5 x 200 ms: well past one keepalive period in total
        await c.send(get(f"/k{i}"))
        assert json.loads((await c.response()).body)["path"] == f"/k{i}"
        await asyncio.sleep(0.2)
    assert time.monotonic() - t0 > 0.8


async def test_keepalive_timeout_does_not_cut_a_slow_answer(upstreams, gateway, raw_clients):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.8)
        return web.Response(text="slow")

    blue = await upstreams("blue", slow)
    gw = await gateway([route_config(blue.url)], timeouts={**FAST, "keepalive": "300ms"})
    c = await raw_clients(gw.port)
    await c.send(get("/slow"))
    r = await c.response()
    assert r.status == 200 and r.body == b"slow"


# -- an answer that leaves the request body unread ------------------------------------------------


async def test_early_answer_with_unread_body_closes_the_connection(upstreams, gateway, raw_clients):
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=413, text="too big for me")  # body never read

    blue = await upstreams("blue", refuse)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    size = 8 << 20
    await c.send(
        f"POST /upload HTTP/1.1\r\nHost: shop\r\nContent-Length: {size}\r\n\r\n".encode()
        + b"a" * 65536
    )

    async def send_rest() -> None:
        # Keep sending the body the way a real client does, until the proxy stops reading.
        with contextlib.suppress(ConnectionError):
            for _ in range(size // 65536 - 1):
                c.writer.write(b"a" * 65536)
                await c.writer.drain()

    sender = asyncio.create_task(send_rest())
    try:
        r = await c.response(timeout=3.0)
        assert r.status == 413 and r.body == b"too big for me"
        assert r.get("connection") == "close"
        assert await c.closed_within(3.0)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender


async def test_early_answer_with_unread_body_never_parses_the_body_as_requests(
    upstreams, gateway, raw_clients
):
    # The rest of an unread body must not be taken for the next request on the connection.
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=413, text="no")

    blue = await upstreams("blue", refuse)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    smuggled = get("/smuggled") * 4
    head = f"POST /upload HTTP/1.1\r\nHost: shop\r\nContent-Length: {200_000}\r\n\r\n".encode()
    await c.send(head + b"b" * 4096)
    r = await c.response()
    assert r.status == 413
    with contextlib.suppress(ConnectionError):
        await c.send(smuggled + b"b" * (200_000 - 4096 - len(smuggled)))
    assert await c.closed_within(2.0)
    await asyncio.sleep(0.1)
    assert [x["path"] for x in blue.requests] == ["/upload"]


# -- framing a client cannot strip ----------------------------------------------------------------


async def test_connection_naming_content_length_cannot_smuggle_a_request(
    upstreams, gateway, raw_clients
):
    # RFC 9110 7.6.1: fields named in Connection are removed before forwarding. Removing
    # Content-Length that way would leave the body unframed upstream, where it would be read
    # as a second request. The proxy must keep the forwarded message self-delimiting.
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    inner = b"GET /smuggled HTTP/1.1\r\nHost: shop\r\n\r\n"
    await c.send(
        b"POST /outer HTTP/1.1\r\nHost: shop\r\nConnection: content-length\r\n"
        + f"Content-Length: {len(inner)}\r\n\r\n".encode()
        + inner
    )
    r = await c.response()
    assert r.status == 200
    assert json.loads(r.body) == {
        "version": "blue",
        "path": "/outer",
        "method": "POST",
        "len": len(inner),
    }
    await c.send(get("/next"))
    assert json.loads((await c.response()).body)["path"] == "/next"
    await asyncio.sleep(0.2)
    assert [x["path"] for x in blue.requests] == ["/outer", "/next"]


# -- absolute-form targets (httptools.parse_url leaves absent parts None) -------------------------


@pytest.mark.parametrize(
    ("target", "path", "host"),
    [
        ("http://127.0.0.1:{port}/abs?q=1", "/abs?q=1", "127.0.0.1:{port}"),
        ("http://127.0.0.1:{port}/abs", "/abs", "127.0.0.1:{port}"),  # no query
        ("http://localhost/abs?q=1", "/abs?q=1", "localhost"),  # no port
        ("http://localhost", "/", "localhost"),  # no port, path or query
    ],
)
async def test_absolute_form_target_parts_may_be_absent(
    upstreams, gateway, raw_clients, target, path, host
):
    # The stubs type every part of parse_url's result as present; compiled code trusts
    # declared types, so each absent part is a path of its own.
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    await c.send(f"GET {target.format(port=gw.port)} HTTP/1.1\r\nHost: other\r\n\r\n".encode())
    r = await c.response()
    assert r.status == 200, r
    (seen,) = blue.requests
    assert seen["raw_path"] == path
    assert [v for n, v in seen["headers"] if n.lower() == b"host"] == [
        host.format(port=gw.port).encode()
    ]
