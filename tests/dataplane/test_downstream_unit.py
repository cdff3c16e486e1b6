"""DownstreamProtocol without sockets: requests go in through data_received, answers are
read off a fake transport, upstream connections are fake pooled ones answered by hand,
and timeouts fire through check(now) (the shape of uvicorn's tests/protocols/test_http.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.core.config.load import parse_config
from proxy.core.state import PolicyStore
from proxy.core.stats import Stats
from proxy.dataplane.downstream import MAX_PIPELINE, DownstreamProtocol
from proxy.dataplane.gateway import Gateway
from proxy.dataplane.response import Relay
from proxy.dataplane.upstream import READ_BUFFER, READS, UpstreamConnection
from tests.helpers import FakeTransport, deliver


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n".encode()


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Harness:
    """A gateway with one route whose only endpoint has `idle` fake pooled connections."""

    def __init__(self, idle: int = 2, **settings: Any) -> None:
        route = {
            "name": "shop",
            "versions": {"blue": {"endpoints": ["http://127.0.0.1:9"]}},
            "stable": "blue",
            "weights": {"blue": 100},
        }
        cfg = parse_config({"listen": "127.0.0.1:0", "routes": [route], **settings}, env={})
        self.gw = Gateway(cfg, PolicyStore(cfg), Stats.from_config(cfg), asyncio.get_running_loop())
        (self.pool,) = self.gw.upstreams.pools()
        self.upstreams: list[tuple[UpstreamConnection, FakeTransport]] = []
        for _ in range(idle):
            conn = UpstreamConnection(self.pool)
            transport = FakeTransport(("127.0.0.1", 9))
            conn.connection_made(transport)  # type: ignore[arg-type]
            self.pool.conns.add(conn)
            self.pool.open += 1
            self.pool.idle.append(conn)
            self.upstreams.append((conn, transport))
        self.client = FakeTransport()
        self.down = DownstreamProtocol(self.gw)
        self.down.connection_made(self.client)  # type: ignore[arg-type]

    def sent_upstream(self) -> list[bytes]:
        return [t.take() for _, t in self.upstreams]

    def answering(self) -> Any:
        """The upstream connection of the exchange being answered."""
        attempt = self.down.queue[0].attempt
        assert attempt is not None and attempt.conn is not None
        return attempt.conn


async def test_a_pipelined_pair_is_answered_in_order() -> None:
    h = Harness()
    h.down.data_received(get("/a") + get("/b"))
    assert len(h.down.queue) == 2
    sent = b"".join(h.sent_upstream())
    assert sent.startswith(b"GET /a ") and b"GET /b" not in sent  # one at a time
    deliver(h.answering(), ok(b"first"))
    first = h.client.take()
    assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"first")
    assert b"".join(h.sent_upstream()).startswith(b"GET /b ")  # started after the first
    deliver(h.answering(), ok(b"second"))
    assert h.client.take().endswith(b"second")
    assert not h.down.queue and not h.client.closing


async def test_keep_alive_reuses_the_connection_and_its_upstream() -> None:
    h = Harness()
    for path in ("/one", "/two"):
        h.down.data_received(get(path))
        conn = h.answering()
        deliver(conn, ok(path.encode()))
        assert h.client.take().endswith(path.encode())
        assert not h.client.closing
        assert h.down.deadline > 0  # the keep-alive timeout is armed
        assert h.pool.idle[-1] is conn  # back in the pool
    assert h.down.idle()


async def test_a_malformed_head_is_a_400_with_nothing_started_upstream() -> None:
    h = Harness()
    h.down.data_received(b"GET / HTTP/1.1\r\nHost: shop.example\r\nbad header\r\n\r\n")
    answer = h.client.take()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"x-graygate-error: bad_request" in answer.lower()
    assert h.client.closing
    assert h.sent_upstream() == [b"", b""]
    assert h.pool.outstanding == 0 and len(h.pool.idle) == 2


async def test_check_after_the_client_header_deadline_answers_408() -> None:
    h = Harness()
    h.down.data_received(b"GET / HTTP/1.1\r\nHost: shop.")  # a head that never ends
    loop = asyncio.get_running_loop()
    h.down.check(loop.time())  # not yet
    assert h.client.take() == b""
    h.down.check(loop.time() + h.gw.config.timeouts.client_header + 0.01)
    answer = h.client.take()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert h.client.closing
    assert h.sent_upstream() == [b"", b""]


async def test_reading_pauses_once_max_pipeline_requests_wait() -> None:
    h = Harness()
    h.down.data_received(b"".join(get(f"/p{i}") for i in range(MAX_PIPELINE - 1)))
    assert not h.client.paused
    h.down.data_received(get("/last"))
    assert len(h.down.queue) == MAX_PIPELINE
    assert h.client.paused and h.down.paused & h.down.PAUSE_PIPELINE
    deliver(h.answering(), ok(b"x"))  # one answered: below the limit again
    assert not h.client.paused and h.down.paused == 0


def refusal(h: Harness, status: bytes, code: bytes, body: bytes) -> bytes:
    """The exact bytes of the client side's own refusal of a malformed stream (reject)."""
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nx-graygate-error: %s\r\ndate: %s\r\nconnection: close\r\n\r\n"
        % (len(body), code, h.gw.date)
    ) + body


