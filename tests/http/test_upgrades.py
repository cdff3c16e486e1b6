"""Only allow-listed upgrades tunnel (`upgrades: [websocket]` by default). Any other
Upgrade (h2c above all: h2c smuggling) goes upstream as a plain HTTP/1.1 request without
Upgrade, HTTP2-Settings or the Connection tokens naming them, and the client connection
stays HTTP/1.1; a 101 to such a request, or a 101 naming a protocol the client did not
ask for, is a 502. A real WebSocket upgrade still tunnels."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.helpers import metric_value, read_response, route_config, split_head

FAST = {"connect": "500ms", "read": "1s", "request": "3s"}
SETTINGS = "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"
WS_KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
H2C = {
    "h2c-with-settings": ("Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings", SETTINGS),
    "h2c-alone": ("Upgrade: h2c", "Connection: upgrade"),
    "h2c-beside-websocket": (
        "Upgrade: websocket, h2c",
        "Connection: keep-alive, Upgrade, HTTP2-Settings",
        SETTINGS,
        "Sec-WebSocket-Version: 13",
        WS_KEY,
    ),
    "h2c-in-second-upgrade-line": (
        "Upgrade: websocket",
        "Upgrade: h2c",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        WS_KEY,
    ),
    "mixed-case-h2c": ("upgrade: H2C", "connection: UPGRADE, http2-settings", SETTINGS),
}
SWITCH_H2C = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
SWITCH_WS = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def request(target: str, *fields: str, body: bytes = b"") -> bytes:
    lines = "".join(f"{f}\r\n" for f in ("Host: shop", *fields))
    return (
        f"POST {target} HTTP/1.1\r\n{lines}\r\n".encode() + body
        if body
        else (f"GET {target} HTTP/1.1\r\n{lines}\r\n".encode())
    )


def fields_of(head: bytes) -> list[tuple[bytes, bytes]]:
    """The head's fields, values lowercased too."""
    return [(name, value.lower()) for name, value in split_head(head)[1]]


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    fields = dict(fields_of(head))
    if b"content-length" in fields:
        return await reader.readexactly(int(fields[b"content-length"]))
    if fields.get(b"transfer-encoding") == b"chunked":
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        return b"".join(parts)
    return b""


def recording(answer_101: bytes | None = None):
    """A script that answers each request with 200 and what it received (or with
    `answer_101`, then echoes whatever follows, as a tunnel would)."""

    async def script(up, reader, writer) -> None:
        while (head := await up.read_head(reader)) is not None:
            body = await read_body(reader, head)
            up.bodies.append(body)
            if answer_101 is not None:
                writer.write(answer_101)
                await writer.drain()
                while data := await reader.read(65536):
                    writer.write(b"tunnel:" + data)
                    await writer.drain()
                return
            text = b"got %d" % len(body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(text) + text)
            await writer.drain()

    return script


async def start(scripted_upstream, gateway, answer_101: bytes | None = None, **top):
    up = await scripted_upstream(recording(answer_101))
    up.bodies = []
    gw = await gateway([route_config(up.url)], timeouts=FAST, **top)
    return up, gw


