"""The client connection: one asyncio Protocol per connection answering its requests in
order (pipelining), keep-alive, client timeouts, flow control both ways, the refusal of a
malformed stream. Its RequestReader (reader.py) parses; each request's Exchange does the
rest, seeing this side only as exchange.Client. No aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import cast

from proxy.core.headers import is_trusted, serialize
from proxy.core.responses import TEXT_PLAIN, LocalAnswer, status_line
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.gateway import Gateway
from proxy.dataplane.reader import MAX_PIPELINE, Connection, RequestReader
from proxy.dataplane.sides import PAUSE_BUFFER, PAUSE_PIPELINE, PAUSE_UPGRADE, PAUSE_UPSTREAM

logger = logging.getLogger(__name__)


class DownstreamProtocol(Connection):
    """An asyncio protocol by its methods (uvloop calls them by name); its base is the
    interface the reader, the exchanges and their attempts see it through."""

    PAUSE_PIPELINE = PAUSE_PIPELINE
    PAUSE_BUFFER = PAUSE_BUFFER
    PAUSE_UPSTREAM = PAUSE_UPSTREAM
    PAUSE_UPGRADE = PAUSE_UPGRADE

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.transport: asyncio.Transport | None = None
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
        self.deadline = 0.0  # loop time when the client phase times out; 0: none
        self.tunnel: Exchange | None = None
        self.reader = RequestReader(self, gw)  # last: it binds queue and the timer methods

    @property
    def in_head(self) -> bool:
        """A request head has begun and not ended."""
        return self.reader.in_head

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
        incoming = self.reader.incoming
        if incoming is not None and incoming not in self.queue:
            incoming.client_lost()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.tunnel_send(data)
            return
        self.reader.feed(data)

    def eof_received(self) -> bool | None:
        # Half-close: answer what was asked, then close (keep the transport open to write).
        # A request cut before its end will never be complete: drop it now, as the
        # client's doing (499), rather than let the upstream time out on it.
        reader = self.reader
        reader.stopped = True
        ex = reader.incoming
        if ex is not None and not ex.body_done:
            reader.incoming = None
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
        if not ex.keep_alive or (ex is self.reader.incoming and not ex.body_done):
            self.close()
            return
        if self.queue:
            self.start(self.queue[0])
            if len(self.queue) < MAX_PIPELINE:
                self.resume_reading(self.PAUSE_PIPELINE)
            return
        self.resume_reading(self.PAUSE_PIPELINE)
        if self.reader.stopped or self.gw.draining:
            self.close()
            return
        self.arm(self.gw.keepalive_timeout)

    def reject(self, answer: LocalAnswer) -> None:
        """The stream itself is malformed: answer in order if we can, then close."""
        ex = self.reader.stop()
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
            self.reader.start_deferred()

    def send(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def send_all(self, parts: Iterable[bytes]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(parts)

    def queued(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

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
            self.reader.stopped = self.closing = True
            transport.abort()

    def on_timeout(self) -> None:
        if self.closed:
            return
        incoming = self.reader.incoming
        reading = self.in_head or (incoming is not None and not incoming.body_done)
        unanswered = not self.queue or (self.queue[0] is incoming and not incoming.head_sent)
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
        self.reader.stopped = True
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.close()


def protocol_factory(gw: Gateway) -> Callable[[], asyncio.BaseProtocol]:
    """What create_server takes: a DownstreamProtocol per connection. Cast: the class is
    an asyncio protocol by its methods, not by its base."""
    return cast("Callable[[], asyncio.BaseProtocol]", partial(DownstreamProtocol, gw))
