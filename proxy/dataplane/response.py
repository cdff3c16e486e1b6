"""An upstream response as llhttp reports it: status line and fields checked, the
framing towards the client decided (Content-Length, chunked, until close, none), the
bytes to write gathered in `out`. The connection and the endings are attempt.py's.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Final

import httptools

from proxy.core.headers import (
    CHUNKED,
    CONNECTION,
    DATE,
    LENGTH,
    MERGED_VIA,
    Headers,
    names_fields,
    response_field,
    response_head,
    response_wire,
    upgrade_protocols,
)
from proxy.dataplane.gateway import Gateway
from proxy.dataplane.parsers import lenient
from proxy.dataplane.sides import Owner, Sink
from proxy.dataplane.upstream import ReadBuffer, UpstreamConnection

NO_BODY_STATUS: Final = frozenset({204, 304})
LAST_CHUNK: Final = b"0\r\n\r\n"
# RFC 9112 4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ). llhttp checks field names
# and values itself but lets any byte but CR and LF through in the reason phrase.
CONTROL_IN_REASON: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search


class BadResponse(Exception):
    """An upstream head that parses but must not be relayed (raised inside the parser)."""


class Overrun(Exception):
    """The upstream sent bytes after its response was complete (raised inside the parser)."""


class Relay:
    """The response parser of one upstream connection, and the reader its callbacks go to
    now. llhttp's parser is made once per connection (httptools' set-up costs about 5k
    instructions); after an answer it parsed whole it is at the start of the next, which
    the next attempt on the connection reads with it, and after a body relayed past it
    restart() puts it there."""

    __slots__ = ("callbacks", "parser", "to")

    def __init__(self, to: ResponseReader) -> None:
        self.to: ResponseReader | None = to
        # What httptools takes its callbacks from, with getattr at every set-up (restart
        # too): from a namespace, a dict lookup each; from self, a bound method made each,
        # and an AttributeError raised and cleared per callback we do not take.
        self.callbacks = SimpleNamespace(
            on_status=self.on_status,
            on_header=self.on_header,
            on_headers_complete=self.on_headers_complete,
            on_body=self.on_body,
            on_message_complete=self.on_message_complete,
            on_message_begin=None,
            on_chunk_header=None,
            on_chunk_complete=None,
        )
        self.parser = httptools.HttpResponseParser(self.callbacks)
        lenient(self.parser)

    def restart(self) -> None:
        """Back to the start of a message, in place: after a body relayed past llhttp,
        which still waits for its bytes. httptools' __init__ sets every field of the
        parser anew (llhttp_init, the callbacks, the leniencies cleared)."""
        httptools.HttpResponseParser.__init__(self.parser, self.callbacks)
        lenient(self.parser)

    def reader(self) -> ResponseReader:
        to = self.to
        assert to is not None, "a parser fed while no attempt holds it"
        return to

    def on_status(self, reason: bytes) -> None:
        self.reader().on_status(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.reader().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.reader().on_headers_complete()

    def on_body(self, data: bytes) -> None:
        self.reader().on_body(data)

    def on_message_complete(self) -> None:
        self.reader().on_message_complete()


class ResponseReader:
    """What the parser reports of an Attempt's response (its base: no object more per
    request). The Attempt's __init__ sets every field, these included."""

    __slots__ = (
        "body_left",
        "chunked_out",
        "client",
        "complete",
        "ex",
        "gw",
        "out",
        "parsed",
        "passthrough",
        "progressed",
        "relay",
        "resp_connection",
        "resp_date",
        "resp_headers",
        "resp_length",
        "resp_reason",
        "resp_te",
        "resp_via",
        "resp_wire",
        "status",
        "until_close",
        "upstream_keep_alive",
        "version11",
    )
    ex: Owner
    client: Sink
    gw: Gateway
    relay: Relay | None  # the connection's parser, and the link from its callbacks to us
    parsed: bool  # the parser saw the final answer end (a relayed body it does not see)
    status: int
    resp_reason: bytes
    resp_headers: Headers
    resp_connection: bytes | None
    resp_length: int  # Content-Length of the response; -1: none
    resp_date: bool  # the upstream sent a Date (else graygate adds one)
    resp_te: bool
    resp_via: bytes | None  # the upstream's Via values, joined
    resp_wire: list[bytes]  # the relayed fields as they came: ResponseField.wire, value, ...
    body_left: int  # Content-Length bytes still to relay
    chunked_out: bool
    until_close: bool
    complete: bool
    upstream_keep_alive: bool
    version11: bool  # the first read (it begins at the status line) began with b"HTTP/1.1 "
    out: list[bytes]  # response bytes gathered during one feed
    passthrough: bool  # body bytes now go to the client without the parser
    progressed: bool  # bytes moved since the attempt's last timeout tick

    def take_parser(self, conn: UpstreamConnection) -> None:
        """The parser the connection's last attempt left (let_go), else a new one."""
        relay = conn.reader
        if isinstance(relay, Relay):
            relay.to = self
        else:
            relay = Relay(self)
        self.relay = relay

    def let_go(self, conn: UpstreamConnection | None, keep: bool) -> None:
        """Done with the parser: its callbacks reach us no more. `keep`: the connection
        goes back to the pool at the end of an answer, so the parser is left for the next
        attempt on the connection (restarted if the body went past it)."""
        relay = self.relay
        self.relay = None
        if relay is not None:
            relay.to = None
            if keep and not self.parsed:
                relay.restart()
        if conn is not None:
            conn.reader = relay if keep else None

    def begin_response(self) -> None:
        """The fields of one response head, empty: before the first, and after an interim
        response (its fields are not the final answer's)."""
        self.resp_reason = b""  # a status line may have none
        self.resp_headers = []
        self.resp_wire = []
        self.resp_via = None
        self.resp_connection = None
        self.resp_length = -1
        self.resp_date = False
        self.resp_te = False
        self.version11 = False  # after an interim answer, the final one's is llhttp's to say

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
        field = response_field(name)
        self.resp_headers.append((field.name, value))
        kind = field.kind
        if field.relayed:
            wire = self.resp_wire
            wire.append(field.wire)
            wire.append(value)
            if kind == LENGTH:
                self.resp_length = int(value)  # llhttp has validated it
            elif kind == DATE:
                self.resp_date = True
        elif kind == CHUNKED:
            self.resp_te = True
        elif kind == CONNECTION:
            self.resp_connection = (
                value if self.resp_connection is None else self.resp_connection + b"," + value
            )
        elif kind == MERGED_VIA:
            self.resp_via = value if self.resp_via is None else self.resp_via + b", " + value

    def on_headers_complete(self) -> None:
        assert self.relay is not None
        parser = self.relay.parser
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
            self.begin_response()
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
        slow = upgrade or names_fields(self.resp_connection)
        if status == 204 and (self.resp_length >= 0 or self.resp_te):
            # RFC 9110 8.6: never a Content-Length on a 204.
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            slow = True
            if self.resp_length > 0 or self.resp_te:
                # It announced a body it must not have: its later bytes would be read as
                # the next answer on this connection, so the connection is not reused.
                self.upstream_keep_alive = False
        extra = ex.extra if self.resp_date else (*ex.extra, (b"date", gw.date))
        if slow:
            head = response_head(
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
        else:  # the fields were sorted as they came (on_header): the same bytes, cheaper
            head = response_wire(
                status,
                self.resp_reason,
                self.resp_wire,
                self.resp_via,
                via,
                extra,
                not ex.keep_alive,
                keep_alive_10=not ex.http11,
                chunked=self.chunked_out,
            )
        self.out.append(head)
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
        self.complete = self.parsed = True

    def relay_body(self, data: bytes | memoryview, read: ReadBuffer | None = None) -> bool:
        """A Content-Length body after its head: bytes go out as they come, unparsed, in
        one write with whatever head is still waiting in `out`. `read`: data is a view of
        that buffer, renewed when the client's transport keeps the view queued. True when
        the body is complete (the caller ends the attempt)."""
        self.progressed = True
        left = self.body_left - len(data)
        done = left <= 0
        if left < 0:
            data = data[: self.body_left]
            self.overrun()
        self.body_left = max(left, 0)
        if self.ex.shadow is not None:
            self.ex.shadow.primary_body(data)
        if self.out:
            self.out.append(data)  # type: ignore[arg-type]  # writelines takes any buffer
            self.flush()
        else:
            self.client.send(data)
        if read is not None and self.client.queued():
            read.renew()
        if done:
            self.passthrough = False
            self.complete = True
        return done

    def flush(self) -> None:
        out = self.out
        if out:
            self.client.send_all(out)
            self.out = []
