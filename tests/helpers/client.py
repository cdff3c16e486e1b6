"""Raw HTTP/1.1 on a client socket: send bytes, read what comes back, read one response
with exact framing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass


async def raw_request(port: int, data: bytes, timeout: float = 5.0, read_all: bool = True) -> bytes:
    """Send raw bytes, return everything the server answers until it closes (or timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_all:
                break
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def raw_exchange(port: int, data: bytes, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send raw bytes; return (everything answered, closed by the server within timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks: list[bytes] = []
    closed = False
    try:
        writer.write(data)
        await writer.drain()
        # Read inline (asyncio.timeout, no task in between): an answer followed by a reset
        # is read before the reset replaces it.
        try:
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
            closed = True
        except TimeoutError:
            closed = False  # the server kept the connection open past `timeout`
        except ConnectionResetError:
            closed = True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return b"".join(chunks), closed


async def read_framed_body(
    reader: asyncio.StreamReader,
    method: str,
    status: int,
    transfer_encoding: str | bytes | None,
    content_length: str | bytes | None,
) -> bytes:
    """The body of one response, read with exact HTTP/1.1 framing (RFC 9112 6.3), so the
    next response on the connection starts where it should."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    te = transfer_encoding.encode() if isinstance(transfer_encoding, str) else transfer_encoding
    if te is not None and b"chunked" in te.lower():
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16):
            parts.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n"
        while await reader.readuntil(b"\r\n") != b"\r\n":
            continue  # trailer fields, up to the empty line
        return b"".join(parts)
    if content_length is not None:
        return await reader.readexactly(int(content_length))
    return await reader.read()  # delimited by the close


def split_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A head (with or without its final empty line) as its first line and its fields:
    (lowercase name, value without surrounding SP/HTAB), in order, as received."""
    lines = head.removesuffix(b"\r\n\r\n").split(b"\r\n")
    fields = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            fields.append((name.lower(), value.strip(b" \t")))
    return lines[0], fields


async def read_response(
    reader: asyncio.StreamReader, method: str = "GET"
) -> tuple[int, bytes, dict[bytes, bytes], bytes]:
    """One response off a raw connection: (status, status line, headers with lowercase
    names, last value wins, body read with exact framing)."""
    line, fields = split_head(await reader.readuntil(b"\r\n\r\n"))
    headers = dict(fields)
    status = int(line.split(b" ")[1])
    body = await read_framed_body(
        reader, method, status, headers.get(b"transfer-encoding"), headers.get(b"content-length")
    )
    return status, line, headers, body


def status_of(data: bytes) -> int | None:
    """The status code of the answer that `data` starts with; None when it starts with
    anything but an HTTP/1.x status line (nothing at all included)."""
    if not data.startswith(b"HTTP/1."):
        return None
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


@dataclass
class Resp:
    """One response read by RawClient; header names lowercase, values latin-1 text."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    version: bytes = b"HTTP/1.1"
    head: bytes = b""

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def names(self) -> set[str]:
        return {n for n, _ in self.headers}


class RawClient:
    """One raw client connection; reads responses with exact HTTP/1.1 framing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_head(
        self, timeout: float = 5.0
    ) -> tuple[int, bytes, list[tuple[str, str]], bytes]:
        """(status, version, headers, the head's bytes) of the next response."""
        # asyncio.timeout, not wait_for: no task in between, so the answer is read in the
        # loop iteration it arrives in, before a reset right behind it can replace it.
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
        line, fields = split_head(head)
        version, status, *_ = line.split(b" ", 2)
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in fields]
        return int(status), version, headers, head

    async def response(self, method: str = "GET", timeout: float = 5.0) -> Resp:
        async with asyncio.timeout(timeout):
            status, version, headers, head = await self.read_head(timeout)
            resp = Resp(status, headers, b"", version, head)
            resp.body = await read_framed_body(
                self.reader,
                method,
                status,
                resp.get("transfer-encoding"),
                resp.get("content-length"),
            )
        return resp

    async def request(self, data: bytes, method: str = "GET") -> Resp:
        await self.send(data)
        return await self.response(method)

    async def at_eof(self, timeout: float = 2.0) -> bool:
        """True when the server closed the connection (and sent nothing more) within timeout."""
        try:
            extra = await asyncio.wait_for(self.reader.read(1), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return extra == b""

    async def closed_within(self, timeout: float) -> bool:
        """True when the server closes (EOF or reset) within timeout; any byte before the
        close fails the test."""
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        assert data == b"", f"unexpected bytes before the close: {data[:200]!r}"
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):  # a reset, or a peer that is gone (kill -9)
            await self.writer.wait_closed()
