"""The interfaces between the per-request objects, so that none imports another's
module: what an upstream attempt sees of the client connection (`Sink`; the exchange's
`Client` adds to it) and of its exchange (`Owner`), and the reasons reads pause.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol

from proxy.core.headers import Headers
from proxy.dataplane.upstream import EndpointPool, UpstreamError

# Reasons reading from the client is paused; reads resume once none is left.
PAUSE_PIPELINE: Final = 1  # MAX_PIPELINE requests wait for their turn
PAUSE_BUFFER: Final = 2  # a request body waits for the upstream connection to open
PAUSE_UPSTREAM: Final = 4  # the upstream's write buffer is full
PAUSE_UPGRADE: Final = 8  # bytes after an upgrade request wait for the upstream's 101


class Sink(Protocol):
    """The client side as an attempt sees it."""

    writing_paused: bool  # the client's write buffer is full

    def send(self, data: bytes | memoryview) -> None: ...
    def send_all(self, parts: Iterable[bytes]) -> None: ...
    def queued(self) -> int: ...  # bytes the transport holds (views of them included)
    def pause_reading(self, reason: int) -> None: ...
    def resume_reading(self, reason: int) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


class Tap(Protocol):
    """A mirrored copy as its exchange feeds it (mirror.Copy): the request body, the
    primary's answer as it streams, and the primary's end."""

    def request_body(self, data: bytes) -> None: ...
    def request_end(self) -> None: ...
    def primary_body(self, data: bytes | memoryview) -> None: ...
    def primary_end(self, complete: bool, status: int, headers: Headers) -> None: ...


class Owner(Protocol):
    """The exchange as its attempt sees it: the request, and where the outcome goes."""

    method: bytes
    http11: bool
    upgrade: bool
    headers: Headers
    head: bytes  # the request head as forwarded
    pending: list[bytes]  # request body read before the connection existed
    pending_bytes: int
    extra: tuple[tuple[bytes, bytes], ...]  # added to the response head
    body_done: bool
    keep_alive: bool
    head_sent: bool
    ended: bool
    deadline: float
    early: bytes  # bytes after an upgrade request, for the tunnel
    shadow: Tap | None  # the mirrored copy of this request

    def attempt_done(self, status: int) -> None: ...
    def attempt_failed(self, exc: UpstreamError, retry_safe: bool) -> None: ...
    def connect_failed(self, ep: EndpointPool, exc: UpstreamError) -> None: ...
    def tunnel_started(self) -> None: ...
    def overrun(self) -> None: ...
    def end(self, status: int) -> None: ...