@contextlib.asynccontextmanager
async def connect(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(5):
            yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def assert_plain(head: bytes) -> None:
    fields = fields_of(head)
    names = {n for n, _ in fields}
    assert b"upgrade" not in names, head
    assert b"http2-settings" not in names, head
    assert all(b"upgrade" not in v and b"http2-settings" not in v for n, v in fields), head


@pytest.mark.parametrize("fields", H2C.values(), ids=H2C.keys())
async def test_other_upgrade_goes_upstream_as_a_plain_request(
    scripted_upstream, gateway, fields: tuple[str, ...]
) -> None:
    up, gw = await start(scripted_upstream, gateway)
    async with connect(gw.port) as (reader, writer):
        writer.write(request("/one", *fields))
        status, _, headers, body = await read_response(reader)
        assert (status, body) == (200, b"got 0")
        assert b"upgrade" not in headers
        # The client connection is still HTTP/1.1: the next request is parsed and answered.
        writer.write(request("/two"))
        assert (await read_response(reader))[::3] == (200, b"got 0")
    assert len(up.heads) == 2
    assert up.heads[0].startswith(b"GET /one HTTP/1.1\r\n")
    assert_plain(up.heads[0])
    assert up.connections == 1  # an ordinary exchange: the upstream connection was pooled


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_other_upgrade_with_a_body_keeps_the_body_and_the_stream_in_sync(
    scripted_upstream, gateway, framing: str
) -> None:
    """curl --http2 on an http:// URL asks for h2c on a POST: its body is the request's,
    and bytes after it are the next request, never the start of another protocol."""
    up, gw = await start(scripted_upstream, gateway)
    body = b"x" * 3000
    if framing == "chunked":
        payload = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        frame = "Transfer-Encoding: chunked"
    else:
        payload = body
        frame = f"Content-Length: {len(body)}"
    h2c = ("Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings", SETTINGS, frame)
    async with connect(gw.port) as (reader, writer):
        # The body and a pipelined request in the same write as the head.
        writer.write(request("/upload", *h2c, body=payload) + request("/after"))
        assert (await read_response(reader))[::3] == (200, b"got 3000")
        assert (await read_response(reader))[::3] == (200, b"got 0")
    assert up.bodies == [body, b""]
    assert up.heads[0].startswith(b"POST /upload HTTP/1.1\r\n")
    assert_plain(up.heads[0])
    assert up.heads[1].startswith(b"GET /after HTTP/1.1\r\n")


async def test_other_upgrade_with_an_invalid_transfer_coding_is_refused(
    scripted_upstream, gateway
) -> None:
    """The framing of an h2c request is checked as any request's: no smuggling through it."""
    up, gw = await start(scripted_upstream, gateway)
    async with connect(gw.port) as (reader, writer):
        writer.write(
            request("/x", "Upgrade: h2c", "Connection: Upgrade", "Transfer-Encoding: gzip")
            + b"GET /smuggled HTTP/1.1\r\nHost: shop\r\n\r\n"
        )
        status, _, headers, _ = await read_response(reader)
        assert (status, headers.get(b"x-graygate-error")) == (400, b"bad_request")
        assert await reader.read() == b""
    assert up.heads == []


async def test_101_to_a_request_that_asked_for_another_upgrade_is_a_502(
    scripted_upstream, gateway
) -> None:
    up, gw = await start(scripted_upstream, gateway, SWITCH_H2C)
    async with connect(gw.port) as (reader, writer):
        writer.write(request("/", *H2C["h2c-with-settings"]))
        status, _, headers, _ = await read_response(reader)
        assert (status, headers.get(b"x-graygate-error")) == (502, b"protocol")
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # an HTTP/2 preface: never relayed
        assert b"tunnel:" not in await reader.read()
    assert_plain(up.heads[0])
    await up.wait_closed_by_proxy(0)
    assert await metric_value(gw, "graygate_upstream_errors_total", kind="protocol") == 1


WS = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13", WS_KEY)


@pytest.mark.parametrize(
    "answer",
    [
        SWITCH_H2C,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket, h2c\r\n"
        b"Connection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
    ],
    ids=["h2c", "websocket-and-h2c", "no-upgrade-field"],
)
async def test_101_naming_a_protocol_the_client_did_not_ask_for_is_a_502(
    scripted_upstream, gateway, answer: bytes
) -> None:
    _, gw = await start(scripted_upstream, gateway, answer)
    async with connect(gw.port) as (reader, writer):
        writer.write(request("/ws", *WS))
        status, _, headers, _ = await read_response(reader)
        assert (status, headers.get(b"x-graygate-error")) == (502, b"protocol")
        writer.write(b"hello")
        assert b"tunnel:" not in await reader.read()


async def test_websocket_upgrade_still_tunnels(scripted_upstream, gateway) -> None:
    up, gw = await start(scripted_upstream, gateway, SWITCH_WS)
    async with connect(gw.port) as (reader, writer):
        writer.write(request("/ws", *WS))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert (b"upgrade", b"websocket") in fields_of(head)
        writer.write(b"ping")
        assert await reader.readexactly(11) == b"tunnel:ping"
    fields = fields_of(up.heads[0])
    assert (b"upgrade", b"websocket") in fields
    assert (b"connection", b"upgrade") in fields


async def test_empty_allow_list_forwards_websocket_as_plain(scripted_upstream, gateway) -> None:
    up, gw = await start(scripted_upstream, gateway, upgrades=[])
    async with connect(gw.port) as (reader, writer):
        writer.write(request("/ws", *WS))
        assert (await read_response(reader))[::3] == (200, b"got 0")
    assert_plain(up.heads[0])
