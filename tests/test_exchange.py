"""Exchange-level behaviours not covered elsewhere: the access log, and relaying a
Content-Length body without the parser (extra bytes beyond it are never forwarded)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from conftest import free_port, raw_request, route_config


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


@pytest.mark.parametrize("together", [False, True], ids=["later-write", "same-write"])
async def test_bytes_beyond_content_length_are_not_forwarded(gateway, together: bool) -> None:
    """An upstream that sends more than its Content-Length: the client gets exactly the
    announced body, and the connection is not reused for the next request."""
    conns = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                # Later write: the passthrough path; same write: the parser path.
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
                if not together:
                    await writer.drain()
                    await asyncio.sleep(0.05)
                writer.write(b"56789JUNKJUNK")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        gw = await gateway([route_config(f"http://127.0.0.1:{port}")])
        for _ in range(3):
            out = await raw_request(
                gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), out
            assert body == b"0123456789"
        assert conns == 3  # a connection that overran its framing is never reused
    finally:
        server.close()
        await server.wait_closed()
