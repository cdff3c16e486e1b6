"""The supervisor <-> worker channel of `workers: N`: plain dataclass messages, pickled in
length-prefixed frames over one socketpair per worker, read by an asyncio Protocol on each
side. Both ends are graygate processes of one installation, so pickle is trusted here; a
frame never carries a request, only policy, acknowledgements and batched figures.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from proxy.core.config.model import Config
from proxy.core.figures import MirrorDelta, VersionDelta
from proxy.core.state import RouteState

logger = logging.getLogger(__name__)

HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # far above any policy or batch; a larger one is a bug
EndpointRow = tuple[str, str, str, bool]  # (route, version, endpoint url, available)


# -- supervisor -> worker -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    """The first message: everything a worker needs to open its listener."""

    config: Config
    states: dict[str, RouteState]
    seq: int  # the policy generation these states belong to
    port: int  # the concrete port (the config's may be 0)
    flush_interval: float


@dataclass(frozen=True, slots=True)
class Policy:
    """Every route's state at generation `seq`; `config` is set when a reload changed it."""

    seq: int
    states: dict[str, RouteState]
    config: Config | None = None


@dataclass(frozen=True, slots=True)
class Serve:
    """Start accepting: sent after Ready, so every Policy sent before it is applied first."""


@dataclass(frozen=True, slots=True)
class Drain:
    grace: float


# -- worker -> supervisor -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready:
    pid: int
    seq: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The worker cannot start (e.g. the port is taken); it exits after sending this."""

    message: str


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    error: str | None = None  # the policy could not be applied: restart me


@dataclass(frozen=True, slots=True)
class Figures:
    versions: list[VersionDelta]
    endpoints: list[EndpointRow] | None  # None: unchanged since the previous batch
    final: bool = False  # the last batch before a drained worker exits
    mirrors: list[MirrorDelta] | None = None  # shadow copies counted since the last batch


Message = Hello | Policy | Serve | Drain | Ready | Failed | Ack | Figures


def frame(message: Message) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class ChannelError(Exception):
    """The peer sent something that is not a frame of ours."""


class Channel(asyncio.Protocol):
    """One end of the channel. `on_message` runs for each whole frame in arrival order;
    `on_lost` once, when the peer is gone (EOF, reset or a broken frame)."""

    def __init__(self, on_message: Callable[[Message], None], on_lost: Callable[[], None]) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        start = 0
        try:
            while not self.closed and len(buf) - start >= HEADER.size:
                (size,) = HEADER.unpack_from(buf, start)
                if size > MAX_FRAME:
                    raise ChannelError(f"frame of {size} bytes")
                end = start + HEADER.size + size
                if len(buf) < end:
                    break
                message = pickle.loads(buf[start + HEADER.size : end])
                start = end
                self.on_message(message)
        except (ChannelError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
            logger.error("channel: unreadable frame (%s); closing it", exc)
            buf.clear()
            self.close()
            return
        del buf[:start]

    def eof_received(self) -> bool | None:
        return False  # closes the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        self.on_lost()

    def send(self, message: Message) -> None:
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.write(frame(message))

    def close(self) -> None:
        """Close after what was written is flushed; `lost` resolves once it is."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
