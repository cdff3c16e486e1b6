"""An exchange as its client connection drives it while it runs: the request body in
(framed for the upstream, held while the connection opens), flow control, timeouts and
tunnel bytes passed to the attempt, and graygate's own answers out. exchange.Exchange
builds on it; choosing, retrying and recording are exchange.py's.
"""

from __future__ import annotations

from typing import Final, Generic, TypeVar

from proxy.core.headers import Headers
from proxy.core.responses import LocalAnswer, answer_fields, own_response
from proxy.dataplane.attempt import Attempt
from proxy.dataplane.gateway import Gateway
from proxy.dataplane.response import LAST_CHUNK
from proxy.dataplane.sides import PAUSE_BUFFER, Owner, Sink

BODY_BUFFER_LIMIT: Final = 256 * 1024  # request body held while the upstream connection opens


class ClientSide(Sink):
    """What the feed needs of the client connection (exchange.Client is the whole)."""

    __slots__ = ("closed",)
    closed: bool


C = TypeVar("C", bound=ClientSide)


class RequestFeed(Owner, Generic[C]):
    """The base of Exchange (no object more per request); Exchange.__init__ sets every
    field, these and Owner's included. Generic in the client: Exchange's is the whole
    exchange.Client."""

    __slots__ = ("attempt", "body_seen", "chunked", "client", "gw")
    attempt: Attempt | None
    body_seen: int  # decoded body bytes of a chunked request, for max_body_bytes
    chunked: bool
    client: C
    gw: Gateway

    # -- request body, fed by the client side ---------------------------------------------
    def request_body(self, data: bytes) -> None:
        if self.shadow is not None:
            self.shadow.request_body(data)
        if self.chunked:
            frame: tuple[bytes, ...] = (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            frame = (data,)
        a = self.attempt
        if a is not None and a.conn is not None and a.conn.transport is not None:
            a.progressed = True
            a.conn.transport.writelines(frame)
            return
        if self.ended:
            return
        self.pending.extend(frame)
        self.pending_bytes += len(data)
        if self.pending_bytes > BODY_BUFFER_LIMIT:
            self.client.pause_reading(PAUSE_BUFFER)

    def body_resumes(self) -> None:
        """llhttp ended this request at its head, taking it for an upgrade; it was not
        one (not allowed), so its body follows after all. Called before it started."""
        self.body_done = False
        self.pending = []  # the last chunk request_end added
        self.pending_bytes = 0

    def request_end(self) -> None:
        self.body_done = True
        if self.shadow is not None:
            self.shadow.request_end()
        if self.chunked:
            a = self.attempt
            conn = a.conn if a is not None else None
            if conn is not None and conn.transport is not None:
                conn.transport.write(LAST_CHUNK)
            elif not self.ended:
                self.pending.append(LAST_CHUNK)

    # -- the client side's requests, forwarded to the attempt ---------------------------------
    def check(self, now: float) -> None:
        if self.attempt is not None:
            self.attempt.check(now)

    def pause_upstream_reading(self) -> None:
        if self.attempt is not None:
            self.attempt.pause_upstream_reading()

    def resume_upstream_reading(self) -> None:
        if self.attempt is not None:
            self.attempt.resume_upstream_reading()

    def tunnel_send(self, data: bytes) -> None:
        if self.attempt is not None:
            self.attempt.tunnel_send(data)

    # -- graygate's own answers ------------------------------------------------------------
    def respond_local(self, answer: LocalAnswer) -> None:
        """An error graygate makes itself: short text body, X-Graygate-Error says why."""
        self.respond(answer.status, answer_fields(answer), answer.body())

    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        """Any response graygate answers itself (errors, Max-Forwards: 0)."""
        if self.client.closed:
            return
        if not self.body_done or self.gw.draining:
            self.keep_alive = False
        self.client.send_all(
            own_response(
                status,
                headers,
                body,
                self.gw.date,
                self.extra,
                self.keep_alive,
                self.http11,
                self.method == b"HEAD",
            )
        )
