"""One shadow request of a mirrored copy (a `Leg`) on the shadows' own pools, its answer
parsed by httptools, and the `Recorder` that captures an answer as it streams (status,
the compared headers, a blake2b digest, JSON up to a size). Never writes to a client,
never records stats, never logs (the failure is the evidence's detail).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Protocol

import httptools

from proxy.core.config.model import CompareConfig
from proxy.core.headers import Headers
from proxy.core.mirror import Capture
from proxy.dataplane.parsers import lenient
from proxy.dataplane.upstream import (
    EndpointPool,
    ReadBuffer,
    UpstreamConnection,
    UpstreamError,
    VersionPool,
)

NO_BODY_STATUS = frozenset({204, 304})


class Recorder:
    """Fills a core Capture from an answer's head and body bytes, as they pass."""

    __slots__ = ("capture", "hasher", "json_bytes", "json_parts", "max_json", "names")

    def __init__(self, rules: CompareConfig, names: frozenset[bytes]) -> None:
        self.capture = Capture()
        self.names = names
        self.hasher = hashlib.blake2b(digest_size=16) if rules.body != "none" else None
        self.json_parts: list[bytes] | None = [] if rules.body == "json" else None
        self.json_bytes = 0
        self.max_json = rules.max_json_bytes

    def head(self, status: int, headers: Headers) -> None:
        capture = self.capture
        capture.status = status
        found = capture.headers
        for name, value in headers:
            if name in self.names:
                key = name.decode("latin-1")
                text = value.decode("latin-1")
                found[key] = f"{found[key]}, {text}" if key in found else text

    def body(self, data: bytes | memoryview) -> None:
        if self.hasher is None:
            return
        self.hasher.update(data)
        parts = self.json_parts
        if parts is not None:
            self.json_bytes += len(data)
            if self.json_bytes > self.max_json:
                self.json_parts = None  # too large: compared by digest
            else:
                parts.append(bytes(data))

    def finish(self, complete: bool, error: str = "") -> None:
        capture = self.capture
        capture.complete = complete
        capture.error = error
        if self.hasher is not None:
            capture.digest = self.hasher.hexdigest()
        parts = self.json_parts
        if complete and parts is not None and parts:
            try:
                capture.json = json.loads(b"".join(parts))
                capture.json_ok = True
            except ValueError:
                pass  # not JSON after all: the digests decide
        self.json_parts = None


class LegOwner(Protocol):
    def leg_done(self) -> None: ...


class Leg:
    """One shadow request: a connection from the shadow pool, the head and buffered body
    written at once, the answer parsed into a Recorder; ends exactly once (leg_done)."""

    __slots__ = (
        "complete",
        "conn",
        "done",
        "ended_at",
        "keep_alive",
        "loop",
        "no_body",
        "owner",
        "parser",
        "rec",
        "resp_headers",
        "reusable",
        "started",
        "status",
        "task",
        "timer",
        "until_close",
    )

    def __init__(
        self,
        owner: LegOwner,
        loop: asyncio.AbstractEventLoop,
        rec: Recorder,
        head_only: bool,
        timeout: float,
    ) -> None:
        self.owner = owner
        self.loop = loop
        self.rec = rec
        self.no_body = head_only  # a HEAD: the answer ends at its head
        self.conn: UpstreamConnection | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.task: asyncio.Task[None] | None = None
        self.resp_headers: Headers = []
        self.status = 0
        self.complete = False
        self.keep_alive = False
        self.reusable = True
        self.until_close = False
        self.done = False
        self.started = loop.time()
        self.ended_at = self.started
        self.timer: asyncio.TimerHandle | None = loop.call_later(timeout, self.timed_out, timeout)

    def start(self, pool: VersionPool, connect_timeout: float, data: list[bytes]) -> None:
        ep = pool.pick(self.loop.time())
        if ep is None:
            self.finish(f"no available endpoint in shadow version {pool.version}")
            return
        conn = ep.take_idle()
        if conn is not None:
            self.send(conn, data)
        else:
            self.task = self.loop.create_task(self.connect(ep, connect_timeout, data))

    async def connect(self, ep: EndpointPool, connect_within: float, data: list[bytes]) -> None:
        try:
            conn, _ = await ep.acquire(connect_within)
        except UpstreamError as exc:
            self.task = None
            self.finish(exc.detail)
            return
        self.task = None
        if self.done:
            ep.release(conn, True)
            return
        self.send(conn, data)

    def send(self, conn: UpstreamConnection, data: list[bytes]) -> None:
        self.conn = conn
        conn.user = self
        self.parser = parser = httptools.HttpResponseParser(self)
        lenient(parser)
        assert conn.transport is not None
        conn.transport.writelines(data)

    def timed_out(self, timeout: float) -> None:
        self.timer = None
        self.finish(f"no shadow answer within {timeout:g}s")

    # -- ConnectionUser ------------------------------------------------------------------
    def upstream_view(self, read: ReadBuffer, n: int) -> None:
        self.upstream_data(bytes(read.view[:n]))  # a shadow answer is parsed, never relayed

    def upstream_data(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.done:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.finish("shadow switched protocols")
            return
        except httptools.HttpParserError as exc:
            if not self.complete:
                self.finish(f"invalid response from shadow: {exc}")
                return
            self.reusable = False  # bytes after the answer
        if self.complete:
            self.finish()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.conn = None
        if self.until_close and self.status:
            self.complete = True  # the close ends an answer that had no framing
            self.finish()
        else:
            self.finish("shadow closed the connection" + (f": {exc}" if exc else ""))

    def upstream_pause_writing(self) -> None:
        """The shadow's buffer is full: the buffered request waits in the transport."""

    def upstream_resume_writing(self) -> None:
        """See upstream_pause_writing."""

    # -- parser callbacks -----------------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        if self.complete:
            self.reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.resp_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        if parser is None or self.complete:
            return
        status = parser.get_status_code()
        if status < 200:
            self.resp_headers = []  # an interim answer; the final one follows
            return
        self.status = status
        self.keep_alive = bool(parser.should_keep_alive())
        headers = self.resp_headers
        self.rec.head(status, headers)
        names = {n for n, _ in headers}
        if self.no_body or status in NO_BODY_STATUS:
            self.complete = True
        elif b"content-length" not in names and b"transfer-encoding" not in names:
            self.until_close = True

    def on_body(self, data: bytes) -> None:
        if not self.complete:
            self.rec.body(data)

    def on_message_complete(self) -> None:
        if self.status >= 200:
            self.complete = True

    # -- the end ----------------------------------------------------------------------------
    def finish(self, error: str = "") -> None:
        if self.done:
            return
        self.done = True
        self.ended_at = self.loop.time()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.parser = None
        conn = self.conn
        self.conn = None
        if conn is not None:
            reusable = not error and self.keep_alive and self.reusable and not self.no_body
            conn.endpoint.release(conn, reusable)
        self.rec.finish(self.complete and not error, error)
        self.owner.leg_done()
