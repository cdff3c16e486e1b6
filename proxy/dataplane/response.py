"""An upstream response as llhttp reports it: status line and fields checked, the
framing towards the client decided (Content-Length, chunked, until close, none), the
bytes to write gathered in `out`. The connection and the endings are attempt.py's.
"""

from __future__ import annotations

import re
from typing import ClassVar, Final

import httptools

from proxy.core.headers import Headers, lower_name, response_head, upgrade_protocols
from proxy.dataplane.gateway import Gateway
from proxy.dataplane.sides import Owner, Sink

NO_BODY_STATUS: Final = frozenset({204, 304})
LAST_CHUNK: Final = b"0\r\n\r\n"
# RFC 9112 4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ). llhttp checks field names
# and values itself but lets any byte but CR and LF through in the reason phrase.
CONTROL_IN_REASON: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search
RESPONSE_NOTED: Final = frozenset({b"content-length", b"date", b"transfer-encoding", b"connection"})


class BadResponse(Exception):
    """An upstream head that parses but must not be relayed (raised inside the parser)."""


class Overrun(Exception):
    """The upstream sent bytes after its response was complete (raised inside the parser)."""


class ResponseReader:
    """The parser callbacks of an Attempt (its base: no object more per request). The
    Attempt's __init__ sets every field, these included."""

    __slots__ = (
        "body_left",
        "chunked_out",
        "client",
        "complete",
        "ex",
        "gw",
        "out",
        "parser",
        "resp_connection",
        "resp_date",
        "resp_headers",
        "resp_length",
        "resp_reason",
        "resp_te",
        "status",
        "until_close",
        "upstream_keep_alive",
        "version11",
    )
    ex: Owner
    client: Sink
    gw: Gateway
    parser: httptools.HttpResponseParser | None
    status: int
    resp_reason: bytes
    resp_headers: Headers
    resp_connection: bytes | None
    resp_length: int  # Content-Length of the response; -1: none
    resp_date: bool  # the upstream sent a Date (else graygate adds one)
    resp_te: bool
    body_left: int  # Content-Length bytes still to relay
    chunked_out: bool
    until_close: bool
    complete: bool
    upstream_keep_alive: bool
    version11: bool  # the first read (it begins at the status line) began with b"HTTP/1.1 "
    out: list[bytes]  # response bytes gathered during one feed
    # Callbacks we do not take, present as None: httptools looks each one up per parser,
    # and a missing attribute costs it an AttributeError raised and cleared (2k in all).
    on_message_begin: ClassVar[None] = None
    on_chunk_header: ClassVar[None] = None
    on_chunk_complete: ClassVar[None] = None

    def overrun(self) -> None:
        """The upstream sent more than its framing allows (RFC 9112 6.3). The extra bytes
        are dropped, never relayed: the client would read them as the answer to its next
        request. The answer already relayed was complete and stands (recorded with its
        own status); the connection is closed, and the overrun counts as a protocol error."""
        self.upstream_keep_alive = False
        self.ex.overrun()

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
        name = lower_name(name)
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
        ex = self.ex
        gw = self.gw
        # get_http_version() formats a str (2k instructions): asked only when needed.
        via = gw.via if self.version11 or parser.get_http_version() == "1.1" else gw.via10
        if 100 <= status < 200 and status != 101:
            # Interim responses (100 Continue, 103 Early Hints) go to HTTP/1.1 clients.
            if ex.http11:
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
            self.version11 = False  # the final answer's version is llhttp's to say
            self.resp_reason = b""  # a final status line may have none
            self.resp_connection = None
            self.resp_length = -1
            self.resp_te = False
            return
        # llhttp forgets keep-alive once the message is done: read it now.
        self.upstream_keep_alive = bool(parser.should_keep_alive())
        no_body = ex.method == b"HEAD" or status in NO_BODY_STATUS
        upgrade = status == 101
        if not no_body and not upgrade and (self.resp_te or self.resp_length < 0):
            self.until_close = not self.resp_te
            if ex.http11:
                self.chunked_out = True
            else:
                ex.keep_alive = False  # HTTP/1.0 client: the close delimits the body
        if not upgrade and (not ex.body_done or gw.draining):
            ex.keep_alive = False
        headers = self.resp_headers
        if status == 204 and (self.resp_length >= 0 or self.resp_te):
            # RFC 9110 8.6: never a Content-Length on a 204.
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            if self.resp_length > 0 or self.resp_te:
                # It announced a body it must not have: its later bytes would be read as
                # the next answer on this connection, so the connection is not reused.
                self.upstream_keep_alive = False
        extra = ex.extra if self.resp_date else (*ex.extra, (b"date", gw.date))
        self.out.append(
            response_head(
                status,
                self.resp_reason,
                headers,
                self.resp_connection,
                via,
                extra,
                not ex.keep_alive,
                keep_alive_10=not ex.http11,
                chunked=self.chunked_out,
                upgrade=upgrade,
            )
        )
        ex.head_sent = True
        if no_body:
            self.complete = True
        elif not self.resp_te and self.resp_length > 0:
            self.body_left = self.resp_length

    def check_switch(self) -> None:
        """A 101 only to a request that asked for an allowed upgrade, and only to a
        protocol it named (RFC 9110 7.8): else the upstream would open a tunnel around
        every rule of ours (h2c smuggling)."""
        if not self.ex.upgrade:
            raise BadResponse("101 Switching Protocols to a request that asked for no upgrade")
        offered = upgrade_protocols(v for n, v in self.ex.headers if n == b"upgrade")
        chosen = upgrade_protocols(v for n, v in self.resp_headers if n == b"upgrade")
        if not chosen or not chosen <= offered:
            raise BadResponse("101 Switching Protocols to a protocol the client did not ask for")

    def on_body(self, data: bytes) -> None:
        if self.complete:
            raise Overrun()  # a body on an answer to HEAD
        self.body_left -= len(data)
        if self.ex.shadow is not None:
            self.ex.shadow.primary_body(data)
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
            self.client.send_all(out)
            self.out = []
