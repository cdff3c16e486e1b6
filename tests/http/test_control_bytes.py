"""No control bytes from upstreams reach a client (RFC 9110 5.5, RFC 9112 4): a status
line or a header field holding NUL, bare CR, bare LF or another control byte is refused
with 502 X-Graygate-Error: protocol, in every position (reason phrase, field value, field
name, and the same in an interim 1xx head). HTAB and obs-text pass byte for byte, where the
grammar allows them. llhttp refuses most of these itself; each position is pinned here."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.helpers import metric_value, read_response, route_config

FAST = {"connect": "500ms", "read": "1s", "request": "3s"}
CONTROL = {
    "nul": b"\x00",
    "soh": b"\x01",
    "bs": b"\x08",
    "vt": b"\x0b",
    "ff": b"\x0c",
    "bare-cr": b"\r",
    "bare-lf": b"\n",
    "esc": b"\x1b",
    "us": b"\x1f",
    "del": b"\x7f",
}
POSITIONS = {
    "reason-phrase": lambda c: b"HTTP/1.1 200 O" + c + b"K\r\nContent-Length: 2\r\n\r\nok",
    "field-value": lambda c: b"HTTP/1.1 200 OK\r\nX-A: a" + c + b"b\r\nContent-Length: 2\r\n\r\nok",
    "field-name": lambda c: b"HTTP/1.1 200 OK\r\nX-" + c + b"A: v\r\nContent-Length: 2\r\n\r\nok",
    "interim-reason": lambda c: (
        b"HTTP/1.1 103 Early" + c + b"Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    ),
    "interim-value": lambda c: (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a" + c + b">\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    ),
}


async def answering(scripted_upstream, answer: bytes):
    async def script(up, reader, writer) -> None:
        while await up.read_head(reader) is not None:
            writer.write(answer)
            await writer.drain()

    return await scripted_upstream(script)


async def exchange(port: int) -> list[tuple[int, bytes, dict[bytes, bytes], bytes]]:
    """One GET; every head the client receives (interim ones too), with its body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
        heads = []
        async with asyncio.timeout(5):
            while True:
                heads.append(await read_response(reader))
                if heads[-1][0] >= 200:
                    return heads
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("control", CONTROL.values(), ids=CONTROL.keys())
@pytest.mark.parametrize("position", POSITIONS.keys())
async def test_control_byte_from_upstream_is_a_502(
    scripted_upstream, gateway, position: str, control: bytes
) -> None:
    up = await answering(scripted_upstream, POSITIONS[position](control))
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    *interim, (status, line, headers, body) = await exchange(gw.port)
    assert (status, headers.get(b"x-graygate-error")) == (502, b"protocol"), (line, headers)
    assert b"Bad Gateway" in line
    assert body.startswith(b"502 Bad Gateway: ")
    for _, iline, iheaders, _ in interim:  # an interim head relayed before the bad one
        assert iline == b"HTTP/1.1 103 Early Hints" and iheaders == {b"link": b"</a>"}
    await up.wait_closed_by_proxy(1)  # never pooled
    errors = await metric_value(
        gw, "graygate_upstream_errors_total", route="shop", version="blue", kind="protocol"
    )
    assert errors == 1


@pytest.mark.parametrize(
    ("answer", "line", "field"),
    [
        pytest.param(
            b"HTTP/1.1 200 O\tK\r\nX-A: a\tb\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 O\tK",
            b"a\tb",
            id="htab",
        ),
        pytest.param(
            b"HTTP/1.1 200 \xc3\xa9t\xe9\r\nX-A: caf\xc3\xa9 \xff\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 \xc3\xa9t\xe9",
            b"caf\xc3\xa9 \xff",
            id="obs-text",
        ),
    ],
)
async def test_htab_and_obs_text_pass_byte_for_byte(
    scripted_upstream, gateway, answer: bytes, line: bytes, field: bytes
) -> None:
    up = await answering(scripted_upstream, answer)
    gw = await gateway([route_config(up.url)], timeouts=FAST)
    [(status, got_line, headers, body)] = await exchange(gw.port)
    assert (status, got_line, headers[b"x-a"], body) == (200, line, field, b"ok")
