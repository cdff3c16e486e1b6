"""Malformed and hostile client input on raw sockets: framing ambiguities, smuggling,
illegal header syntax, forward-proxy abuse, oversized heads and bodies, slow clients and
connection floods. Every probe must be refused (4xx, or a close without a 2xx), must never
reach the upstream, and must leave the proxy serving normal requests."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.helpers import raw_exchange, route_config, status_of

HOSTILE_TIMEOUTS = {
    "connect": "500ms",
    "read": "1s",
    "request": "3s",
    "client_header": "500ms",
    "client_body": "500ms",
    "keepalive": "500ms",
}
LIMITS = {"max_header_bytes": "16k", "max_body_bytes": 1024}


def assert_refused(data: bytes, closed: bool, status: int) -> None:
    """Answered with `status` and then closed: a status line was received (a silent close
    fails), never a 2xx, never a hang."""
    assert data, "closed without an answer" if closed else "no answer, the connection stayed open"
    assert status_of(data) == status, data[:300]
    assert closed, "answered, but the connection stayed open"


async def normal_request(gw, path: str = "/after") -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(gw.url + path, timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        assert r.status == 200
        body = await r.json()
        assert body["path"] == path


@pytest.fixture
async def target(upstreams, gateway):
    up = await upstreams("blue")
    gw = await gateway([route_config(up.url)], timeouts=HOSTILE_TIMEOUTS, limits=LIMITS)
    return up, gw


def head(*lines: str, method: str = "POST", target: str = "/", version: str = "HTTP/1.1") -> bytes:
    return (f"{method} {target} {version}\r\n" + "".join(f"{h}\r\n" for h in lines)).encode(
        "latin-1"
    ) + b"\r\n"


PROBES: dict[str, tuple[bytes, int]] = {
    # Framing ambiguity: the classic smuggling vectors.
    "cl_and_te": (head("Host: shop", "Content-Length: 5", "Transfer-Encoding: chunked")
                  + b"0\r\n\r\n", 400),
    "cl_te_smuggle": (head("Host: shop", "Content-Length: 6", "Transfer-Encoding: chunked")
                      + b"0\r\n\r\nG", 400),
    "te_cl_smuggle": (head("Host: shop", "Transfer-Encoding: chunked", "Content-Length: 3")
                      + b"8\r\nSMUGGLED\r\n0\r\n\r\n", 400),
    "two_content_lengths": (head("Host: shop", "Content-Length: 5", "Content-Length: 6")
                            + b"hello!", 400),
    "cl_plus": (head("Host: shop", "Content-Length: +5") + b"hello", 400),
    "cl_negative": (head("Host: shop", "Content-Length: -1") + b"hello", 400),
    "cl_two_numbers": (head("Host: shop", "Content-Length: 1 2") + b"hello", 400),
    "cl_underscore": (head("Host: shop", "Content-Length: 1_0") + b"helloworld", 400),
    "cl_list": (head("Host: shop", "Content-Length: 5, 5") + b"hello", 400),
    "te_chunked_gzip": (head("Host: shop", "Transfer-Encoding: chunked, gzip")
                        + b"5\r\nhello\r\n0\r\n\r\n", 400),
    # RFC 9112 6.1 suggests 501 for an unknown coding, but 6.3 (4) says a request whose final
    # coding is not chunked MUST get a 400 and a close: graygate answers 400.
    "te_xchunked": (head("Host: shop", "Transfer-Encoding: xchunked")
                    + b"5\r\nhello\r\n0\r\n\r\n", 400),
    "te_duplicated": (head("Host: shop", "Transfer-Encoding: chunked",
                           "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n", 400),
    "te_http10": (head("Host: shop", "Transfer-Encoding: chunked", version="HTTP/1.0")
                  + b"5\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_size_zz": (head("Host: shop", "Transfer-Encoding: chunked")
                      + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    "chunk_without_crlf": (head("Host: shop", "Transfer-Encoding: chunked")
                           + b"5\r\nhelloXX0\r\n\r\n", 400),
    # Header syntax (RFC 9112 5).
    "obs_fold": (head("Host: shop", "X-A: a", " folded", method="GET"), 400),
    "space_before_colon": (head("Host: shop", "X-A : b", method="GET"), 400),
    "te_space_before_colon": (head("Host: shop", "Transfer-Encoding : chunked")
                              + b"5\r\nhello\r\n0\r\n\r\n", 400),
    "bad_header_name": (head("Host: shop", "X(A): b", method="GET"), 400),
    "space_in_target": (head("Host: shop", method="GET", target="/a b"), 400),
    # As for xchunked: 501 (RFC 9112 6.1) or 400 (6.3 (4), final coding not chunked); 400.
    "te_identity": (head("Host: shop", "Transfer-Encoding: identity") + b"hello", 400),
    "nul_in_value": (head("Host: shop", "X-A: a\x00b", method="GET"), 400),
    "del_in_value": (head("Host: shop", "X-A: a\x7fb", method="GET"), 400),
    "bare_lf": (b"GET / HTTP/1.1\nHost: shop\n\n", 400),
    # A major version graygate does not speak: 505 (RFC 9110 15.6.6) for HTTP/2.0; HTTP/9.9
    # fails graygate's request-line parser first, so it is a 400 (both are allowed).
    "http_2_0": (head("Host: shop", method="GET", version="HTTP/2.0"), 505),
    "http_9_9": (head("Host: shop", method="GET", version="HTTP/9.9"), 400),
    "missing_host": (head("Accept: */*", method="GET"), 400),
    "two_hosts": (head("Host: shop", "Host: evil.example", method="GET"), 400),
    # Never an open forward proxy: any 4xx refuses; graygate answers 400 for a foreign
    # absolute-form target (RFC 9112 3.2.2) and 405 for CONNECT (RFC 9110 9.3.6, 15.5.6).
    "absolute_form_foreign": (head("Host: evil.example", method="GET",
                                   target="http://evil.example/"), 400),
    "absolute_form_foreign_local_host": (head("Host: 127.0.0.1", method="GET",
                                              target="http://evil.example/steal"), 400),
    "absolute_form_userinfo": (head("Host: 127.0.0.1", method="GET",
                                    target="http://127.0.0.1@evil.example/"), 400),
    "connect": (head("Host: evil.example:443", method="CONNECT", target="evil.example:443"),
                405),
    # Limits.
    "oversized_head": (head("Host: shop", "X-Big: " + "a" * (100 * 1024), method="GET"), 431),
    # 414 URI Too Long (RFC 9110 15.5.15) or 431 for the head (RFC 6585 5): graygate says 414.
    "oversized_request_line": (head("Host: shop", method="GET", target="/" + "a" * (100 * 1024)),
                               414),
    "oversized_body_cl": (head("Host: shop", "Content-Length: 5000") + b"x" * 5000, 413),
    "oversized_body_chunked": (head("Host: shop", "Transfer-Encoding: chunked")
                               + b"800\r\n" + b"x" * 0x800 + b"\r\n0\r\n\r\n", 413),
}  # fmt: skip


@pytest.mark.parametrize("probe", list(PROBES))
async def test_probe_is_refused_and_never_forwarded(target, probe):
    up, gw = target
    data, expected = PROBES[probe]
    t0 = time.monotonic()
    answer, closed = await raw_exchange(gw.port, data)
    assert time.monotonic() - t0 < 2.0, "the proxy sat on a malformed request"
    assert_refused(answer, closed, expected)
    await normal_request(gw)
    assert [r["path"] for r in up.requests] == ["/after"]


async def test_pipelined_request_after_empty_post_is_its_own_request(target):
    up, gw = target
    data = (
        head("Host: shop", "Content-Length: 0")
        + b"GET /smuggled HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
    )
    answer, closed = await raw_exchange(gw.port, data)
    assert closed
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer
    first, second = answer.split(b"HTTP/1.1 200 ")[1:]
    assert b'"path": "/"' in first and b'"method": "POST"' in first
    assert b'"path": "/smuggled"' in second
    assert [(r["method"], r["path"]) for r in up.requests] == [("POST", "/"), ("GET", "/smuggled")]


async def test_body_bytes_are_not_parsed_as_a_request(target):
    # The body of a well-framed POST contains something that looks like a request.
    up, gw = target
    inner = b"GET /smuggled HTTP/1.1\r\nHost: shop\r\n\r\n"
    data = head("Host: shop", f"Content-Length: {len(inner)}", "Connection: close") + inner
    answer, closed = await raw_exchange(gw.port, data)
    assert closed and answer.count(b"HTTP/1.1 200 ") == 1
    assert b'"len": %d' % len(inner) in answer
    assert [r["path"] for r in up.requests] == ["/"]


async def test_absolute_form_for_our_own_route_is_served(target):
    # The rejection above is about foreign hosts; a target naming us is fine (RFC 9112 3.2.2).
    up, gw = target
    data = head("Host: 127.0.0.1", "Connection: close", method="GET",
                target=f"http://127.0.0.1:{gw.port}/mine")  # fmt: skip
    answer, _ = await raw_exchange(gw.port, data)
    assert status_of(answer) == 200, answer[:300]
    assert [r["path"] for r in up.requests] == ["/mine"]


class Collector(asyncio.Protocol):
    """A client connection that keeps every byte it receives, up to a close or a reset."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


