"""Slow and paused readers against graygate's own flow control: while graygate has stopped
reading the upstream because the client's write buffer is full, the upstream read timeout
does not run; a client that goes away frees the upstream at once; a client that stops
reading for good is cut by timeouts.client_write, never by timeouts.read. The memory bound
under back-pressure is measured on the real process in test_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time

from tests.helpers import read_response, route_config

MIB = 1024 * 1024


def streaming(body: bytes, state: dict[str, int]):
    """A script answering every request with `body` (Content-Length), written in 256 KiB
    pieces with drain, so graygate's back-pressure reaches it; counts what it wrote."""

    async def script(up, reader, writer) -> None:
        while await up.read_head(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for at in range(0, len(body), 256 * 1024):
                writer.write(body[at : at + 256 * 1024])
                await writer.drain()
                state["written"] = at + 256 * 1024
            state["done"] = 1

    return script


async def test_16_mib_answer_with_a_6s_pause_mid_body_arrives_whole(
    scripted_upstream, gateway
) -> None:
    body = random.Random(16).randbytes(16 * MIB)
    state = {"written": 0, "done": 0}
    up = await scripted_upstream(streaming(body, state))
    # timeouts.read is a sixth of the pause: graygate's own pause must not count.
    gw = await gateway(
        [route_config(up.url)], timeouts={"connect": "500ms", "read": "1s", "request": "3s"}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /big HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(30):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"content-length: %d\r\n" % len(body) in head.lower()
            got = bytearray(await reader.readexactly(4 * MIB))
            peak = 0
            for _ in range(60):  # the client stops reading for 6 s; graygate must wait
                peak = max(peak, client_buffer(gw))
                await asyncio.sleep(0.1)
            assert peak < MIB, f"graygate buffered {peak} bytes for a paused client"
            # Whether the upstream itself stalls here depends on the kernel: loopback socket
            # buffers autotune to several MiB each and can hold the 12 MiB left. The
            # back-pressure reaching the upstream is pinned with 64 MiB in test_e2e.py
            # (slow reader) and in test_back_pressure_carries_over_to_the_next_answer.
            got += await reader.read()  # the rest, up to graygate's close
        assert len(got) == len(body)
        assert got == body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_client_that_goes_away_frees_the_upstream_at_once(scripted_upstream, gateway) -> None:
    body = random.Random(32).randbytes(32 * MIB)
    state = {"written": 0, "done": 0}
    up = await scripted_upstream(streaming(body, state))
    # A long read timeout: only the client's departure can free the upstream in time.
    gw = await gateway([route_config(up.url)], timeouts={"read": "30s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: shop\r\n\r\n")
    async with asyncio.timeout(10):
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(MIB)
        await asyncio.sleep(0.5)  # graygate has paused the upstream by now
    assert len(up.tasks) == 1
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    left = time.monotonic()
    while up.tasks and time.monotonic() - left < 1.0:
        await asyncio.sleep(0.02)
    assert not up.tasks, "graygate kept the upstream connection after its client left"
    assert not state["done"]


async def test_client_that_never_reads_is_cut_by_client_write_not_read(
    scripted_upstream, gateway
) -> None:
    body = random.Random(64).randbytes(64 * MIB)
    state = {"written": 0, "done": 0}
    up = await scripted_upstream(streaming(body, state))
    gw = await gateway(
        [route_config(up.url)],
        timeouts={"connect": "500ms", "read": "500ms", "request": "3s", "client_write": "2s"},
    )
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", gw.port))
        await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: shop\r\n\r\n")
        started = time.monotonic()
        await asyncio.sleep(1.5)  # three read timeouts: the upstream must still be there
        assert len(up.tasks) == 1, "cut by the upstream read timeout while graygate paused"
        while up.tasks and time.monotonic() - started < 4.0:
            await asyncio.sleep(0.05)
        cut_after = time.monotonic() - started
        assert not up.tasks, "a client that never reads was never cut"
        assert 1.9 <= cut_after < 3.0, f"cut after {cut_after:.1f}s, client_write is 2s"
        assert not state["done"]
        # The client sees a cut (reset or truncated), never a complete answer.
        received = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 2):
                received += len(chunk)
        assert received < len(body)
    finally:
        sock.close()


def client_buffer(gw) -> int:
    """Bytes graygate holds for its clients in user space (their transports' buffers)."""
    return sum(
        c.transport.get_write_buffer_size()
        for c in gw.app.gateway.connections
        if c.transport is not None
    )


async def test_back_pressure_carries_over_to_the_next_answer(scripted_upstream, gateway) -> None:
    """An answer that ends while the client's buffer is full: the next exchange on that
    connection starts paused too, instead of pouring its answer into graygate's memory."""
    # Twice what a kernel send buffer holds, and a length whose last read is large enough
    # to fill the client buffer again: the first answer ends with graygate paused.
    body = random.Random(8).randbytes(8 * MIB + 200 * 1024)
    state = {"written": 0, "done": 0}
    up = await scripted_upstream(streaming(body, state))
    gw = await gateway(
        [route_config(up.url)], timeouts={"connect": "500ms", "read": "500ms", "request": "3s"}
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(("127.0.0.1", gw.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=65536)
    try:
        writer.write(b"GET /1 HTTP/1.1\r\nHost: shop\r\n\r\n" * 2)
        async with asyncio.timeout(30):
            await reader.readuntil(b"\r\n\r\n")
            first = bytearray()
            while len(first) < len(body):  # a slow reader: graygate stays mostly paused
                first += await reader.read(min(65536, len(body) - len(first)))
                await asyncio.sleep(0.002)
            assert first == body
            peak = 0
            for _ in range(30):  # 1.5 s without reading: three read timeouts
                peak = max(peak, client_buffer(gw))
                await asyncio.sleep(0.05)
            assert peak < MIB, f"graygate buffered {peak} bytes for a client that reads nothing"
            status, _, _, second = await read_response(reader)
            assert status == 200
            assert second == body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_answers_to_clients_reading_at_different_paces_arrive_whole(
    scripted_upstream, gateway
) -> None:
    """Upstream reads share one buffer and bodies leave as views of it: a view one client's
    transport keeps queued must never see the bytes of a later read, for that answer or
    another connection's."""
    bodies = [random.Random(seed).randbytes(4 * MIB) for seed in (1, 2, 3)]

    async def script(up, reader, writer) -> None:
        while (head := await up.read_head(reader)) is not None:
            body = bodies[int(head.split(b" ")[1][1:])]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for at in range(0, len(body), 256 * 1024):
                writer.write(body[at : at + 256 * 1024])
                await writer.drain()

    up = await scripted_upstream(script)
    gw = await gateway([route_config(up.url)], timeouts={"read": "10s"})

    async def fetch(i: int, pause: float) -> bytes:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # graygate's writes stall
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(b"GET /%d HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n" % i)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            got = bytearray()
            while chunk := await reader.read(16 * 1024):
                got += chunk
                if pause:
                    await asyncio.sleep(pause)
            return bytes(got)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async with asyncio.timeout(60):
        got = await asyncio.gather(fetch(0, 0.0), fetch(1, 0.002), fetch(2, 0.01))
    for i, body in enumerate(bodies):
        assert len(got[i]) == len(body), f"answer {i}: {len(got[i])} of {len(body)} bytes"
        assert got[i] == body, f"answer {i} arrived with other bytes"
