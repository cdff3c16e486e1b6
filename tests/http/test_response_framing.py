"""Upstream bytes beyond a response's framing never reach the client (RFC 9112 6.3):
after a Content-Length body, a body on a HEAD answer or on a 204/304, bytes after the last
chunk. Each case is delivered three ways, so every path that writes upstream bytes to the
client is crossed: one small read (the parser), one read above 16 KiB (the head-split
path), and the extra bytes in a later read (the zero-copy passthrough, or the parser across
reads). The client gets exactly the framed answer, the next answer on its connection is
the real one, the upstream connection is closed, and the overrun counts as a protocol error.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.helpers import metric_value, read_response, route_config

FAST = {"connect": "500ms", "read": "2s", "request": "3s"}
# A complete second response: relayed, the client would read it as its next answer.
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Smuggled: yes\r\n\r\nevil"
NEXT = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"
BIG = bytes(range(256)) * 80  # 20,480 bytes: head + body is one read above 16 KiB

# case -> (method, status, expected body, delivery -> (first write, later write))
CASES = {
    "content-length": (
        "GET",
        200,
        {
            "one-read": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + SMUGGLED, b""),
            "large-read": (
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG + SMUGGLED,
                b"",
            ),
            "later-read": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo" + SMUGGLED),
        },
    ),
    "head-with-body": (
        "HEAD",
        200,
        {
            "one-read": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + SMUGGLED, b""),
            "large-read": (
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG + SMUGGLED,
                b"",
            ),
        },
    ),
    "204-with-body": (
        "GET",
        204,
        {
            "one-read": (b"HTTP/1.1 204 No Content\r\n\r\n" + SMUGGLED, b""),
            "large-read": (b"HTTP/1.1 204 No Content\r\n\r\n" + BIG + SMUGGLED, b""),
        },
    ),
    "304-with-body": (
        "GET",
        304,
        {
            "one-read": (b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n" + SMUGGLED, b""),
            "large-read": (b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n" + BIG + SMUGGLED, b""),
        },
    ),
    "after-last-chunk": (
        "GET",
        200,
        {
            "one-read": (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                + SMUGGLED,
                b"",
            ),
            "large-read": (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(BIG)
                + BIG
                + b"\r\n0\r\n\r\n"
                + SMUGGLED,
                b"",
            ),
            "later-read": (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                b"0\r\n\r\n" + SMUGGLED,
            ),
        },
    ),
}
PARAMS = [
    pytest.param(case, delivery, id=f"{case}-{delivery}")
    for case, (_, _, deliveries) in CASES.items()
    for delivery in deliveries
]


def expected_body(case: str, delivery: str) -> bytes:
    method, status, _ = CASES[case]
    if method == "HEAD" or status in (204, 304):
        return b""
    return BIG if delivery == "large-read" else b"hello"


async def overrunning(scripted_upstream, case: str, delivery: str):
    """An upstream answering /first with the overrun of `case`, anything else with NEXT."""
    first, later = CASES[case][2][delivery]

    async def script(up, reader, writer) -> None:
        while (head := await up.read_head(reader)) is not None:
            if b" /first " in head.split(b"\r\n", 1)[0]:
                writer.write(first)
                await writer.drain()
                if later:
                    await asyncio.sleep(0.1)
                    writer.write(later)
            else:
                writer.write(NEXT)
            await writer.drain()

    return await scripted_upstream(script)


async def check_first(reader, case: str, delivery: str) -> None:
    method, status, _ = CASES[case]
    got, _, headers, body = await read_response(reader, method)
    assert got == status
    assert b"x-smuggled" not in headers
    assert body == expected_body(case, delivery)


@pytest.mark.parametrize(("case", "delivery"), PARAMS)
async def test_bytes_beyond_the_framing_never_reach_the_client(
    scripted_upstream, gateway, case: str, delivery: str
) -> None:
    up = await overrunning(scripted_upstream, case, delivery)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    method = CASES[case][0]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        async with asyncio.timeout(5):
            writer.write(f"{method} /first HTTP/1.1\r\nHost: shop\r\n\r\n".encode())
            await check_first(reader, case, delivery)
            # The next answer on this client connection is the upstream's real one.
            writer.write(b"GET /second HTTP/1.1\r\nHost: shop\r\n\r\n")
            status, _, headers, body = await read_response(reader)
            assert (status, body) == (200, b"next")
            assert b"x-smuggled" not in headers
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    # The overrunning connection was closed, never pooled: /second came on a new one.
    await up.wait_closed_by_proxy(1)
    assert up.connections == 2
    errors = await metric_value(
        gw, "graygate_upstream_errors_total", route="shop", version="blue", kind="protocol"
    )
    assert errors == 1
    # The client's answer stood: it is recorded with the upstream's status, not as a 502.
    status = CASES[case][1]
    answered = 2 if status == 200 else 1  # /second is a 200 too
    assert await metric_value(gw, "graygate_requests_total", code=str(status)) == answered
    assert await metric_value(gw, "graygate_requests_total", code="502") == 0


@pytest.mark.parametrize(("case", "delivery"), PARAMS)
async def test_pipelined_request_gets_its_own_answer_not_the_overrun(
    scripted_upstream, gateway, case: str, delivery: str
) -> None:
    up = await overrunning(scripted_upstream, case, delivery)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    method = CASES[case][0]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        async with asyncio.timeout(5):
            writer.write(
                f"{method} /first HTTP/1.1\r\nHost: shop\r\n\r\n".encode()
                + b"GET /second HTTP/1.1\r\nHost: shop\r\n\r\n"
                + b"GET /third HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
            )
            await check_first(reader, case, delivery)
            for _ in ("second", "third"):
                status, _, headers, body = await read_response(reader)
                assert (status, body) == (200, b"next")
                assert b"x-smuggled" not in headers
            assert await reader.read() == b""  # nothing after the last framed answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await up.wait_closed_by_proxy(1)
    assert up.connections == 2