# -- slow clients ------------------------------------------------------------------------------


async def test_client_header_timeout(target):
    up, gw = target
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /slow HT")
        await writer.drain()
        t0 = time.monotonic()
        # Meanwhile the proxy serves others.
        await normal_request(gw)
        async with asyncio.timeout(3):
            answer = await reader.read()
        elapsed = time.monotonic() - t0
    finally:
        writer.close()
    assert 0.3 <= elapsed <= 1.2
    assert_refused(answer, True, 408)
    assert [r["path"] for r in up.requests] == ["/after"]


async def test_client_header_timeout_is_for_the_whole_head(target):
    # Dribbling one header byte at a time must not extend the deadline (slowloris).
    up, gw = target
    # A byte that arrives as graygate closes turns its close into a reset, and a stream
    # reader then raises instead of returning the 408 it already holds: a protocol keeps
    # every byte that came before the reset.
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(Collector, "127.0.0.1", gw.port)
    t0 = time.monotonic()
    try:
        transport.write(b"GET /slow HTTP/1.1\r\nHost: shop\r\nX-Drip: ")
        for _ in range(40):  # up to 2 s of dribbling
            await asyncio.sleep(0.05)
            if client.closed.done() or transport.is_closing():
                break
            transport.write(b"a")
        async with asyncio.timeout(3):
            await client.closed
    finally:
        transport.close()
    assert time.monotonic() - t0 <= 1.5
    answer = bytes(client.data)
    assert_refused(answer, True, 408)
    await normal_request(gw)
    assert [r["path"] for r in up.requests] == ["/after"]


