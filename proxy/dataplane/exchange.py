"""One request/response exchange: read the policy snapshot once, choose the version and
endpoint, forward the head, pump bodies both ways with flow control, record the outcome
once. Owns the mapping of upstream failures to 502/503/504 (the only place it happens).
Callback-driven: with a pooled connection no task or future is created per request; only
opening a new upstream connection awaits. Data plane: no aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from random import random
from time import perf_counter
from typing import TYPE_CHECKING

import httptools

from proxy.core.headers import (
    XFF,
    Headers,
    client_address,
    request_head,
    response_head,
    upgrade_protocols,
)
from proxy.core.router import choose, match_route, parse_cookies
from proxy.core.stats import VersionStats
from proxy.dataplane.upstream import (
    EndpointPool,
    UpstreamConnection,
    UpstreamError,
    VersionPool,
)

if TYPE_CHECKING:
    from proxy.dataplane.downstream import DownstreamProtocol
    from proxy.dataplane.gateway import Gateway, RouteRuntime

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("graygate.access")  # per-request lines, off by default

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
NO_BODY_STATUS = frozenset({204, 304})
EMPTY: dict[str, str] = {}
BODY_BUFFER_LIMIT = 256 * 1024  # request body held while the upstream connection opens
LAST_CHUNK = b"0\r\n\r\n"
SPLIT_HEAD_ABOVE = 16384
# RFC 9112 4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ). llhttp checks field names
# and values itself but lets any byte but CR and LF through in the reason phrase.
CONTROL_IN_REASON = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search
RESPONSE_NOTED = frozenset({b"content-length", b"date", b"transfer-encoding", b"connection"})
MAX_FORWARDS_METHODS = frozenset({b"OPTIONS", b"TRACE"})
ALLOW = b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"
SECRET_FIELDS = frozenset(
    {b"authorization", b"cookie", b"proxy-authorization"}
)  # reads larger than this get their head parsed apart


def mint_uid() -> str:
    return secrets.token_hex(16)


class BadResponse(Exception):
    """An upstream head that parses but must not be relayed (raised inside the parser)."""


class Overrun(Exception):
    """The upstream sent bytes after its response was complete (raised inside the parser)."""


class Exchange:
    """A request whose head has been parsed; start() answers it exactly once, then end()
    hands the connection back to the downstream protocol."""

    __slots__ = (
        "body_done",
        "body_left",
        "body_seen",
        "chunked",
        "chunked_out",
        "complete",
        "conn",
        "connecting",
        "connection",
        "cookie",
        "cookie_extra",
        "deadline",
        "down",
        "early",
        "ended",
        "ep",
        "error",
        "extra",
        "got_bytes",
        "gw",
        "has_body",
        "head",
        "head_sent",
        "headers",
        "host",
        "http11",
        "keep_alive",
        "last_io",
        "method",
        "out",
        "parser",
        "passthrough",
        "path",
        "pending",
        "pending_bytes",
        "progressed",
        "reason",
        "resp_connection",
        "resp_date",
        "resp_headers",
        "resp_length",
        "resp_reason",
        "resp_te",
        "retries",
        "reused",
        "rr",
        "started",
        "status",
        "target",
        "tried",
        "tunnel",
        "until_close",
        "upgrade",
        "upstream_keep_alive",
        "upstream_reads_paused",
        "version",
        "vpool",
        "vstats",
    )

    def __init__(
        self,
        down: DownstreamProtocol,
        method: bytes,
        target: bytes,
        path: str,
        host: str,
        headers: Headers,
        connection: bytes | None,
        cookie: str,
        http11: bool,
        keep_alive: bool,
        body: bool,
        chunked: bool,
        upgrade: bool,
        error: tuple[int, str, str] | None = None,
    ) -> None:
        self.down = down
        self.gw: Gateway = down.gw
        self.method = method
        self.target = target
        self.path = path
        self.host = host
        self.headers = headers
        self.connection = connection  # the client's Connection value
        self.cookie = cookie
        self.http11 = http11
        self.keep_alive = keep_alive
        self.has_body = body
        self.chunked = chunked
        self.upgrade = upgrade
        self.error = error  # answer locally with this (status, code, message)
        self.body_done = not body  # the whole request body has been read
        self.body_seen = 0  # decoded body bytes of a chunked request, for max_body_bytes
        self.pending: list[bytes] = []  # request body before the upstream connection exists
        self.pending_bytes = 0
        self.early = b""  # bytes after an upgrade request, for the tunnel
        self.extra: tuple[tuple[bytes, bytes], ...] = ()  # added to the response head
        self.version = ""
        self.reason = ""
        self.rr: RouteRuntime | None = None
        self.cookie_extra: tuple[tuple[bytes, bytes], ...] = ()
        self.ended = False
        self.head_sent = False  # the response head went to the client
        # Upstream side, per attempt.
        self.vpool: VersionPool | None = None
        self.vstats: VersionStats | None = None
        self.ep: EndpointPool | None = None  # counted in ep.outstanding while set
        self.tried: list[EndpointPool] = []
        self.retries = 0
        self.conn: UpstreamConnection | None = None
        self.reused = False
        self.connecting: asyncio.Task[None] | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.head = b""
        self.got_bytes = False
        self.status = 0
        self.resp_reason = b""
        self.resp_headers: Headers = []
        self.resp_connection: bytes | None = None
        self.resp_length = -1  # Content-Length of the response; -1: none
        self.resp_date = False  # the upstream sent a Date (else graygate adds one)
        self.body_left = 0  # Content-Length bytes still to relay
        self.passthrough = False  # body bytes now go to the client without the parser
        self.resp_te = False
        self.chunked_out = False
        self.until_close = False
        self.complete = False
        self.upstream_keep_alive = False
        self.upstream_reads_paused = False
        self.tunnel = False
        self.out: list[bytes] = []  # response bytes gathered during one feed
        self.started = 0.0
        self.deadline = 0.0
        self.last_io = 0.0  # loop time of the last tick that saw bytes move; see check()
        self.progressed = False  # bytes moved since the last tick

    # -- request body, fed by downstream --------------------------------------------------
    def request_body(self, data: bytes) -> None:
        conn = self.conn
        if self.chunked:
            frame: tuple[bytes, ...] = (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            frame = (data,)
        if conn is not None and conn.transport is not None:
            self.progressed = True
            conn.transport.writelines(frame)
            return
        if self.ended:
            return
        self.pending.extend(frame)
        self.pending_bytes += len(data)
        if self.pending_bytes > BODY_BUFFER_LIMIT:
            self.down.pause_reading(self.down.PAUSE_BUFFER)

    def body_resumes(self) -> None:
        """llhttp ended this request at its head, taking it for an upgrade; it was not
        one (not allowed), so its body follows after all. Called before it started."""
        self.body_done = False
        self.pending = []  # the last chunk request_end added
        self.pending_bytes = 0

    def request_end(self) -> None:
        self.body_done = True
        if self.chunked:
            conn = self.conn
            if conn is not None and conn.transport is not None:
                conn.transport.write(LAST_CHUNK)
            elif not self.ended:
                self.pending.append(LAST_CHUNK)

    # -- choosing ---------------------------------------------------------------------------
    def start(self) -> None:
        """Answer this request: locally (errors, no route) or through an upstream."""
        down = self.down
        if self.error is not None:
            status, code, message = self.error
            down.respond_local(self, status, code, message)
            self.end(status)
            return
        if self.method in MAX_FORWARDS_METHODS and self.max_forwards():
            return
        gw = self.gw
        self.started = perf_counter()
        rt = gw.runtime
        route = match_route(rt.policy, self.host, self.path)
        if route is None:
            down.respond_local(self, 404, "no_route", "no route matches this request")
            self.end(404)
            return
        rr = rt.routes[route.name]
        headers_map = EMPTY
        if rr.header_keys:
            keys = rr.header_keys
            headers_map = {
                k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers if k in keys
            }
        cookies = parse_cookies(self.cookie) if route.needs_cookies and self.cookie else EMPTY
        choice = choose(route, headers_map, cookies, random(), mint_uid)
        version = choice.version
        reason: str = choice.reason
        if choice.new_cookie is not None:
            cookie = rr.cookie_prefix + choice.new_cookie.encode() + rr.cookie_suffix
            self.extra = ((b"set-cookie", cookie),)
        loop = gw.loop
        now = loop.time()
        self.rr = rr
        self.cookie_extra = self.extra
        ep = self.use_version(version, reason, now)
        if ep is None and rr.failover and version != route.stable:
            assert self.vstats is not None
            self.vstats.inflight -= 1
            self.vstats.record(503, reason, 0.0)  # the chosen version failed this one
            ep = self.use_version(route.stable, "failover", now)
        if ep is None:
            down.respond_local(
                self, 503, "no_endpoint", f"no available endpoint for version {version}"
            )
            self.end(503)
            return
        self.retries = rr.retries
        self.deadline = now + gw.config.timeouts.request
        down_ = self.down
        self.head = request_head(
            self.method,
            self.target,
            self.headers,
            self.connection,
            down_.client_ip_bytes,
            down_.trusted,
            gw.via if self.http11 else gw.via10,
            ep.host_header,
            self.upgrade,
            self.chunked,
            gw.replace_for,
            down_.scheme,
        )
        self.attempt(ep)

    def max_forwards(self) -> bool:
        """RFC 9110 7.6.2: OPTIONS and TRACE with `Max-Forwards: 0` are answered here,
        any other value is decremented. True when answered."""
        headers = self.headers
        for i, (name, value) in enumerate(headers):
            if name != b"max-forwards":
                continue
            try:
                hops = int(value)
            except ValueError:
                return False  # not a number: forwarded untouched, as an unknown field
            if hops > 0:
                headers[i] = (name, str(hops - 1).encode())
                return False
            if self.method == b"OPTIONS":
                self.down.respond(self, 200, [(b"allow", ALLOW)], b"")
            else:
                # The request as received, minus credentials (no cross-site tracing).
                echo = [(n, v) for n, v in headers if n not in SECRET_FIELDS]
                body = self.method + b" " + self.target + b" HTTP/1.1\r\n"
                body += b"".join(n + b": " + v + b"\r\n" for n, v in echo) + b"\r\n"
                self.down.respond(self, 200, [(b"content-type", b"message/http")], body)
            self.end(200)
            return True
        return False

    def use_version(self, version: str, reason: str, now: float) -> EndpointPool | None:
        rr = self.rr
        assert rr is not None
        self.version = version
        self.reason = reason
        self.extra = self.cookie_extra + rr.version_headers[version]
        self.vstats = rr.stats[version]
        self.vstats.inflight += 1
        self.vpool = vpool = rr.pools[version]
        self.tried = []
        return vpool.pick(now)

    def attempt(self, ep: EndpointPool) -> None:
        self.ep = ep
        ep.outstanding += 1
        conn = ep.take_idle()
        if conn is not None:
            self.send_on(conn, True)
        else:
            self.connecting = self.gw.loop.create_task(self.connect(ep))

    async def connect(self, ep: EndpointPool) -> None:
        loop = self.gw.loop
        timeout = min(self.gw.config.timeouts.connect, max(0.0, self.deadline - loop.time()))
        try:
            async with asyncio.timeout_at(self.deadline):
                conn, reused = await ep.acquire(timeout)
        except UpstreamError as exc:
            self.connecting = None
            self.connect_failed(ep, exc)
            return
        except TimeoutError:
            self.connecting = None
            late = UpstreamError("timeout", "no upstream connection within the deadline")
            self.connect_failed(ep, late)
            return
        self.connecting = None
        if self.ended:
            ep.release(conn, True)
            return
        self.send_on(conn, reused)

    def connect_failed(self, ep: EndpointPool, exc: UpstreamError) -> None:
        self.drop_endpoint()
        assert self.vstats is not None and self.vpool is not None
        if exc.kind != "unavailable":
            self.vstats.upstream_error("timeout" if exc.kind == "timeout" else "connect")
            ep.failed(self.gw.loop.time(), self.vpool.endpoints)
        self.tried.append(ep)
        now = self.gw.loop.time()
        if exc.retryable and len(self.tried) <= self.retries and now < self.deadline:
            nxt = self.vpool.pick(now, tuple(self.tried))
            if nxt is not None:
                self.attempt(nxt)
                return
        rr = self.rr
        assert rr is not None
        stable = rr.policy.stable
        if exc.retryable and rr.failover and self.version != stable and now < self.deadline:
            # Nothing was sent: serve from stable, and count it against the chosen version.
            self.vstats.inflight -= 1
            self.vstats.record(exc.status, self.reason, perf_counter() - self.started)
            fallback = self.use_version(stable, "failover", now)
            if fallback is not None:
                self.attempt(fallback)
                return
        self.error_out(exc)

    def drop_endpoint(self) -> None:
        ep = self.ep
        if ep is not None:
            ep.outstanding -= 1
            self.ep = None

    # -- forwarding ---------------------------------------------------------------------------
    def send_on(self, conn: UpstreamConnection, reused: bool) -> None:
        self.conn = conn
        self.reused = reused
        conn.user = self
        self.parser = parser = httptools.HttpResponseParser(self)
        parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self.got_bytes = False
        self.resp_headers = []
        transport = conn.transport
        assert transport is not None
        self.progressed = True
        if self.down.writing_paused:
            # The previous answer filled the client's buffer: this one waits for it too.
            self.pause_upstream_reading()
        if self.pending:
            transport.writelines([self.head, *self.pending])
            self.pending = []
            self.pending_bytes = 0
            self.down.resume_reading(self.down.PAUSE_BUFFER)
        else:
            transport.write(self.head)

    # -- timeouts: checked by Gateway.watch through the downstream connection ----------------
    def check(self, now: float) -> None:
        """The read timeout counts from the last tick that saw bytes move (the hot path
        only sets a flag), and not at all while we hold the upstream back ourselves."""
        if self.conn is None or self.ended or self.tunnel or self.upstream_reads_paused:
            return  # paused: we hold the upstream back for a slow client, it is not slow
        if self.progressed:
            self.progressed = False
            self.last_io = now
        elif now - self.last_io >= self.gw.config.timeouts.read:
            read = self.gw.config.timeouts.read
            self.fail(UpstreamError("timeout", f"upstream sent nothing for {read:g}s"))
            return
        if not self.head_sent and now >= self.deadline:
            self.fail(UpstreamError("timeout", "upstream did not answer within the deadline"))

    # -- upstream side: ConnectionUser + httptools callbacks ----------------------------------
    def upstream_data(self, data: bytes) -> None:
        if self.passthrough:
            self.relay_body(data)
            return
        if self.tunnel:
            self.down.send(data)
            return
        if self.parser is None or self.ended:
            return
        self.got_bytes = True
        self.progressed = True
        if not self.head_sent and len(data) > SPLIT_HEAD_ABOVE:
            # A head and a large body in one read: parse only the head, then relay the
            # body as a zero-copy view (one writev with the head) instead of a parser copy.
            end = data.find(b"\r\n\r\n", 0, 65536)
            if end > 0:
                end += 4
                if not self.feed(data[:end], end < len(data)):
                    return
                if self.passthrough:
                    self.relay_body(memoryview(data)[end:])
                    return
                data = data[end:]
        if self.feed(data):
            self.flush()

    def feed(self, data: bytes, more: bool = False) -> bool:
        """Parse upstream bytes (`more`: others follow them in this read); False when the
        exchange ended (its output is flushed)."""
        parser = self.parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.flush()
            if self.status == 101 and self.upgrade:
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

    def relay_body(self, data: bytes | memoryview) -> None:
        """A Content-Length body after its head: bytes go out as they come, unparsed, in
        one write with whatever head is still waiting in `out`."""
        self.progressed = True
        left = self.body_left - len(data)
        done = left <= 0
        if left < 0:
            data = data[: self.body_left]
            self.overrun()
        self.body_left = max(left, 0)
        if self.out:
            self.out.append(data)  # type: ignore[arg-type]  # writelines takes any buffer
            self.flush()
        else:
            self.down.send(data)
        if done:
            self.passthrough = False
            self.complete = True
            self.succeed()

    def overrun(self) -> None:
        """The upstream sent more than its framing allows (RFC 9112 6.3). The extra bytes
        are dropped, never relayed: the client would read them as the answer to its next
        request. The answer already relayed was complete and stands (recorded with its
        own status); the connection is closed, and the overrun counts as a protocol error."""
        self.upstream_keep_alive = False
        if self.vstats is not None:
            self.vstats.upstream_error("protocol")

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.tunnel:
            self.conn = None
            self.down.close()
            self.end(101)
            return
        if self.ended:
            return
        if self.until_close and self.head_sent:
            # The close is the end of a response that had no framing.
            if self.chunked_out:
                self.down.send(LAST_CHUNK)
            else:
                self.keep_alive = False
            self.conn = None
            self.succeed()
            return
        if not self.got_bytes:
            self.fail(UpstreamError("reset", "upstream closed the connection", True))
        else:
            self.fail(UpstreamError("reset", "upstream closed the connection mid-response"))

    def upstream_pause_writing(self) -> None:
        self.down.pause_reading(self.down.PAUSE_UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self.down.resume_reading(self.down.PAUSE_UPSTREAM)

    # Bytes after a complete answer in the same read: llhttp goes on parsing them. Junk is
    # a parser error; the next message is stopped at its first callback (no on_message_begin:
    # a callback per response costs more than these checks in callbacks that run anyway).
    def on_status(self, reason: bytes) -> None:
        if self.complete:
            raise Overrun()
        if not reason.isalpha() and CONTROL_IN_REASON(reason) is not None:
            raise BadResponse("control byte in the status line")  # RFC 9110 5.5
        self.resp_reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.resp_headers.append((name, value))
        if name not in RESPONSE_NOTED:
            return
        if name == b"content-length":
            self.resp_length = int(value)  # llhttp has validated it
        elif name == b"date":
            self.resp_date = True
        elif name == b"transfer-encoding":
            self.resp_te = True
        elif name == b"connection":
            self.resp_connection = (
                value if self.resp_connection is None else self.resp_connection + b"," + value
            )

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        if self.complete:
            raise Overrun()  # a next message whose status line has no reason phrase
        status = parser.get_status_code()
        self.status = status
        if not 100 <= status <= 599:
            raise BadResponse(f"status {status} is outside 100..599")  # RFC 9110 15
        if status == 101:
            self.check_switch()
        gw = self.gw
        via = gw.via if parser.get_http_version() == "1.1" else gw.via10
        if 100 <= status < 200 and status != 101:
            # Interim responses (100 Continue, 103 Early Hints) go to HTTP/1.1 clients.
            if self.http11:
                self.out.append(
                    response_head(
                        status,
                        self.resp_reason,
                        [(n, v) for n, v in self.resp_headers if n != b"content-length"],
                        self.resp_connection,
                        via,
                        (),
                        False,
                    )
                )
            self.resp_headers = []
            self.resp_reason = b""  # a final status line may have none
            self.resp_connection = None
            self.resp_length = -1
            self.resp_te = False
            return
        # llhttp forgets keep-alive once the message is done: read it now.
        self.upstream_keep_alive = bool(parser.should_keep_alive())
        no_body = self.method == b"HEAD" or status in NO_BODY_STATUS
        upgrade = status == 101
        if not no_body and not upgrade and (self.resp_te or self.resp_length < 0):
            self.until_close = not self.resp_te
            if self.http11:
                self.chunked_out = True
            else:
                self.keep_alive = False  # HTTP/1.0 client: the close delimits the body
        if not upgrade and (not self.body_done or gw.draining):
            self.keep_alive = False
        headers = self.resp_headers
        if status == 204 and (self.resp_length >= 0 or self.resp_te):
            # RFC 9110 8.6: never a Content-Length on a 204.
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            if self.resp_length > 0 or self.resp_te:
                # It announced a body it must not have: its later bytes would be read as
                # the next answer on this connection, so the connection is not reused.
                self.upstream_keep_alive = False
        extra = self.extra if self.resp_date else (*self.extra, (b"date", gw.date))
        self.out.append(
            response_head(
                status,
                self.resp_reason,
                headers,
                self.resp_connection,
                via,
                extra,
                not self.keep_alive,
                keep_alive_10=not self.http11,
                chunked=self.chunked_out,
                upgrade=upgrade,
            )
        )
        self.head_sent = True
        if no_body:
            self.complete = True
        elif not self.resp_te and self.resp_length > 0:
            self.body_left = self.resp_length

    def check_switch(self) -> None:
        """A 101 only to a request that asked for an allowed upgrade, and only to a
        protocol it named (RFC 9110 7.8): else the upstream would open a tunnel around
        every rule of ours (h2c smuggling)."""
        if not self.upgrade:
            raise BadResponse("101 Switching Protocols to a request that asked for no upgrade")
        offered = upgrade_protocols(v for n, v in self.headers if n == b"upgrade")
        chosen = upgrade_protocols(v for n, v in self.resp_headers if n == b"upgrade")
        if not chosen or not chosen <= offered:
            raise BadResponse("101 Switching Protocols to a protocol the client did not ask for")

    def on_body(self, data: bytes) -> None:
        if self.complete:
            raise Overrun()  # a body on an answer to HEAD
        self.body_left -= len(data)
        if self.chunked_out:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)

    def on_message_complete(self) -> None:
        if self.status < 200 and self.status != 101:
            return  # an interim response; the final one follows on the same parser
        if self.chunked_out:
            self.out.append(LAST_CHUNK)
        self.complete = True

    def flush(self) -> None:
        out = self.out
        if out:
            self.down.send_all(out)
            self.out = []

    # -- endings -----------------------------------------------------------------------------
    def succeed(self) -> None:
        """The response went to the client whole."""
        conn = self.conn
        self.conn = None
        if conn is not None:
            if self.upstream_reads_paused and conn.transport is not None:
                conn.transport.resume_reading()
                self.upstream_reads_paused = False
            reusable = (
                self.upstream_keep_alive
                and self.body_done
                and not self.until_close
                and self.method != b"HEAD"  # a HEAD answer's framing is unknown to the parser
            )
            conn.endpoint.release(conn, reusable)
        ep = self.ep
        if ep is not None:
            if self.status >= 500:
                assert self.vpool is not None
                ep.failed(self.gw.loop.time(), self.vpool.endpoints)
            else:
                ep.succeeded()
        self.drop_endpoint()
        self.end(self.status)

    def fail(self, exc: UpstreamError) -> None:
        """The upstream failed after the request was (partly) sent."""
        if self.ended:
            return
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.user = None
            conn.endpoint.release(conn, False)
        ep = self.ep
        if (
            ep is not None
            and exc.retryable
            and self.reused
            and not self.got_bytes
            and not self.has_body
            and self.method in IDEMPOTENT
        ):
            # A pooled connection the upstream had already closed: try once more afresh.
            self.drop_endpoint()
            self.reused = False
            self.attempt(ep)
            return
        assert self.vstats is not None
        self.vstats.upstream_error(exc.kind if exc.kind != "unavailable" else "connect")
        if ep is not None and exc.kind != "timeout":
            assert self.vpool is not None
            ep.failed(self.gw.loop.time(), self.vpool.endpoints)
        self.drop_endpoint()
        self.error_out(exc)

    def error_out(self, exc: UpstreamError) -> None:
        if self.head_sent:
            self.down.abort()  # cut mid-response: the client must see a truncated answer
            self.end(502)
        else:
            self.down.respond_local(self, exc.status, exc.kind, exc.detail)
            self.end(exc.status)

    def client_lost(self, status: int = 499) -> None:
        if self.ended:
            return
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.user = None
            conn.endpoint.release(conn, False)
        self.drop_endpoint()
        self.end(status)

    def end(self, status: int) -> None:
        if self.ended:
            return
        self.ended = True
        self.drop_endpoint()
        self.parser = None  # the parser holds our bound callbacks: break the cycle now
        self.pending = []
        vstats = self.vstats
        if vstats is not None:
            vstats.inflight -= 1
            vstats.record(status, self.reason, perf_counter() - self.started)
        if self.gw.access_log:
            self.log_access(status)
        self.down.finished(self)

    def log_access(self, status: int) -> None:
        # No headers, cookies or tokens: only what identifies the exchange.
        rr = self.rr
        down = self.down
        client = down.client_ip
        if down.trusted:  # behind a trusted proxy: the client it names (README, "addresses")
            chain = [v for n, v in self.headers if n == XFF]
            client = client_address(client, chain, self.gw.trusted)
        # One mapping argument: the text line is formatted from it, and --log-format json
        # emits its keys as fields.
        access_logger.info(
            "%(client)s %(method)s %(path)s %(status)d route=%(route)s version=%(version)s "
            "reason=%(reason)s %(duration_ms).1fms",
            {
                "client": client,
                "method": self.method.decode("latin-1"),
                "path": self.path,
                "status": status,
                "route": rr.policy.name if rr is not None else "-",
                "version": self.version or "-",
                "reason": self.reason or "-",
                "duration_ms": round((perf_counter() - self.started) * 1000, 3)
                if self.started
                else 0.0,
            },
        )

    # -- flow control from the downstream side ------------------------------------------------
    def pause_upstream_reading(self) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None and not self.upstream_reads_paused:
            self.upstream_reads_paused = True
            conn.transport.pause_reading()

    def resume_upstream_reading(self) -> None:
        conn = self.conn
        if self.upstream_reads_paused and conn is not None and conn.transport is not None:
            self.upstream_reads_paused = False
            self.progressed = True  # the read timeout starts again from here
            conn.transport.resume_reading()

    # -- WebSocket and other upgrades: a byte tunnel once the upstream said 101 ---------------
    def start_tunnel(self, rest: bytes) -> None:
        self.tunnel = True
        self.down.start_tunnel(self)
        if self.early and self.conn is not None and self.conn.transport is not None:
            self.conn.transport.write(self.early)
        if rest:
            self.down.send(rest)

    def tunnel_send(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.write(data)

    def tunnel_close(self) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.user = None
            conn.close()
        self.drop_endpoint()
        self.end(101)
