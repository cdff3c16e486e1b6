"""A transport without a socket, for driving asyncio Protocols by hand (the client side
through data_received, an upstream connection, a BufferedProtocol, through deliver())."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


def deliver(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """What the event loop does with the bytes of reads for a BufferedProtocol: each read
    fills (part of) the buffer get_buffer() gives, then buffer_updated(n)."""
    while data:
        buf = protocol.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        protocol.buffer_updated(n)
        data = data[n:]


class FakeTransport:
    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 50000)) -> None:
        self.peer = peer
        self.data = bytearray()
        self.closing = False
        self.paused = False
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, parts: Iterable[bytes]) -> None:
        for p in parts:
            self.data += p

    def take(self) -> bytes:
        """What was written since the last take()."""
        out = bytes(self.data)
        self.data.clear()
        return out

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = self.closing = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
