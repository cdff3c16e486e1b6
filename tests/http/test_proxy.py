"""HTTP proxying behaviour of the data plane and routing through it, end to end: real aiohttp
or raw-socket upstreams, the real App in-process, real clients (raw sockets, aiohttp, curl)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import RawServer, free_port, raw_request, read_request, route_config

# Small timeouts so a hang fails fast; `read` leaves room for the 1.5 s streaming pause.
FAST = {"connect": "500ms", "read": "3s", "request": "5s"}


# -- raw HTTP/1.1 client: the raw_clients fixture (tests.helpers.RawClient) -------------------


def get(path: str, host: str = "test.local", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


# -- raw-socket upstreams ----------------------------------------------------------------------


@dataclass
class RawUpstream:
    raw: RawServer
    request_lines: list[bytes] = field(default_factory=list)
    open_now: int = 0
    open_max: int = 0
    inflight: int = 0
    inflight_max: int = 0

    @property
    def port(self) -> int:
        return self.raw.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


RawHandler = Callable[[RawUpstream, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_upstreams() -> AsyncIterator[Callable[[RawHandler], Awaitable[RawUpstream]]]:
    """Factory: a plain asyncio TCP server whose handler writes HTTP by hand."""
    started: list[RawUpstream] = []

    async def start(handler: RawHandler) -> RawUpstream:
        holder: list[RawUpstream] = []

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up = holder[0]
            up.open_now += 1
            up.open_max = max(up.open_max, up.open_now)
            try:
                await handler(up, reader, writer)  # RawServer ends it if the proxy hangs up
            finally:
                up.open_now -= 1

        raw = await RawServer(on_conn).start(free_port())
        up = RawUpstream(raw)
        holder.append(up)
        started.append(up)
        return up

    yield start
    for up in started:
        await up.raw.stop()


def reply(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def header_values(seen: dict[str, Any], name: str) -> list[str]:
    """Values of one request header as the aiohttp upstream received them, in order."""
    key = name.lower().encode()
    return [v.decode("latin-1") for n, v in seen["headers"] if n.lower() == key]


def header_names(seen: dict[str, Any]) -> set[str]:
    return {n.decode("latin-1").lower() for n, _ in seen["headers"]}


# -- pipelining ---------------------------------------------------------------------------------


async def test_pipelined_requests_answered_in_order(upstreams, gateway, raw_clients):
    async def slow_first(request: web.Request) -> web.StreamResponse:
        # The first request is the slowest: answers must still come back in request order.
        await asyncio.sleep(float(request.query["delay"]))
        return web.Response(text=f"answer:{request.path}")

    blue = await upstreams("blue", slow_first)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    delays = [0.3, 0.2, 0.0, 0.1]
    batch = b"".join(get(f"/r{i}?delay={d}") for i, d in enumerate(delays))
    await c.send(batch)  # all four in one write
    bodies = [(await c.response()).body for _ in delays]
    assert bodies == [f"answer:/r{i}".encode() for i in range(len(delays))]
    assert sorted(r["path"] for r in blue.requests) == sorted(
        f"/r{i}?delay={d}" for i, d in enumerate(delays)
    )


async def test_pipelined_mix_of_post_head_and_get(upstreams, gateway, raw_clients):
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    await c.send(
        get("/one")
        + b"POST /two HTTP/1.1\r\nHost: t\r\nContent-Length: 7\r\n\r\npayload"
        + b"HEAD /three HTTP/1.1\r\nHost: t\r\n\r\n"
        + b"POST /four HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3\r\nabc\r\n0\r\n\r\n"
        + get("/five", extra="Connection: close\r\n")
    )
    methods = ["GET", "POST", "HEAD", "POST", "GET"]
    got = [await c.response(method=m) for m in methods]
    assert [r.status for r in got] == [200] * 5
    assert b'"path": "/one"' in got[0].body
    assert b'"path": "/two"' in got[1].body and b'"len": 7' in got[1].body
    assert got[2].body == b"" and got[2].get("content-length")
    assert b'"path": "/four"' in got[3].body and b'"len": 3' in got[3].body
    assert b'"path": "/five"' in got[4].body
    assert await c.at_eof()


# -- Expect: 100-continue -----------------------------------------------------------------------


async def test_expect_100_continue_is_relayed_before_the_body(upstreams, gateway, raw_clients):
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    body = b"x" * 5000
    await c.send(
        b"POST /upload HTTP/1.1\r\nHost: test.local\r\nContent-Length: %d\r\n"
        b"Expect: 100-continue\r\n\r\n" % len(body)
    )
    interim = await c.response(timeout=3.0)  # before any body byte was sent
    assert interim.status == 100
    await c.send(body)
    final = await c.response()
    assert final.status == 200
    assert final.get("x-graygate-version") == "blue"
    assert b'"len": 5000' in final.body


async def test_curl_upload_with_expect_100_continue(upstreams, gateway, tmp_path: Path):
    async def digest(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        return web.json_response({"len": len(data), "sha": hashlib.sha256(data).hexdigest()})

    blue = await upstreams("blue", digest)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    payload = os.urandom(300_000)
    path = tmp_path / "payload.bin"
    path.write_bytes(payload)
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-v",
        "--max-time",
        "10",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{path}",
        f"{gw.url}/upload",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert b"< HTTP/1.1 100 Continue" in err
    assert b"< HTTP/1.1 200" in err
    assert out == (
        b'{"len": %d, "sha": "%s"}' % (len(payload), hashlib.sha256(payload).hexdigest().encode())
    )


# -- request body streaming ---------------------------------------------------------------------


async def sha_handler(request: web.Request) -> web.StreamResponse:
    h = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_any():
        h.update(chunk)
        n += len(chunk)
    return web.json_response(
        {"len": n, "sha": h.hexdigest(), "te": request.headers.get("Transfer-Encoding", "")}
    )


async def test_chunked_request_body_arrives_intact(upstreams, gateway, raw_clients):
    blue = await upstreams("blue", sha_handler)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    chunks = [b"first-", os.urandom(3000), b"\r\n0\r\n", os.urandom(70_000), b"end"]
    await c.send(
        b"POST /chunked HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for chunk in chunks:
        await c.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await asyncio.sleep(0.1)
    await c.send(b"0\r\n\r\n")
    resp = await c.response()
    assert resp.status == 200
    whole = b"".join(chunks)
    assert resp.body == (
        b'{"len": %d, "sha": "%s", "te": "chunked"}'
        % (len(whole), hashlib.sha256(whole).hexdigest().encode())
    )


async def test_large_post_with_content_length_arrives_intact(upstreams, gateway):
    blue = await upstreams("blue", sha_handler)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    payload = os.urandom(20 * 1024 * 1024)
    async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/big", data=io.BytesIO(payload)) as r:
        assert r.status == 200
        got = await r.json()
    assert got == {"len": len(payload), "sha": hashlib.sha256(payload).hexdigest(), "te": ""}


# -- response streaming -------------------------------------------------------------------------


async def test_response_is_streamed_not_buffered(upstreams, gateway):
    finished: list[float] = []

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first-bytes")
        await asyncio.sleep(1.5)
        await resp.write(b"-last")
        finished.append(time.monotonic())
        await resp.write_eof()
        return resp

    blue = await upstreams("blue", trickle)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    async with aiohttp.ClientSession() as s:
        sent = time.monotonic()
        async with s.get(f"{gw.url}/stream") as r:
            first = await r.content.readany()
            first_at = time.monotonic()
            rest = await r.read()
    assert first.startswith(b"first")
    assert first + rest == b"first-bytes-last"
    assert first_at - sent < 0.8, f"first bytes after {first_at - sent:.2f}s"
    assert finished and first_at < finished[0] - 1.0


# -- hop-by-hop fields --------------------------------------------------------------------------


async def test_request_hop_by_hop_fields_are_removed(upstreams, gateway, raw_clients):
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    resp = await c.request(
        b"GET /hop HTTP/1.1\r\nHost: test.local\r\n"
        b"Connection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Connection: X-OTHER\r\nX-Other: 2\r\n"
        b"TE: trailers\r\nUpgrade: foo/2\r\nProxy-Connection: keep-alive\r\n"
        b"X-End-To-End: kept\r\n\r\n"
    )
    assert resp.status == 200
    seen = blue.requests[-1]
    names = header_names(seen)
    for hop in ("x-secret", "x-other", "keep-alive", "te", "upgrade", "proxy-connection"):
        assert hop not in names, f"{hop} reached the upstream: {seen['headers']}"
    for value in header_values(seen, "connection"):
        assert "x-secret" not in value.lower()
    assert header_values(seen, "x-end-to-end") == ["kept"]
    assert await c.at_eof(), "client asked for Connection: close"


async def test_response_hop_by_hop_fields_are_removed(raw_upstreams, gateway, raw_clients):
    async def serve(up: RawUpstream, reader, writer) -> None:
        while await read_request(reader) is not None:
            writer.write(
                reply(
                    b"ok",
                    b"Connection: X-Internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=5\r\n"
                    b"Proxy-Connection: keep-alive\r\nX-Public: yes\r\n"
                    b"Connection: x-internal-2\r\nX-Internal-2: 2\r\n",
                )
            )
            await writer.drain()

    up = await raw_upstreams(serve)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    resp = await c.request(get("/"))
    assert resp.status == 200 and resp.body == b"ok"
    assert "x-internal" not in resp.names()
    assert "x-internal-2" not in resp.names()
    assert "keep-alive" not in resp.names()
    assert "proxy-connection" not in resp.names()
    for value in resp.all("connection"):
        assert "x-internal" not in value.lower()
    assert resp.all("x-public") == ["yes"]
    again = await c.request(get("/again"))  # the client connection is still usable
    assert again.status == 200 and again.body == b"ok"


# -- forwarding headers -------------------------------------------------------------------------


async def test_forwarded_for_from_untrusted_client_is_appended(upstreams, gateway, raw_clients):
    async def with_via(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok", headers={"Via": "1.1 backend"})

    blue = await upstreams("blue", with_via)
    gw = await gateway([route_config(blue.url)], timeouts=FAST, trusted_proxies=[])
    c = await raw_clients(gw.port)
    resp = await c.request(
        b"GET / HTTP/1.1\r\nHost: shop.test:8080\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\r\n"
    )
    assert resp.status == 200
    seen = blue.requests[-1]
    # The incoming chain plus the peer (DESIGN.md section 3); Proto and Host are replaced.
    assert header_values(seen, "x-forwarded-for") == ["6.6.6.6, 127.0.0.1"]
    assert header_values(seen, "x-forwarded-proto") == ["http"]
    assert header_values(seen, "x-forwarded-host") == ["shop.test:8080"]
    assert header_values(seen, "via") == ["1.1 graygate"]
    assert resp.all("via") == ["1.1 backend, 1.1 graygate"]


async def echo_forwarding(request: web.Request) -> web.StreamResponse:
    """An upstream that answers with the forwarding headers it received, every line."""
    names = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Via")
    return web.json_response({n: request.headers.getall(n, []) for n in names})


FORWARDING_REQUEST = (
    b"GET /who HTTP/1.1\r\nHost: shop.test\r\n"
    b"X-Forwarded-For: 203.0.113.7, 198.51.100.2\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"X-Forwarded-For: 192.0.2.44\r\n"
    b"X-Forwarded-Host: evil.example\r\n\r\n"
)


@pytest.mark.parametrize(
    "trusted, mode, want_for, want_proto, want_host",
    [
        # append (the default): the whole incoming chain, in order, then the peer.
        ([], None, "203.0.113.7, 198.51.100.2, 192.0.2.44, 127.0.0.1", "http", "shop.test"),
        ([], "append", "203.0.113.7, 198.51.100.2, 192.0.2.44, 127.0.0.1", "http", "shop.test"),
        # replace: an untrusted peer's chain is dropped, only the peer is sent.
        ([], "replace", "127.0.0.1", "http", "shop.test"),
        # A trusted proxy's chain, Proto and Host are kept in both modes.
        (
            ["127.0.0.1/32"],
            "append",
            "203.0.113.7, 198.51.100.2, 192.0.2.44, 127.0.0.1",
            "https",
            "evil.example",
        ),
        (
            ["127.0.0.1/32"],
            "replace",
            "203.0.113.7, 198.51.100.2, 192.0.2.44, 127.0.0.1",
            "https",
            "evil.example",
        ),
    ],
    ids=["default", "append", "replace", "trusted-append", "trusted-replace"],
)
async def test_forwarding_headers_as_an_echoing_upstream_sees_them(
    upstreams, gateway, raw_clients, trusted, mode, want_for, want_proto, want_host
):
    blue = await upstreams("blue", echo_forwarding)
    top: dict[str, Any] = {"timeouts": FAST, "trusted_proxies": trusted}
    if mode is not None:
        top["forwarded_for"] = mode
    gw = await gateway([route_config(blue.url)], **top)
    c = await raw_clients(gw.port)
    for _ in range(2):  # the second on the same keep-alive connection, pooled upstream
        resp = await c.request(FORWARDING_REQUEST)
        assert resp.status == 200, resp.body
        echoed = json.loads(resp.body)
        assert echoed["X-Forwarded-For"] == [want_for]
        assert echoed["X-Forwarded-Proto"] == [want_proto]
        assert echoed["X-Forwarded-Host"] == [want_host]
        assert echoed["Via"] == ["1.1 graygate"]


async def test_forwarded_for_appended_for_an_aiohttp_client(upstreams, gateway):
    blue = await upstreams("blue", echo_forwarding)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    async with (
        aiohttp.ClientSession() as s,
        s.get(gw.url + "/", headers={"X-Forwarded-For": "10.9.8.7"}) as r,
    ):
        assert r.status == 200
        echoed = await r.json()
    assert echoed["X-Forwarded-For"] == ["10.9.8.7, 127.0.0.1"]


async def test_forwarded_chain_kept_from_trusted_proxy(upstreams, gateway, raw_clients):
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST, trusted_proxies=["127.0.0.1/32"])
    c = await raw_clients(gw.port)
    resp = await c.request(
        b"GET / HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 203.0.113.7\r\n"
        b"Via: 1.0 edge\r\nX-Forwarded-For: 198.51.100.2\r\n\r\n"
    )
    assert resp.status == 200
    seen = blue.requests[-1]
    assert header_values(seen, "x-forwarded-for") == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
    assert header_values(seen, "x-forwarded-proto") == ["http"]
    assert header_values(seen, "x-forwarded-host") == ["shop.test"]
    assert header_values(seen, "via") == ["1.0 edge, 1.1 graygate"]
    assert resp.all("via") == ["1.1 graygate"]


# -- headers and bodies passed as sent ----------------------------------------------------------


async def test_repeated_headers_and_set_cookies_preserved(upstreams, gateway, raw_clients):
    async def cookies(request: web.Request) -> web.StreamResponse:
        resp = web.Response(text="ok")
        for i in range(3):
            resp.headers.add("Set-Cookie", f"c{i}=v{i}; Path=/")
        resp.headers.add("X-Dup", "one")
        resp.headers.add("X-Dup", "two")
        return resp

    blue = await upstreams("blue", cookies)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    resp = await c.request(
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Multi: a\r\nAccept: */*\r\nX-Multi: b\r\n"
        b"X-Multi: c\r\n\r\n"
    )
    assert resp.status == 200
    assert header_values(blue.requests[-1], "x-multi") == ["a", "b", "c"]
    assert resp.all("set-cookie") == ["c0=v0; Path=/", "c1=v1; Path=/", "c2=v2; Path=/"]
    assert resp.all("x-dup") == ["one", "two"]


async def test_gzip_body_passed_through_byte_for_byte(upstreams, gateway, raw_clients):
    compressed = gzip.compress(b"hello graygate " * 2000, mtime=0)

    async def gz(request: web.Request) -> web.StreamResponse:
        if request.path == "/chunked":
            resp = web.StreamResponse(headers={"Content-Encoding": "gzip"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(compressed[:1000])
            await resp.write(compressed[1000:])
            await resp.write_eof()
            return resp
        return web.Response(
            body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    blue = await upstreams("blue", gz)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    for path in ("/fixed", "/chunked"):
        resp = await c.request(get(path, extra="Accept-Encoding: gzip\r\n"))
        assert resp.status == 200
        assert resp.all("content-encoding") == ["gzip"]
        assert resp.body == compressed, path
    assert header_values(blue.requests[-1], "accept-encoding") == ["gzip"]


async def test_query_strings_and_encoded_paths_preserved(raw_upstreams, gateway, raw_clients):
    async def record(up: RawUpstream, reader, writer) -> None:
        while (req := await read_request(reader)) is not None:
            up.request_lines.append(req[0])
            writer.write(reply(b"ok"))
            await writer.drain()

    up = await raw_upstreams(record)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    targets = [
        "/p?a=%2F&b=%zz&c=+&d",
        "/a%2Fb/c%2f?x=%2F",
        "/q?k=1&k=2&empty=&=v&%E4%B8%AD=%e4",
        "/semi;p=1/x?y=a%20b+c&z=%3D%26",
        "/only?",
    ]
    for t in targets:
        resp = await c.request(get(t))
        assert resp.status == 200, t
    assert up.request_lines == [f"GET {t} HTTP/1.1".encode() for t in targets]
    # absolute-form naming the gateway itself: origin-form upstream, query untouched
    up.request_lines.clear()
    resp = await c.request(get(f"http://127.0.0.1:{gw.port}/abs?a=%2F&b=%zz&c=+&d"))
    assert resp.status == 200
    assert up.request_lines == [b"GET /abs?a=%2F&b=%zz&c=+&d HTTP/1.1"]


# -- bodiless responses and framing -------------------------------------------------------------


async def test_head_has_length_but_no_body_and_keep_alive_survives(upstreams, gateway, raw_clients):
    async def sized(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"z" * 1234)

    blue = await upstreams("blue", sized)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    head = await c.request(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n", method="HEAD")
    assert head.status == 200
    assert head.get("content-length") == "1234"
    await c.send(get("/after-head"))
    nxt = await c.response()  # a stray body would make this line unparsable
    assert nxt.status == 200 and nxt.body == b"z" * 1234
    assert [r["method"] for r in blue.requests] == ["HEAD", "GET"]


async def test_204_and_304_have_no_body(upstreams, gateway, raw_clients):
    async def bodiless(request: web.Request) -> web.StreamResponse:
        if request.path == "/204":
            return web.Response(status=204)
        if request.path == "/304":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(text="after")

    blue = await upstreams("blue", bodiless)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    r204 = await c.request(get("/204"))
    assert r204.status == 204
    assert r204.get("transfer-encoding") is None
    r304 = await c.request(get("/304", extra='If-None-Match: "v1"\r\n'))
    assert r304.status == 304 and r304.get("etag") == '"v1"'
    assert r304.get("transfer-encoding") is None
    after = await c.request(get("/ok"))
    assert after.status == 200 and after.body == b"after"


async def test_bodiless_answers_with_framing_headers_do_not_desync(
    raw_upstreams, gateway, raw_clients
):
    async def framing(up: RawUpstream, reader, writer) -> None:
        while (req := await read_request(reader)) is not None:
            method, target = req[0].split(b" ")[:2]
            if target == b"/304":
                writer.write(
                    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: x\r\n\r\n"
                )
            elif target == b"/204":
                writer.write(b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n")
            elif method == b"HEAD":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            else:
                writer.write(reply(b"fine"))
            await writer.drain()

    up = await raw_upstreams(framing)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    r304 = await c.request(get("/304"))
    assert r304.status == 304 and r304.get("etag") == "x"
    r204 = await c.request(get("/204"))
    assert r204.status == 204 and r204.get("transfer-encoding") is None
    head = await c.request(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n", method="HEAD")
    assert head.status == 200
    ok = await c.request(get("/ok"))  # each bodiless answer left the stream in sync
    assert ok.status == 200 and ok.body == b"fine"


async def test_close_delimited_upstream_body_reaches_http11_client_chunked(
    raw_upstreams, gateway, raw_clients
):
    pieces = [b"alpha-", b"beta-" * 1000, b"gamma"]

    async def http10(up: RawUpstream, reader, writer) -> None:
        if await read_request(reader) is None:
            return
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for p in pieces:
            writer.write(p)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()

    up = await raw_upstreams(http10)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    resp = await c.request(get("/legacy"))
    assert resp.status == 200
    assert resp.get("transfer-encoding") == "chunked"
    assert resp.get("content-length") is None
    assert resp.body == b"".join(pieces)


async def test_http10_client_without_keep_alive_gets_answer_then_close(upstreams, gateway):
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/stream":  # chunked upstream answer: HTTP/1.0 has no chunking
            resp = web.StreamResponse()
            await resp.prepare(request)
            await resp.write(b"part1-")
            await resp.write(b"part2")
            await resp.write_eof()
            return resp
        return web.Response(text="hello-1.0")

    blue = await upstreams("blue", handler)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    for path, body in (("/plain", b"hello-1.0"), ("/stream", b"part1-part2")):
        started = time.monotonic()
        raw = await raw_request(gw.port, f"GET {path} HTTP/1.0\r\n\r\n".encode(), timeout=3.0)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"{path}: connection not closed after the answer ({elapsed:.1f}s)"
        head, _, got = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1."), raw[:200]
        assert b" 200 " in head.split(b"\r\n")[0]
        assert b"transfer-encoding" not in head.lower(), head
        assert got == body, path


async def test_http10_client_with_keep_alive_keeps_the_connection(upstreams, gateway, raw_clients):
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    c = await raw_clients(gw.port)
    for i in range(2):
        resp = await c.request(f"GET /k{i} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
        assert resp.status == 200 and resp.get("content-length")
        assert (resp.get("connection") or "").lower() == "keep-alive"
        assert f'"path": "/k{i}"'.encode() in resp.body
    assert not await c.at_eof(0.3)


# -- WebSocket ----------------------------------------------------------------------------------


async def test_websocket_echo_through_the_proxy(upstreams, gateway):
    async def ws_echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
        return ws

    blue = await upstreams("blue", ws_echo)
    gw = await gateway([route_config(blue.url)], timeouts=FAST)
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{gw.url}/ws") as ws:
        got = []
        for i in range(3):
            await ws.send_str(f"m{i}")
            msg = await ws.receive(timeout=3)
            assert msg.type == aiohttp.WSMsgType.TEXT
            got.append(msg.data)
        await ws.close()
    assert got == ["echo:m0", "echo:m1", "echo:m2"]


# -- X-Graygate-Version -------------------------------------------------------------------------


async def test_version_header_on_by_default_and_off_when_null(upstreams, gateway):
    blue = await upstreams("blue")
    on = await gateway([route_config(blue.url)], timeouts=FAST)
    off = await gateway([route_config(blue.url)], timeouts=FAST, version_header=None)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{on.url}/") as r:
            assert r.status == 200
            assert r.headers.getall("X-Graygate-Version") == ["blue"]
        async with s.get(f"{off.url}/") as r:
            assert r.status == 200
            assert "X-Graygate-Version" not in r.headers


# -- routing through the proxy ------------------------------------------------------------------


async def fetch_versions(
    s: aiohttp.ClientSession, url: str, n: int, headers: dict[str, str] | None = None
) -> list[str]:
    out = []
    for _ in range(n):
        async with s.get(url, headers=headers) as r:
            assert r.status == 200
            await r.read()
            assert r.headers["X-Upstream"] == r.headers["X-Graygate-Version"]
            out.append(r.headers["X-Upstream"])
    return out


async def test_force_header_and_cookie_reach_canary_at_weight_zero(upstreams, gateway):
    blue = await upstreams("blue")
    green = await upstreams("green")
    route = route_config(
        blue.url,
        green.url,
        force=[
            {"header": "X-Canary", "value": "always", "to": "canary"},
            {"cookie": "canary", "value": "always", "to": "canary"},
        ],
    )
    gw = await gateway([route], timeouts=FAST)
    async with aiohttp.ClientSession() as s:
        assert set(await fetch_versions(s, gw.url, 10, {"X-Canary": "always"})) == {"green"}
        assert set(await fetch_versions(s, gw.url, 10, {"Cookie": "a=1; canary=always"})) == {
            "green"
        }
        assert set(await fetch_versions(s, gw.url, 10, {"X-Canary": "sometimes"})) == {"blue"}
        assert set(await fetch_versions(s, gw.url, 10)) == {"blue"}
    assert len(green.requests) == 20


async def test_sticky_cookie_issued_and_honoured(upstreams, gateway):
    blue = await upstreams("blue")
    green = await upstreams("green")
    route = route_config(blue.url, green.url, sticky={}, weights={"blue": 50, "green": 50})
    gw = await gateway([route], timeouts=FAST)
    first_versions = set()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        for _ in range(16):  # 16 fresh users: both versions appear unless the split is broken
            async with s.get(f"{gw.url}/") as r:
                assert r.status == 200
                cookies = r.headers.getall("Set-Cookie", [])
                version = r.headers["X-Graygate-Version"]
            assert len(cookies) == 1, cookies
            parts = [p.strip() for p in cookies[0].split(";")]
            assert parts[0].startswith("gg_uid=") and len(parts[0]) > len("gg_uid=") + 8
            assert "HttpOnly" in parts
            assert "SameSite=Lax" in parts
            assert "Max-Age=2592000" in parts  # 30 days by default
            assert "Path=/" in parts
            first_versions.add(version)
            again = []
            for _ in range(8):
                async with s.get(f"{gw.url}/", headers={"Cookie": parts[0]}) as r:
                    assert r.status == 200
                    assert "Set-Cookie" not in r.headers  # a known user gets no new id
                    again.append(r.headers["X-Graygate-Version"])
            assert set(again) == {version}
    assert first_versions == {"blue", "green"}


async def test_sticky_header_key_sticks_per_user(upstreams, gateway):
    blue = await upstreams("blue")
    green = await upstreams("green")
    route = route_config(
        blue.url,
        green.url,
        sticky={"keys": ["header:X-User-Id"]},
        weights={"blue": 50, "green": 50},
    )
    gw = await gateway([route], timeouts=FAST)
    per_user: dict[str, set[str]] = {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        for rnd in range(4):
            for u in range(20):
                async with s.get(f"{gw.url}/", headers={"X-User-Id": f"user-{u}"}) as r:
                    assert r.status == 200
                    if rnd == 0:
                        assert "Set-Cookie" not in r.headers  # the header is the cohort key
                    per_user.setdefault(f"user-{u}", set()).add(r.headers["X-Graygate-Version"])
    assert all(len(v) == 1 for v in per_user.values()), per_user
    assert set().union(*per_user.values()) == {"blue", "green"}


async def test_weighted_split_is_per_request_on_one_keep_alive_connection(
    upstreams, gateway, raw_clients
):
    blue = await upstreams("blue")
    green = await upstreams("green")
    route = route_config(blue.url, green.url, weights={"blue": 50, "green": 50})
    gw = await gateway([route], timeouts=FAST)
    c = await raw_clients(gw.port)
    counts = {"blue": 0, "green": 0}
    for i in range(400):
        resp = await c.request(get(f"/n{i}"))
        assert resp.status == 200
        counts[resp.get("x-graygate-version") or "?"] += 1
    # Binomial(400, 0.5): sd 10; +-60 is six standard deviations.
    assert 140 <= counts["green"] <= 260, counts
    assert counts["blue"] + counts["green"] == 400
    assert len(blue.requests) == counts["blue"] and len(green.requests) == counts["green"]


async def test_no_matching_route_is_404_with_error_header(upstreams, gateway, raw_clients):
    blue = await upstreams("blue")
    route = route_config(blue.url, match={"host": "shop.example", "path_prefix": "/"})
    gw = await gateway([route], timeouts=FAST)
    c = await raw_clients(gw.port)
    ok = await c.request(get("/", host="shop.example"))
    assert ok.status == 200
    miss = await c.request(get("/", host="other.example"))
    assert miss.status == 404
    assert miss.get("x-graygate-error")
    assert len(blue.requests) == 1


async def test_host_wildcard_and_first_match_in_config_order(upstreams, gateway, raw_clients):
    a = await upstreams("a")
    b = await upstreams("b")
    d = await upstreams("d")
    routes = [
        {
            **route_config(a.url),
            "name": "wild",
            "match": {"host": "*.example.com", "path_prefix": "/api"},
        },
        {**route_config(b.url), "name": "v2", "match": {"host": "*", "path_prefix": "/api/v2"}},
        {**route_config(d.url), "name": "rest", "match": {"host": "*", "path_prefix": "/"}},
    ]
    gw = await gateway(routes, timeouts=FAST)
    c = await raw_clients(gw.port)
    cases = [
        ("shop.example.com", "/api/v2/items", "a"),  # more specific route later: first wins
        ("deep.shop.example.com:8080", "/api/x", "a"),
        ("SHOP.Example.COM", "/api", "a"),
        ("example.com", "/api/v2/items", "b"),  # the wildcard does not match the bare domain
        ("other.org", "/api/v2/items", "b"),
        ("other.org", "/api/v1", "d"),
        ("shop.example.com", "/web", "d"),
    ]
    for host, path, expected in cases:
        resp = await c.request(get(path, host=host))
        assert resp.status == 200, (host, path)
        assert resp.get("x-upstream") == expected, (host, path, resp.get("x-upstream"))


# -- upstream connection pool limit --------------------------------------------------------------


async def test_pool_limit_caps_upstream_connections(raw_upstreams, gateway):
    async def slow(up: RawUpstream, reader, writer) -> None:
        while (req := await read_request(reader)) is not None:
            up.inflight += 1
            up.inflight_max = max(up.inflight_max, up.inflight)
            await asyncio.sleep(0.2)
            up.inflight -= 1
            writer.write(reply(req[0].split(b" ")[1]))
            await writer.drain()

    up = await raw_upstreams(slow)
    gw = await gateway(
        [route_config(up.url)], timeouts=FAST, limits={"max_connections_per_endpoint": 2}
    )
    conn = aiohttp.TCPConnector(limit=20)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def one(i: int) -> tuple[int, bytes]:
            async with s.get(f"{gw.url}/s{i}") as r:
                return r.status, await r.read()

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(10))), 10)
    assert results == [(200, f"/s{i}".encode()) for i in range(10)]
    assert up.open_max <= 2, f"upstream saw {up.open_max} concurrent connections"
    assert up.inflight_max == 2  # the two slots were really used in parallel
