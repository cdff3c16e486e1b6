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
from proxy.dataplane.upstream import UpstreamConnection
from tests.helpers import FakeTransport


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n".encode()


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Harness:
    """A gateway with one route whose only endpoint has `idle` fake pooled connections."""

    def __init__(self, idle: int = 2) -> None:
        route = {
            "name": "shop",
            "versions": {"blue": {"endpoints": ["http://127.0.0.1:9"]}},
            "stable": "blue",
            "weights": {"blue": 100},
        }
        cfg = parse_config({"listen": "127.0.0.1:0", "routes": [route]}, env={})
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
    h.answering().data_received(ok(b"first"))
    first = h.client.take()
    assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"first")
    assert b"".join(h.sent_upstream()).startswith(b"GET /b ")  # started after the first
    h.answering().data_received(ok(b"second"))
    assert h.client.take().endswith(b"second")
    assert not h.down.queue and not h.client.closing


async def test_keep_alive_reuses_the_connection_and_its_upstream() -> None:
    h = Harness()
    for path in ("/one", "/two"):
        h.down.data_received(get(path))
        conn = h.answering()
        conn.data_received(ok(path.encode()))
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
    h.answering().data_received(ok(b"x"))  # one answered: below the limit again
    assert not h.client.paused and h.down.paused == 0
