"""The client-facing side: one asyncio Protocol per connection parsing requests with
httptools, answering them in order (pipelining), keep-alive, client timeouts, 4xx for
malformed input. It serves exchange.Client; the exchange does the rest. No aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Iterable
from typing import Final, cast

import httptools

from proxy.core.headers import (
    Headers,
    is_trusted,
    keep_alive_means_11,
    lower_name,
    serialize,
    upgrade_protocols,
)
from proxy.core.responses import TEXT_PLAIN, LocalAnswer, status_line
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.gateway import Gateway
from proxy.dataplane.request import HOST_RE, judge
from proxy.dataplane.sides import PAUSE_BUFFER, PAUSE_PIPELINE, PAUSE_UPGRADE, PAUSE_UPSTREAM

logger = logging.getLogger(__name__)

MAX_PIPELINE: Final = 16  # parsed requests waiting for their turn before reads pause
# A well-formed request line whose method llhttp does not know: 501, not 400.
EXTENSION_METHOD_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/1\.[01]\r\n")
NOTED: Final = frozenset(
    {b"host", b"cookie", b"content-length", b"transfer-encoding", b"connection"}
)


class HeadTooLarge(Exception):
    """Raised inside a parser callback; the verdict waits in `limit_error`."""


class BodyTooLarge(Exception):
    """Raised inside a parser callback; the verdict waits in `limit_error`."""


class PrimedCallbacks:
    """The callbacks of a parser fed a copy of a head already parsed (prime_body): that
    head ends without a second exchange; everything after it goes to the protocol."""

    def __init__(self, down: DownstreamProtocol) -> None:
        self.down = down
        self.primed = False
        self.on_message_begin = down.on_message_begin
        self.on_url = down.on_url
        self.on_header = down.on_header
        self.on_body = down.on_body
        self.on_message_complete = down.on_message_complete

    def on_headers_complete(self) -> None:
        if self.primed:
            self.down.on_headers_complete()
        else:
            self.primed = True
            self.down.in_head = False


class DownstreamProtocol(asyncio.Protocol):
    PAUSE_PIPELINE = PAUSE_PIPELINE
    PAUSE_BUFFER = PAUSE_BUFFER
    PAUSE_UPSTREAM = PAUSE_UPSTREAM
    PAUSE_UPGRADE = PAUSE_UPGRADE

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.max_head = gw.config.limits.max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # RFC 9112 7.1.1 allows whitespace before a chunk extension; llhttp needs telling.
        self.parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self.client_ip = ""
        self.client_ip_bytes = b""
        self.scheme = b"http"  # b"https" on a TLS listener: X-Forwarded-Proto
        self.trusted = False
        self.closed = False
        self.closing = False  # close() was called; nothing more is answered
        self.paused = 0  # bit set of PAUSE_* reasons
        self.writing_paused = False
        self.write_since = 0.0  # loop time the client last drained some of our write buffer
        self.write_buffered = 0  # our write buffer's size at the last look
        self.queue: deque[Exchange] = deque()  # head = the one being answered
        self.incoming: Exchange | None = None  # the request whose body is being parsed
        self.deadline = 0.0  # loop time when the client phase times out; 0: none
        self.tunnel: Exchange | None = None
        self.deferred: Exchange | None = None  # parsed in this read, started after it
        self.valid_host_raw = b""  # the last Host value that passed HOST_RE, and decoded
        self.valid_host = ""
        self.stopped = False  # no more requests are parsed on this connection
        self.in_head = False
        self.began = False
        self.head_bytes = 0  # request line + headers, counted in the callbacks
        self.head_raw = 0  # bytes of reads that ended inside an unfinished head
        self.limit_error: LocalAnswer | None = None
        self._reset_request()

    def _reset_request(self) -> None:
        self.url = b""
        self.headers: Headers = []
        self.connection: bytes | None = None
        self.host: bytes | None = None
        self.host_invalid = False
        self.host_count = 0
        self.cookie = b""
        self.te = False
        self.content_length: int | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else ""
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]  # an IPv4 client seen through a dual-stack listener
        self.client_ip = ip
        self.client_ip_bytes = self.client_ip.encode()
        self.trusted = is_trusted(self.client_ip, self.gw.trusted)
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = b"https"
        self.gw.connections.add(self)
        self.arm(self.gw.config.timeouts.client_header)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gw.forget(self)
        self.disarm()
        if self.tunnel is not None:
            self.tunnel.tunnel_close()
            self.tunnel = None
        for ex in list(self.queue):
            ex.client_lost()
        if self.incoming is not None and self.incoming not in self.queue:
            self.incoming.client_lost()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.tunnel_send(data)
            return
        if self.stopped:
            return
        self.began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgrade_asked(data, exc.args[0])
            return
        except httptools.HttpParserError as exc:
            self.parse_failed(data, exc)
            return
        if self.in_head and not self.began and self.head_overflows(data):
            return
        self.start_deferred()

    def parse_failed(self, data: bytes, exc: httptools.HttpParserError) -> None:
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            # llhttp knows a fixed list of methods; RFC 9110 9.1 allows any token.
            if EXTENSION_METHOD_RE.match(data.lstrip(b"\r\n")) is not None:
                self.reject(
                    LocalAnswer(501, "method_not_implemented", "request method not supported")
                )
            else:
                self.reject(LocalAnswer(400, "bad_request", "malformed request line"))
        elif self.limit_error is not None:
            # httptools wraps what our callbacks raise; the callback left the verdict here.
            self.reject(self.limit_error)
        else:
            self.reject(LocalAnswer(400, "bad_request", f"malformed request: {exc}"))

    def head_overflows(self, data: bytes) -> bool:
        """A head still incomplete after a whole read: count raw bytes too, so one endless
        header line cannot grow without bound before its callback fires."""
        self.head_raw += len(data)
        limit = self.gw.config.limits.max_header_bytes
        if self.head_raw > limit:
            self.reject(LocalAnswer(431, "header_too_large", f"request head exceeds {limit} bytes"))
            return True
        return False

    def upgrade_asked(self, data: bytes, at: int) -> None:
        """llhttp stopped after a request asking for an upgrade, `at` bytes into `data`,
        as if the connection switched protocols there. An allowed upgrade waits for the
        upstream's 101 with the bytes that follow; any other went out as a plain request
        (on_headers_complete), so parsing goes on as HTTP/1.1, body first if it has one."""
        while True:
            ex = self.queue[-1] if self.queue else None
            if (
                ex is None
                or ex.upgrade
                or ex.error is not None
                or (self.stopped and not ex.has_body)  # it said Connection: close
            ):
                self.stopped = True
                if ex is not None and ex.upgrade:
                    ex.early = data[at:]
                    self.pause_reading(self.PAUSE_UPGRADE)
                self.start_deferred()
                return
            data = data[at:]
            self.began = False
            try:
                if ex.has_body:
                    self.prime_body(ex)
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                at = exc.args[0]
                continue
            except httptools.HttpParserError as exc:
                self.parse_failed(data, exc)
                return
            break
        if self.in_head and not self.began and self.head_overflows(data):
            return
        self.start_deferred()

    def prime_body(self, ex: Exchange) -> None:
        """llhttp skipped the body of a request it took for an upgrade, and ended it: a
        fresh parser, fed the same head without Upgrade, reads that body with the framing
        (and its checks) of any request, then the requests after it."""
        ex.body_resumes()
        self.incoming = ex  # a framing error in the copy is this request's: reject() sees it
        fields = b"".join(n + b": " + v + b"\r\n" for n, v in ex.headers if n != b"upgrade")
        version = b"HTTP/1.1" if ex.http11 else b"HTTP/1.0"
        parser = httptools.HttpRequestParser(PrimedCallbacks(self))
        parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self.parser = parser
        try:
            parser.feed_data(ex.method + b" / " + version + b"\r\n" + fields + b"\r\n")
        finally:
            self._reset_request()
        self.stopped = False  # set by the skipped body's end, not by the request's own
        self.arm(self.gw.config.timeouts.client_body)

    def start_deferred(self) -> None:
        ex = self.deferred
        if ex is not None:
            self.deferred = None
            if not ex.ended:
                self.start(ex)

    def eof_received(self) -> bool | None:
        # Half-close: answer what was asked, then close (keep the transport open to write).
        # A request cut before its end will never be complete: drop it now, as the
        # client's doing (499), rather than let the upstream time out on it.
        self.stopped = True
        ex = self.incoming
        if ex is not None and not ex.body_done:
            self.incoming = None
            ex.client_lost()
        if not self.queue:
            self.close()
        # TLS has no half-close: after the client's close_notify the transport shuts down
        # whatever we answer (and asyncio warns when asked to keep it open).
        return None if self.scheme == b"https" else True

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.write_since = self.gw.loop.time()
        self.write_buffered = self.transport.get_write_buffer_size() if self.transport else 0
        if self.tunnel is not None:
            self.tunnel.pause_upstream_reading()
        elif self.queue:
            self.queue[0].pause_upstream_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.tunnel is not None:
            self.tunnel.resume_upstream_reading()
        elif self.queue:
            self.queue[0].resume_upstream_reading()

    # -- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_head = True
        self.began = True
        self.head_bytes = 0
        self.head_raw = 0
        self.arm(self.gw.client_header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        limit = self.max_head
        if self.head_bytes > limit:
            self.limit_error = LocalAnswer(
                414, "uri_too_long", f"request target exceeds {limit} bytes"
            )
            raise HeadTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.max_head:
            limit = self.max_head
            self.limit_error = LocalAnswer(
                431, "header_too_large", f"request head exceeds {limit} bytes"
            )
            raise HeadTooLarge()
        name = lower_name(name)
        self.headers.append((name, value))
        if name not in NOTED:
            return
        if name == b"host":
            self.host = value
            self.host_count += 1
        elif name == b"cookie":
            self.cookie = value if not self.cookie else self.cookie + b"; " + value
        elif name == b"content-length":
            self.content_length = int(value)
        elif name == b"transfer-encoding":
            self.te = True
        elif name == b"connection":
            self.connection = value if self.connection is None else self.connection + b"," + value

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        gw = self.gw
        method: bytes = parser.get_method()
        upgrade = bool(parser.should_upgrade())
        keep_alive = bool(parser.should_keep_alive())
        # get_http_version() formats a str (2k instructions); see keep_alive_means_11.
        if keep_alive and self.connection is None and keep_alive_means_11(self.headers):
            version = "1.1"
        else:
            version = parser.get_http_version()
        keep_alive = keep_alive and not gw.draining
        body = self.te or bool(self.content_length)
        target = self.url
        raw_host = self.host
        if raw_host is None:
            host = ""
        elif raw_host is self.valid_host_raw or raw_host == self.valid_host_raw:
            host = self.valid_host  # keep-alive clients repeat their Host: checked once
        elif HOST_RE.fullmatch(raw_host) is not None:
            host = self.valid_host = raw_host.decode("latin-1")
            self.valid_host_raw = raw_host
        else:
            host = ""
            self.host_invalid = True
        error, path, target, host, self.headers = judge(
            gw,
            version,
            method,
            target,
            host,
            self.headers,
            self.host_count,
            self.host is None,
            self.host_invalid,
            self.te,
            self.content_length,
        )
        if error is not None:
            keep_alive = False
        if upgrade and (error is not None or not self.upgrade_allowed()):
            upgrade = False  # forwarded as a plain request: see upgrade_asked
        # Positional: on CPython 3.11 these fifteen as keywords cost 4 % of the hot path.
        ex = Exchange(
            self,  # client
            gw,  # gw
            method,  # method
            target,  # target
            path,  # path
            host,  # host
            self.headers,  # headers
            self.connection,  # connection
            self.cookie.decode("latin-1"),  # cookie
            version == "1.1",  # http11
            keep_alive,  # keep_alive
            body,  # body
            self.te,  # chunked
            upgrade,  # upgrade
            error,  # error
        )
        self._reset_request()
        self.incoming = ex
        self.queue.append(ex)
        if error is not None:
            self.stopped = True  # answer in order, then close; parse nothing more
        if len(self.queue) == 1:
            # Started once this read is parsed: a malformed body in the same read is then
            # refused before anything reaches an upstream.
            self.deferred = ex
        elif len(self.queue) >= MAX_PIPELINE:
            self.pause_reading(self.PAUSE_PIPELINE)
        if body:
            self.arm(gw.config.timeouts.client_body)
        else:
            self.disarm()

    def upgrade_allowed(self) -> bool:
        """Every protocol the request's Upgrade names is on the allow-list. Any other
        (h2c above all: h2c smuggling) is forwarded as a plain request, without Upgrade,
        HTTP2-Settings and the Connection tokens naming them (request_head drops them)."""
        asked = upgrade_protocols(v for n, v in self.headers if n == b"upgrade")
        return bool(asked) and asked <= self.gw.upgrades

    def on_body(self, body: bytes) -> None:
        ex = self.incoming
        if ex is None:
            return
        limit = self.gw.config.limits.max_body_bytes
        if limit is not None and ex.chunked:
            ex.body_seen += len(body)
            if ex.body_seen > limit:
                self.limit_error = LocalAnswer(
                    413, "body_too_large", f"request body exceeds {limit} bytes"
                )
                raise BodyTooLarge()
        ex.request_body(body)
        if self.deadline:
            self.arm(self.gw.config.timeouts.client_body)

    def on_message_complete(self) -> None:
        ex = self.incoming
        self.incoming = None
        if ex is not None:
            ex.request_end()
        if ex is None or not self.queue or ex is not self.queue[0] or ex.body_done:
            self.disarm()
        if not self.parser.should_keep_alive():
            self.stopped = True

    # -- answering ------------------------------------------------------------------------
    def start(self, ex: Exchange) -> None:
        try:
            ex.start()
        except Exception:
            # A bug must cost one request, never the connection's other requests' order.
            logger.exception("exchange failed unexpectedly")
            if not ex.ended:
                if not ex.head_sent:
                    ex.respond_local(LocalAnswer(502, "internal", "internal error in graygate"))
                else:
                    self.abort()
                ex.client_lost()

    def finished(self, ex: Exchange) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        else:
            with contextlib.suppress(ValueError):
                self.queue.remove(ex)  # dropped before its turn: the answering one goes on
            return
        if self.closing or self.tunnel is not None:
            return
        if not ex.keep_alive or (ex is self.incoming and not ex.body_done):
            self.close()
            return
        if self.queue:
            self.start(self.queue[0])
            if len(self.queue) < MAX_PIPELINE:
                self.resume_reading(self.PAUSE_PIPELINE)
            return
        self.resume_reading(self.PAUSE_PIPELINE)
        if self.stopped or self.gw.draining:
            self.close()
            return
        self.arm(self.gw.keepalive_timeout)

    def reject(self, answer: LocalAnswer) -> None:
        """The stream itself is malformed: answer in order if we can, then close."""
        self.stopped = True
        self.in_head = False
        ex = self.incoming
        self.incoming = None
        if self.deferred is ex:
            self.deferred = None  # refused before it was ever started
        if ex is not None and ex.head_sent:
            self.abort()
            return
        now = not self.queue or self.queue[0] is ex
        if now and self.transport is not None and not self.closed:
            body = answer.body()
            head = serialize(
                status_line(answer.status),
                [
                    (b"content-type", TEXT_PLAIN),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-graygate-error", answer.code.encode()),
                    (b"date", self.gw.date),
                    (b"connection", b"close"),
                ],
            )
            self.send_all((head, body))
        if ex is not None:
            # Its head was fine but its body framing is not: the upstream must not answer
            # half a request. Ended after our answer went out, so nothing else is written.
            ex.client_lost(answer.status)
        if now:
            self.close()
        else:
            # Earlier requests are still to be answered; finished() closes after them.
            self.start_deferred()

    def send(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def send_all(self, parts: Iterable[bytes]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(parts)

    # -- flow control, timers, closing -----------------------------------------------------
    def pause_reading(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # Timeouts are deadlines checked by Gateway.watch every WATCH_TICK, not one timer
    # handle per request: arming is a float store on the hot path.
    def arm(self, seconds: float) -> None:
        self.deadline = self.gw.loop.time() + seconds

    def disarm(self) -> None:
        self.deadline = 0.0

    def check(self, now: float) -> None:
        if self.deadline and now >= self.deadline:
            self.deadline = 0.0
            self.on_timeout()
        if self.writing_paused:
            self.check_writing(now)
        if self.queue:
            self.queue[0].check(now)

    def check_writing(self, now: float) -> None:
        """timeouts.client_write: our write buffer to this client has stayed full and has
        not shrunk (the client read nothing) for that long. Then the connection is cut,
        buffered bytes dropped, and the upstream freed (connection_lost)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        size = transport.get_write_buffer_size()
        if size < self.write_buffered:
            self.write_since = now  # the client is reading, however slowly
        self.write_buffered = size
        if now - self.write_since >= self.gw.config.timeouts.client_write:
            self.stopped = self.closing = True
            transport.abort()

    def on_timeout(self) -> None:
        if self.closed:
            return
        reading = self.in_head or (self.incoming is not None and not self.incoming.body_done)
        unanswered = not self.queue or (
            self.queue[0] is self.incoming and not self.incoming.head_sent
        )
        if reading and unanswered:
            self.reject(LocalAnswer(408, "client_timeout", "request not received in time"))
            return
        self.close()

    def idle(self) -> bool:
        return not self.queue and not self.in_head and self.tunnel is None

    def start_tunnel(self, ex: Exchange) -> None:
        self.tunnel = ex
        self.disarm()
        self.resume_reading(self.PAUSE_UPGRADE)

    def abort(self) -> None:
        """Cut the connection after what was written: the client sees a truncated response."""
        self.stopped = True
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.close()
