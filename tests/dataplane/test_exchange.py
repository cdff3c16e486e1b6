"""Exchange-level behaviours not covered elsewhere: the access log, and relaying a
Content-Length body without the parser (extra bytes beyond it are never forwarded)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from tests.helpers import RawServer, raw_request, route_config


async def test_access_log_off_by_default_and_on_when_configured(
    upstreams, gateway, caplog: pytest.LogCaptureFixture
) -> None:
    blue = await upstreams("blue")
    quiet = await gateway([route_config(blue.url)])
    loud = await gateway([route_config(blue.url)], access_log=True)
    caplog.set_level(logging.INFO, logger="graygate.access")
    async with aiohttp.ClientSession() as s:
        async with s.get(quiet.url + "/quiet", headers={"Cookie": "secret=hunter2"}) as r:
            assert r.status == 200
        assert not [r for r in caplog.records if r.name == "graygate.access"]
        async with s.get(loud.url + "/loud?q=1", headers={"Cookie": "secret=hunter2"}) as r:
            assert r.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "graygate.access"]
    assert len(lines) == 1
    assert "GET /loud 200 route=shop version=blue reason=weight" in lines[0]
    assert "hunter2" not in lines[0]


@pytest.mark.parametrize(
    "trusted, sent, logged",
    [
        # An untrusted peer is logged as itself, whatever X-Forwarded-For it sends.
        ([], "203.0.113.7", "127.0.0.1"),
        # Behind a trusted proxy: the rightmost address that is not a trusted proxy.
        (["127.0.0.1/32", "10.0.0.0/8"], "198.51.100.1, 203.0.113.7, 10.1.1.1", "203.0.113.7"),
        (["127.0.0.1/32"], "not-an-address", "127.0.0.1"),
    ],
)
async def test_access_log_names_the_client_through_trusted_proxies(
    upstreams, gateway, caplog: pytest.LogCaptureFixture, trusted, sent, logged
) -> None:
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)], access_log=True, trusted_proxies=trusted)
    caplog.set_level(logging.INFO, logger="graygate.access")
    answer = await raw_request(
        gw.port,
        b"GET /who HTTP/1.1\r\nHost: shop\r\nX-Forwarded-For: %s\r\n"
        b"Connection: close\r\n\r\n" % sent.encode(),
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "graygate.access"]
    assert line.startswith(f"{logged} GET /who 200 "), line


@pytest.mark.parametrize("together", [False, True], ids=["later-write", "same-write"])
async def test_bytes_beyond_content_length_are_not_forwarded(gateway, together: bool) -> None:
    """An upstream that sends more than its Content-Length: the client gets exactly the
    announced body, and the connection is not reused for the next request."""
    conns = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        # Until graygate closes its side (that is what the test provokes): RawServer ends it.
        while True:
            await reader.readuntil(b"\r\n\r\n")
            # Later write: the passthrough path; same write: the parser path.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
            if not together:
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(b"56789JUNKJUNK")
            await writer.drain()

    server = await RawServer(handle).start()
    try:
        gw = await gateway([route_config(f"http://127.0.0.1:{server.port}")])
        for _ in range(3):
            out = await raw_request(
                gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), out
            assert body == b"0123456789"
        assert conns == 3  # a connection that overran its framing is never reused
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "framing", ["content-length", "content-length-junk", "chunked", "interim-then-length"]
)
async def test_large_answer_in_one_write_is_relayed_exactly(gateway, framing: str) -> None:
    """Head and a 100 KiB body in one upstream write: the head is parsed apart and the
    body relayed without the parser (or through it, when chunked); bytes are exact."""
    body = bytes(range(256)) * 400  # 102,400 bytes

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # graygate may close its side first (RawServer ends the handler then).
        await reader.readuntil(b"\r\n\r\n")
        if framing == "chunked":
            half = len(body) // 2
            payload = (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n" % half
                + body[:half]
                + b"\r\n"
                + b"%x\r\n" % (len(body) - half)
                + body[half:]
                + b"\r\n0\r\n\r\n"
            )
        else:
            payload = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            if framing == "interim-then-length":
                payload = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + payload
            if framing == "content-length-junk":
                payload += b"JUNK"
        writer.write(payload)
        await writer.drain()
        await asyncio.sleep(0.2)

    server = await RawServer(handle).start()
    try:
        gw = await gateway([route_config(f"http://127.0.0.1:{server.port}")])
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/big") as r:
            assert r.status == 200
            got = await r.read()
        assert got == body
    finally:
        await server.stop()


async def test_max_forwards_zero_is_answered_here_and_decremented_otherwise(
    upstreams, gateway
) -> None:
    """RFC 9110 7.6.2: OPTIONS/TRACE with Max-Forwards 0 never reach the upstream."""
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)])
    out = await raw_request(
        gw.port, b"OPTIONS /x HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 200"), out
    assert b"\r\nallow: " in out.lower()
    out = await raw_request(
        gw.port,
        b"TRACE /t HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\nCookie: s=hunter2\r\n"
        b"X-Probe: 1\r\nConnection: close\r\n\r\n",
    )
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"message/http" in head
    assert body.startswith(b"TRACE /t HTTP/1.1\r\n") and b"x-probe: 1" in body
    assert b"hunter2" not in body  # credentials are not echoed
    assert blue.requests == []
    out = await raw_request(
        gw.port, b"OPTIONS /y HTTP/1.1\r\nHost: a\r\nMax-Forwards: 3\r\nConnection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 200")
    assert len(blue.requests) == 1
    forwarded = dict((k.lower(), v) for k, v in blue.requests[0]["headers"])
    assert forwarded[b"max-forwards"] == b"2"


async def test_bad_body_in_the_same_read_never_reaches_a_pooled_upstream(
    upstreams, gateway
) -> None:
    """With an idle pooled connection ready, a request whose chunked body is malformed in
    the same read as its head is refused before anything is written upstream."""
    blue = await upstreams("blue")
    gw = await gateway([route_config(blue.url)])
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/warm") as r:
        assert r.status == 200  # leaves a keep-alive connection in the pool
    assert len(blue.requests) == 1
    out = await raw_request(
        gw.port,
        b"POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhi\r\n0\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 400"), out
    await asyncio.sleep(0.1)
    assert [r["path"] for r in blue.requests] == ["/warm"]
