"""One upstream attempt of an exchange: the connection (pooled or opened), the request
head and body going out, the response parsed, framed and relayed, the upgrade tunnel.
Reports its end to the exchange (`Owner`) and writes to the client (`Sink`); never
chooses versions or endpoints, records no stats, imports neither side.
"""

from __future__ import annotations

import asyncio

import httptools

from proxy.dataplane.gateway import Gateway
from proxy.dataplane.response import LAST_CHUNK, BadResponse, ResponseReader
from proxy.dataplane.sides import PAUSE_BUFFER, PAUSE_UPSTREAM, Owner, Sink
from proxy.dataplane.upstream import EndpointPool, ReadBuffer, UpstreamConnection, UpstreamError


class Attempt(ResponseReader):
    """Created by the exchange per try: takes a pooled connection or opens one."""

    __slots__ = (
        "conn",
        "connecting",
        "got_bytes",
        "last_io",
        "reads_paused",
        "reused",
        "tunnel",
    )

    def __init__(self, ex: Owner, client: Sink, gw: Gateway, ep: EndpointPool) -> None:
        self.ex = ex
        self.client = client
        self.gw = gw
        self.conn: UpstreamConnection | None = None
        self.reused = False
        self.connecting: asyncio.Task[None] | None = None
        self.relay = None
        self.parsed = False
        self.got_bytes = False
        self.status = 0
        self.begin_response()
        self.body_left = 0  # Content-Length bytes still to relay
        self.passthrough = False  # body bytes now go to the client without the parser
        self.chunked_out = False
        self.until_close = False
        self.complete = False
        self.upstream_keep_alive = False
        self.reads_paused = False  # we hold the upstream back for a slow client
        self.tunnel = False
        self.out = []  # response bytes gathered during one feed
        self.last_io = 0.0  # loop time of the last tick that saw bytes move; see check()
        self.progressed = False  # bytes moved since the last tick
        conn = ep.take_idle()
        if conn is not None:
            self.send_on(conn, True)
        else:
            self.connecting = gw.loop.create_task(self.connect(ep))

    async def connect(self, ep: EndpointPool) -> None:
        ex = self.ex
        loop = self.gw.loop
        timeout = min(self.gw.config.timeouts.connect, max(0.0, ex.deadline - loop.time()))
        try:
            async with asyncio.timeout_at(ex.deadline):
                conn, reused = await ep.acquire(timeout)
        except UpstreamError as exc:
            self.connecting = None
            ex.connect_failed(ep, exc)
            return
        except TimeoutError:
            self.connecting = None
            ex.connect_failed(ep, UpstreamError("timeout", "no upstream connection in time"))
            return
        self.connecting = None
        if ex.ended:
            ep.release(conn, True)
            return
        self.send_on(conn, reused)

    def send_on(self, conn: UpstreamConnection, reused: bool) -> None:
        self.conn = conn
        self.reused = reused
        conn.user = self
        self.take_parser(conn)
        transport = conn.transport
        assert transport is not None
        self.progressed = True
        if self.client.writing_paused:
            # The previous answer filled the client's buffer: this one waits for it too.
            self.pause_upstream_reading()
        ex = self.ex
        if ex.pending:
            transport.writelines([ex.head, *ex.pending])
            ex.pending = []
            ex.pending_bytes = 0
            self.client.resume_reading(PAUSE_BUFFER)
        else:
            transport.write(ex.head)

    def abandon(self) -> None:
        """The exchange ends without this attempt's answer: free the connection."""
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        conn = self.conn
        self.conn = None
        self.let_go(conn, False)
        if conn is not None:
            conn.user = None
            conn.endpoint.release(conn, False)

    # -- timeouts: checked by Gateway.watch through the client connection ------------------
    def check(self, now: float) -> None:
        """The read timeout counts from the last tick that saw bytes move (the hot path
        only sets a flag), and not at all while we hold the upstream back ourselves."""
        if self.conn is None or self.ex.ended or self.tunnel or self.reads_paused:
            return  # paused: we hold the upstream back for a slow client, it is not slow
        if self.progressed:
            self.progressed = False
            self.last_io = now
        elif now - self.last_io >= self.gw.config.timeouts.read:
            read = self.gw.config.timeouts.read
            self.fail(UpstreamError("timeout", f"upstream sent nothing for {read:g}s"))
            return
        if not self.ex.head_sent and now >= self.ex.deadline:
            self.fail(UpstreamError("timeout", "upstream did not answer within the deadline"))

    # -- ConnectionUser ------------------------------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        if self.passthrough:
            if self.relay_body(data):
                self.succeed()
            return
        if self.tunnel:
            self.client.send(data)
            return
        if self.relay is None or self.ex.ended:
            return
        self.heard(data)
        if self.feed(data):
            self.flush()

    def upstream_view(self, read: ReadBuffer, n: int) -> None:
        """A large read, in the shared buffer: a body is relayed as a view of it (one
        writev with the head when the head came in the same read), never copied."""
        view = read.view[:n]
        if self.passthrough:
            if self.relay_body(view, read):
                self.succeed()
            return
        if self.tunnel or self.relay is None or self.ex.ended or self.ex.head_sent:
            self.upstream_data(bytes(view))
            return
        end = read.buf.find(b"\r\n\r\n", 0, min(n, 65536))
        if end < 0:
            self.upstream_data(bytes(view))
            return
        end += 4  # the head is parsed apart, a body after it relayed unparsed
        head = bytes(view[:end])
        self.heard(head)
        if not self.feed(head, end < n):
            return
        if self.passthrough:
            if self.relay_body(view[end:], read):
                self.succeed()
        elif self.feed(bytes(view[end:])):
            self.flush()

    def heard(self, data: bytes) -> None:
        """Bytes of the answer arrived (`data` begins with them): the first read begins at
        the status line, and whether it said HTTP/1.1 saves asking llhttp for a str.
        bytes only: compiled, startswith on bytes is native, on a union a method lookup."""
        if not self.got_bytes:
            self.version11 = data.startswith(b"HTTP/1.1 ")
            self.got_bytes = True
        self.progressed = True

    def upstream_lost(self, exc: Exception | None) -> None:
        ex = self.ex
        if self.tunnel:
            self.conn = None
            self.client.close()
            ex.end(101)
            return
        if ex.ended:
            return
        if self.until_close and ex.head_sent:
            # The close is the end of a response that had no framing.
            if self.chunked_out:
                self.client.send(LAST_CHUNK)
            else:
                ex.keep_alive = False
            self.conn = None
            self.succeed()
            return
        if not self.got_bytes:
            self.fail(UpstreamError("reset", "upstream closed the connection", True))
        else:
            self.fail(UpstreamError("reset", "upstream closed the connection mid-response"))

    def upstream_pause_writing(self) -> None:
        self.client.pause_reading(PAUSE_UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self.client.resume_reading(PAUSE_UPSTREAM)

    # -- the response ----------------------------------------------------------------------
    def feed(self, data: bytes, more: bool = False) -> bool:
        """Parse upstream bytes (`more`: others follow them in this read); False when the
        exchange ended (its output is flushed)."""
        assert self.relay is not None
        try:
            self.relay.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.flush()
            if self.status == 101 and self.ex.upgrade:
                self.start_tunnel(data[exc.args[0] :])
                return False
            self.fail(UpstreamError("protocol", "unexpected protocol switch from upstream"))
            return False
        except httptools.HttpParserError as exc:
            # `out` holds nothing past the end of the answer: the callbacks stop there.
            self.flush()
            if self.complete:
                self.overrun()  # a next message, or junk, after the complete answer
                self.succeed()
                return False
            cause = exc.__context__
            detail = str(cause) if isinstance(cause, BadResponse) else str(exc)
            self.fail(UpstreamError("protocol", f"invalid response from upstream: {detail}"))
            return False
        if self.complete:
            if more:
                self.overrun()  # a bodiless answer (HEAD, 204, 304) with bytes after its head
            self.flush()
            self.succeed()
            return False
        if self.body_left > 0 and not self.chunked_out:
            self.passthrough = True
        return True

    # -- endings -----------------------------------------------------------------------------
    def succeed(self) -> None:
        """The response went to the client whole."""
        conn = self.conn
        self.conn = None
        if conn is None:
            self.let_go(None, False)
        else:
            if self.reads_paused and conn.transport is not None:
                conn.transport.resume_reading()
                self.reads_paused = False
            ex = self.ex
            reusable = (
                self.upstream_keep_alive
                and ex.body_done
                and not self.until_close
                and ex.method != b"HEAD"  # a HEAD answer's framing is unknown to the parser
            )
            self.let_go(conn, reusable)
            conn.endpoint.release(conn, reusable)
        self.ex.attempt_done(self.status)

    def fail(self, exc: UpstreamError) -> None:
        """The upstream failed after the request was (partly) sent."""
        if self.ex.ended:
            return
        conn = self.conn
        self.conn = None
        self.let_go(conn, False)
        if conn is not None:
            conn.user = None
            conn.endpoint.release(conn, False)
        retry_safe = exc.retryable and self.reused and not self.got_bytes
        self.ex.attempt_failed(exc, retry_safe)

    # -- flow control from the client side ---------------------------------------------------
    def pause_upstream_reading(self) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None and not self.reads_paused:
            self.reads_paused = True
            conn.transport.pause_reading()

    def resume_upstream_reading(self) -> None:
        conn = self.conn
        if self.reads_paused and conn is not None and conn.transport is not None:
            self.reads_paused = False
            self.progressed = True  # the read timeout starts again from here
            conn.transport.resume_reading()

    # -- WebSocket and other upgrades: a byte tunnel once the upstream said 101 ---------------
    def start_tunnel(self, rest: bytes) -> None:
        self.tunnel = True
        self.ex.tunnel_started()
        early = self.ex.early
        if early and self.conn is not None and self.conn.transport is not None:
            self.conn.transport.write(early)
        if rest:
            self.client.send(rest)

    def tunnel_send(self, data: bytes) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.write(data)

    def tunnel_close(self) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.user = None
            conn.close()