async def test_client_body_timeout(target):
    up, gw = target
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(head("Host: shop", "Content-Length: 100", target="/upload") + b"x" * 10)
        await writer.drain()
        t0 = time.monotonic()
        async with asyncio.timeout(3):
            answer = await reader.read()
        elapsed = time.monotonic() - t0
    finally:
        writer.close()
    assert 0.3 <= elapsed <= 1.2
    assert_refused(answer, True, 408)
    await normal_request(gw)
    # The head may have been streamed on, but the upstream never got a complete request.
    assert all(r["path"] in ("/upload", "/after") for r in up.requests)


async def test_idle_keepalive_connection_is_closed(target):
    _, gw = target
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(head("Host: shop", method="GET", target="/ka"))
        await writer.drain()
        async with asyncio.timeout(3):
            first = await reader.readuntil(b"\r\n\r\n")
            assert status_of(first) == 200
            length = next(
                int(line.split(b":")[1])
                for line in first.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
        t0 = time.monotonic()
        async with asyncio.timeout(3):
            rest = await reader.read()
        elapsed = time.monotonic() - t0
    finally:
        writer.close()
    assert rest == b""  # closed silently: no 408 for a connection with nothing pending
    assert 0.3 <= elapsed <= 1.2


# -- floods ------------------------------------------------------------------------------------

# Each with graygate's answer: a 400 for what does not parse, a 408 for the silence.
GARBAGE = [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)), 400),  # TLS ClientHello
    (b"GARBAGE\r\n\r\n", 400),
    (b"\x00" * 512, 400),
    (b"GET / HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n", 400),
    (b"G", 408),  # and then silence: the header timeout has to reap it
]


async def test_garbage_flood_does_not_stop_the_proxy(target):
    up, gw = target

    async def one(i: int) -> bool:
        data, status = GARBAGE[i % len(GARBAGE)]
        answer, closed = await raw_exchange(gw.port, data, timeout=4.0)
        return closed and status_of(answer) == status  # a status line, not a silent close

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert all(results)
    assert time.monotonic() - t0 < 4.0
    await normal_request(gw)
    assert [r["path"] for r in up.requests] == ["/after"]