async def test_a_request_target_over_the_head_limit_is_a_414() -> None:
    h = Harness(limits={"max_header_bytes": 1024})
    h.down.data_received(b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\nHost: shop.example\r\n\r\n")
    assert h.client.take() == refusal(
        h,
        b"414 URI Too Long",
        b"uri_too_long",
        b"414 URI Too Long: request target exceeds 1024 bytes\n",
    )
    assert h.client.closing and not h.down.queue
    assert h.sent_upstream() == [b"", b""]


async def test_a_header_line_that_never_ends_is_a_431_once_its_reads_pass_the_limit() -> None:
    h = Harness(limits={"max_header_bytes": 1024})
    h.down.data_received(b"GET / HTTP/1.1\r\nHost: shop.example\r\nX-Long: " + b"v" * 600)
    h.down.data_received(b"v" * 600)  # later reads of the same head count raw bytes
    assert h.client.take() == b"" and h.down.in_head
    h.down.data_received(b"v" * 600)
    assert h.client.take() == refusal(
        h,
        b"431 Request Header Fields Too Large",
        b"header_too_large",
        b"431 Request Header Fields Too Large: request head exceeds 1024 bytes\n",
    )
    assert h.client.closing and not h.down.in_head
    h.down.data_received(b"\r\n\r\n" + get("/after"))  # nothing more is parsed
    assert h.client.take() == b"" and not h.down.queue


async def test_an_unknown_token_method_is_a_501_and_a_garbled_line_a_400() -> None:
    h = Harness()
    h.down.data_received(b"BREW /pot HTTP/1.1\r\nHost: shop.example\r\n\r\n")
    assert h.client.take() == refusal(
        h,
        b"501 Not Implemented",
        b"method_not_implemented",
        b"501 Not Implemented: request method not supported\n",
    )
    h = Harness()
    h.down.data_received(b"GE(T / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
    assert h.client.take() == refusal(
        h, b"400 Bad Request", b"bad_request", b"400 Bad Request: malformed request line\n"
    )
    assert h.client.closing and h.sent_upstream() == [b"", b""]


async def test_a_chunked_body_past_max_body_bytes_is_a_413_and_the_upstream_is_cut() -> None:
    h = Harness(limits={"max_body_bytes": 10})
    h.down.data_received(
        b"POST / HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    assert b"".join(h.sent_upstream()).endswith(b"\r\n\r\n5\r\nhello\r\n")
    h.down.data_received(b"6\r\nworld!\r\n0\r\n\r\n")
    assert h.client.take() == refusal(
        h,
        b"413 Content Too Large",
        b"body_too_large",
        b"413 Content Too Large: request body exceeds 10 bytes\n",
    )
    assert h.client.closing and not h.down.queue
    assert h.sent_upstream() == [b"", b""]  # not one byte of the second chunk
    assert [t.closing for _, t in h.upstreams] == [False, True]


async def test_a_refused_h2c_upgrade_goes_out_plain_with_its_body_then_the_next_request() -> None:
    h = Harness()
    h.down.data_received(
        b"POST /up HTTP/1.1\r\nHost: shop.example\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 5\r\n\r\nhello"
        + get("/next")
    )
    assert [ex.target for ex in h.down.queue] == [b"/up", b"/next"]
    assert b"".join(h.sent_upstream()) == (
        b"POST /up HTTP/1.1\r\nhost: shop.example\r\ncontent-length: 5\r\n"
        b"x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n"
        b"x-forwarded-host: shop.example\r\nvia: 1.1 graygate\r\n\r\nhello"
    )
    deliver(h.answering(), ok(b"one"))
    assert h.client.take().endswith(b"\r\n\r\none")
    assert b"".join(h.sent_upstream()).startswith(b"GET /next HTTP/1.1\r\n")
    deliver(h.answering(), ok(b"two"))
    assert h.client.take().endswith(b"\r\n\r\ntwo") and not h.client.closing


async def test_a_websocket_upgrade_holds_the_bytes_after_it_until_the_101() -> None:
    h = Harness()
    h.down.data_received(
        b"GET /ws HTTP/1.1\r\nHost: shop.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nEARLY"
    )
    assert h.down.queue[0].early == b"EARLY"
    assert h.client.paused and h.down.paused == h.down.PAUSE_UPGRADE
    assert b"".join(h.sent_upstream()).endswith(b"connection: upgrade\r\n\r\n")
    deliver(
        h.answering(),
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nup",
    )
    assert h.client.take().endswith(b"connection: upgrade\r\n\r\nup")
    assert b"".join(h.sent_upstream()) == b"EARLY" and not h.client.paused
    h.down.data_received(b"GET / HTTP/1.1\r\n\r\n")  # tunnel bytes now, never parsed
    assert b"".join(h.sent_upstream()) == b"GET / HTTP/1.1\r\n\r\n"


async def test_connection_close_answers_that_request_and_parses_nothing_after_it() -> None:
    h = Harness()
    h.down.data_received(
        b"GET /a HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n" + get("/b")
    )
    assert [ex.target for ex in h.down.queue] == [b"/a"]
    deliver(h.answering(), ok(b"a"))
    assert h.client.take().endswith(b"connection: close\r\n\r\na")
    assert h.client.closing


async def test_a_body_that_stops_arriving_is_a_408_after_the_client_body_timeout() -> None:
    h = Harness()
    h.down.data_received(b"POST / HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 10\r\n\r\nhel")
    assert b"".join(h.sent_upstream()).endswith(b"\r\n\r\nhel")
    loop = asyncio.get_running_loop()
    h.down.check(loop.time() + h.gw.config.timeouts.client_header + 0.01)  # the body's bound
    assert h.client.take() == b""
    h.down.check(loop.time() + h.gw.config.timeouts.client_body + 0.01)
    assert h.client.take() == refusal(
        h,
        b"408 Request Timeout",
        b"client_timeout",
        b"408 Request Timeout: request not received in time\n",
    )
    assert h.client.closing and [t.closing for _, t in h.upstreams] == [False, True]


async def test_a_half_close_mid_body_drops_the_request_and_closes() -> None:
    h = Harness()
    h.down.data_received(b"POST / HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 10\r\n\r\nhel")
    ex = h.down.queue[0]
    assert h.down.eof_received() is True  # plain TCP: keep the transport to write
    assert ex.ended and not h.down.queue and h.client.take() == b""
    assert h.client.closing and [t.closing for _, t in h.upstreams] == [False, True]


async def test_repeated_cookie_and_connection_fields_are_joined_for_the_exchange() -> None:
    h = Harness()
    h.down.data_received(
        b"GET / HTTP/1.1\r\nHost: shop.example\r\nCookie: a=1\r\nCookie: b=2\r\n"
        b"Connection: keep-alive\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n"
    )
    ex = h.down.queue[0]
    assert (ex.cookie, ex.connection, ex.host) == ("a=1; b=2", b"keep-alive,x-hop", "shop.example")
    assert b"x-hop" not in b"".join(h.sent_upstream())


async def test_a_second_host_or_an_invalid_one_is_a_400() -> None:
    for fields, why in (
        (b"Host: shop.example\r\nHost: other\r\n", b"more than one Host header"),
        (b"Host: shop example\r\n", b"invalid Host header"),
    ):
        h = Harness()
        h.down.data_received(b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
        answer = h.client.take()
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert answer.endswith(b"\r\n\r\n400 Bad Request: " + why + b"\n")
        assert h.client.closing and h.sent_upstream() == [b"", b""]


class QueuingTransport(FakeTransport):
    """A client transport that queues what it is given, views included, uncopied: as
    uvloop's does when the socket takes less than a write."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[bytes | memoryview] = []

    def write(self, data: bytes | memoryview) -> None:  # type: ignore[override]
        self.queue.append(data)

    def writelines(self, parts: Any) -> None:
        self.queue.extend(parts)

    def get_write_buffer_size(self) -> int:
        return sum(len(p) for p in self.queue)

    def sent(self) -> bytes:
        return b"".join(bytes(p) for p in self.queue)


def big(fill: int, size: int = 3 * READ_BUFFER) -> bytes:
    """A body whose bytes tell where they are: a reused buffer would show in it."""
    return bytes((fill + i // 4096) % 251 for i in range(size))


async def test_a_large_body_is_relayed_as_views_of_the_read_buffer_without_a_copy() -> None:
    h = Harness()
    h.down.data_received(get("/a"))
    body = big(0)
    before = READS.buf
    deliver(h.answering(), ok(body))
    answer = h.client.take()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(body)
    assert READS.buf is before  # the client took every write at once: the buffer stays


async def test_a_view_the_client_keeps_queued_makes_the_next_read_use_a_new_buffer() -> None:
    h = Harness()
    h.down.transport = h.client = QueuingTransport()  # nothing leaves: every view stays queued
    h.down.data_received(get("/a") + get("/b"))
    first, second = big(1), big(2)
    before = READS.buf
    deliver(h.answering(), ok(first))
    assert READS.buf is not before  # renewed: the queued views still point into the old one
    deliver(h.answering(), ok(second))  # while every view of the first is still queued
    sent = h.client.sent()
    assert sent.count(b"HTTP/1.1 200 ") == 2
    assert sent.split(b"\r\n\r\n", 1)[1].startswith(first)
    assert sent.endswith(second)


async def test_the_response_parser_goes_on_with_the_next_answer_on_its_connection() -> None:
    h = Harness(idle=1)
    (conn, _) = h.upstreams[0]
    h.down.data_received(get("/a"))
    deliver(conn, ok(b"one"))
    assert h.client.take().endswith(b"one")
    relay = conn.reader
    assert isinstance(relay, Relay) and relay.to is None  # left for the next attempt, idle
    h.down.data_received(get("/b"))
    assert relay.to is not None  # the next attempt took it
    deliver(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n")
    assert h.client.take().endswith(b"3\r\ntwo\r\n0\r\n\r\n")
    assert conn.reader is relay  # parsed whole again: kept


async def test_a_body_relayed_past_the_parser_restarts_it_for_the_next_answer() -> None:
    h = Harness(idle=1)
    (conn, _) = h.upstreams[0]
    h.down.data_received(get("/a"))
    deliver(conn, ok(big(3, READ_BUFFER)))  # relayed as views: llhttp never saw its end
    relay = conn.reader
    assert isinstance(relay, Relay) and relay.to is None  # restarted in place and kept
    h.down.data_received(get("/b"))
    # Chunk sizes with spaces after them: the leniency is set again on the restarted parser.
    deliver(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4 \r\nnext\r\n0\r\n\r\n")
    answer = h.client.take()
    assert answer.count(b"HTTP/1.1 200 ") == 2 and answer.endswith(b"4\r\nnext\r\n0\r\n\r\n")
    assert conn.reader is relay  # parsed whole: kept again


async def test_a_relayed_body_with_bytes_past_its_length_leaves_no_parser() -> None:
    h = Harness(idle=1)
    (conn, _) = h.upstreams[0]
    h.down.data_received(get("/a"))
    deliver(conn, ok(big(4, READ_BUFFER)) + b"junk")  # more than Content-Length: an overrun
    assert h.client.take().endswith(big(4, READ_BUFFER))
    assert conn.reader is None and conn.closed  # the connection is not reused
