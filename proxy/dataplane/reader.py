"""Requests read off one client connection: the httptools callbacks (one reader and parser
per connection, not per request), the head and body size limits, the Host check cached
per connection, the priming of a body llhttp skipped after an upgrade request. Each head
becomes an Exchange queued on the connection (`Connection`); it owns everything else.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections import deque
from typing import ClassVar, Final

import httptools

from proxy.core.headers import Headers, keep_alive_means_11, lower_name, upgrade_protocols
from proxy.core.responses import LocalAnswer
from proxy.dataplane.exchange import Client, Exchange
from proxy.dataplane.gateway import Gateway
from proxy.dataplane.parsers import lenient
from proxy.dataplane.request import HOST_RE, judge
from proxy.dataplane.sides import PAUSE_PIPELINE, PAUSE_UPGRADE

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


class Connection(Client):
    """The client connection as its reader sees it (downstream.DownstreamProtocol)."""

    __slots__ = ("deadline", "queue")
    queue: deque[Exchange]  # head = the one being answered
    deadline: float

    @abstractmethod
    def arm(self, seconds: float) -> None: ...
    @abstractmethod
    def disarm(self) -> None: ...
    @abstractmethod
    def start(self, ex: Exchange) -> None: ...
    @abstractmethod
    def reject(self, answer: LocalAnswer) -> None: ...


def new_parser(callbacks: object) -> httptools.HttpRequestParser:
    parser = httptools.HttpRequestParser(callbacks)
    lenient(parser)
    return parser


def refusal(data: bytes, exc: httptools.HttpParserError, limit: LocalAnswer | None) -> LocalAnswer:
    """graygate's answer to a stream llhttp refused; `limit` is the one a callback left."""
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        # llhttp knows a fixed list of methods; RFC 9110 9.1 allows any token.
        if EXTENSION_METHOD_RE.match(data.lstrip(b"\r\n")) is not None:
            return LocalAnswer(501, "method_not_implemented", "request method not supported")
        return LocalAnswer(400, "bad_request", "malformed request line")
    if limit is not None:
        return limit  # httptools wraps what our callbacks raise: the verdict waited here
    return LocalAnswer(400, "bad_request", f"malformed request: {exc}")


def upgrade_allowed(headers: Headers, allowed: frozenset[bytes]) -> bool:
    """Every protocol the request's Upgrade names is on the allow-list. Any other
    (h2c above all: h2c smuggling) is forwarded as a plain request, without Upgrade,
    HTTP2-Settings and the Connection tokens naming them (request_head drops them)."""
    asked = upgrade_protocols(v for n, v in headers if n == b"upgrade")
    return bool(asked) and asked <= allowed


class PrimedCallbacks:
    """The callbacks of a parser fed a copy of a head already parsed (prime_body): that
    head ends without a second exchange; everything after it goes to the reader."""

    def __init__(self, reader: RequestReader) -> None:
        self.reader = reader
        self.primed = False
        self.on_message_begin = reader.on_message_begin
        self.on_url = reader.on_url
        self.on_header = reader.on_header
        self.on_body = reader.on_body
        self.on_message_complete = reader.on_message_complete

    def on_headers_complete(self) -> None:
        if self.primed:
            self.reader.on_headers_complete()
        else:
            self.primed = True
            self.reader.in_head = False


class RequestReader:
    """The parser's callback object, created with the connection: the fields of the head
    being read, and the requests the connection has not finished reading."""

    # Callbacks we do not take, present as None: httptools looks each one up per parser,
    # and a missing attribute costs it an AttributeError raised and cleared.
    on_chunk_header: ClassVar[None] = None
    on_chunk_complete: ClassVar[None] = None

    def __init__(self, down: Connection, gw: Gateway) -> None:
        self.down = down
        self.gw = gw
        # The connection's queue and timer, bound once here: the callbacks run per request.
        self.queue = down.queue
        self.arm = down.arm
        self.disarm = down.disarm
        self.start = down.start
        self.max_head = gw.config.limits.max_header_bytes
        self.parser = new_parser(self)
        self.stopped = False  # no more requests are parsed on this connection
        self.incoming: Exchange | None = None  # the request whose body is being parsed
        self.deferred: Exchange | None = None  # parsed in this read, started after it
        self.valid_host_raw = b""  # the last Host value that passed HOST_RE, and decoded
        self.valid_host = ""
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

    def feed(self, data: bytes) -> None:
        if self.stopped:
            return
        self.began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgrade_asked(data, exc.args[0])
            return
        except httptools.HttpParserError as exc:
            self.down.reject(refusal(data, exc, self.limit_error))
            return
        if self.in_head and not self.began and self.head_overflows(data):
            return
        self.start_deferred()

    def head_overflows(self, data: bytes) -> bool:
        """A head still incomplete after a whole read: count raw bytes too, so one endless
        header line cannot grow without bound before its callback fires."""
        self.head_raw += len(data)
        limit = self.gw.config.limits.max_header_bytes
        if self.head_raw > limit:
            self.down.reject(
                LocalAnswer(431, "header_too_large", f"request head exceeds {limit} bytes")
            )
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
                    self.down.pause_reading(PAUSE_UPGRADE)
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
                self.down.reject(refusal(data, exc, self.limit_error))
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
        parser = self.parser = new_parser(PrimedCallbacks(self))
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

    def stop(self) -> Exchange | None:
        """Parse nothing more (the stream is refused): returns the request being read."""
        self.stopped = True
        self.in_head = False
        ex = self.incoming
        self.incoming = None
        if self.deferred is ex:
            self.deferred = None  # refused before it was ever started
        return ex

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
        if upgrade and (error is not None or not upgrade_allowed(self.headers, gw.upgrades)):
            upgrade = False  # forwarded as a plain request: see upgrade_asked
        # Positional: on CPython 3.11 these fifteen as keywords cost 4 % of the hot path.
        ex = Exchange(
            self.down,  # client
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
        queue = self.queue
        queue.append(ex)
        if error is not None:
            self.stopped = True  # answer in order, then close; parse nothing more
        if len(queue) == 1:
            # Started once this read is parsed: a malformed body in the same read is then
            # refused before anything reaches an upstream.
            self.deferred = ex
        elif len(queue) >= MAX_PIPELINE:
            self.down.pause_reading(PAUSE_PIPELINE)
        if body:
            self.arm(gw.config.timeouts.client_body)
        else:
            self.disarm()

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
        if self.down.deadline:
            self.arm(self.gw.config.timeouts.client_body)

    def on_message_complete(self) -> None:
        ex = self.incoming
        self.incoming = None
        if ex is not None:
            ex.request_end()
        queue = self.queue
        if ex is None or not queue or ex is not queue[0] or ex.body_done:
            self.disarm()
        if not self.parser.should_keep_alive():
            self.stopped = True
