"""The interfaces between the per-request objects, so that none imports another's
module: what an upstream attempt sees of the client connection (`Sink`; the exchange's
`Client` adds to it) and of its exchange (`Owner`), and the reasons reads pause.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from typing import Final, Protocol

from proxy.core.headers import Headers
from proxy.dataplane.upstream import EndpointPool, UpstreamError

# Reasons reading from the client is paused; reads resume once none is left.
PAUSE_PIPELINE: Final = 1  # MAX_PIPELINE requests wait for their turn
PAUSE_BUFFER: Final = 2  # a request body waits for the upstream connection to open
PAUSE_UPSTREAM: Final = 4  # the upstream's write buffer is full
PAUSE_UPGRADE: Final = 8  # bytes after an upgrade request wait for the upstream's 101


class Sink:
    """The client side as an attempt sees it; the base of downstream.DownstreamProtocol
    (through feed.ClientSide, exchange.Client and reader.Connection, each adding what its
    module needs). Base classes, not Protocols, as Owner is: compiled, their fields are
    read in place and their methods called through the vtable."""

    __slots__ = ("writing_paused",)
    writing_paused: bool  # the client's write buffer is full

    @abstractmethod
    def send(self, data: bytes | memoryview) -> None: ...
    @abstractmethod
    def send_all(self, parts: Iterable[bytes]) -> None: ...
    @abstractmethod
    def queued(self) -> int: ...  # bytes the transport holds (views of them included)
    @abstractmethod
    def pause_reading(self, reason: int) -> None: ...
    @abstractmethod
    def resume_reading(self, reason: int) -> None: ...
    @abstractmethod
    def abort(self) -> None: ...
    @abstractmethod
    def close(self) -> None: ...


class Tap(Protocol):
    """A mirrored copy as its exchange feeds it (mirror.Copy): the request body, the
    primary's answer as it streams, and the primary's end."""

    def request_body(self, data: bytes) -> None: ...
    def request_end(self) -> None: ...
    def primary_body(self, data: bytes | memoryview) -> None: ...
    def primary_end(self, complete: bool, status: int, headers: Headers) -> None: ...


class Owner:
    """The exchange as its attempt sees it: the request, and where the outcome goes.
    exchange.Exchange is the one (through feed.RequestFeed). A base class, not a
    Protocol: compiled, an attempt reads these fields in place and calls these methods
    through the vtable, where a Protocol costs a lookup by name each time."""

    __slots__ = (
        "body_done",
        "deadline",
        "early",
        "ended",
        "extra",
        "head",
        "head_sent",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "pending",
        "pending_bytes",
        "shadow",
        "upgrade",
    )
    method: bytes
    http11: bool
    upgrade: bool
    headers: Headers
    head: bytes  # the request head as forwarded
    pending: list[bytes]  # request body read before the connection existed
    pending_bytes: int
    extra: tuple[tuple[bytes, bytes], ...]  # added to the response head
    body_done: bool  # the whole request body has been read
    keep_alive: bool
    head_sent: bool  # the response head went to the client
    ended: bool
    deadline: float
    early: bytes  # bytes after an upgrade request, for the tunnel
    shadow: Tap | None  # the mirrored copy of this request (dataplane/mirror.py)

    @abstractmethod
    def attempt_done(self, status: int) -> None: ...
    @abstractmethod
    def attempt_failed(self, exc: UpstreamError, retry_safe: bool) -> None: ...
    @abstractmethod
    def connect_failed(self, ep: EndpointPool, exc: UpstreamError) -> None: ...
    @abstractmethod
    def tunnel_started(self) -> None: ...
    @abstractmethod
    def overrun(self) -> None: ...
    @abstractmethod
    def end(self, status: int) -> None: ...
