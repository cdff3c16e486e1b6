"""Micro-benchmark of the data plane's Python cost per request, without sockets.

A fake client transport feeds requests to DownstreamProtocol; a fake upstream connection
answers each one from memory. What remains is graygate's own per-request work (parsing
callbacks, routing, header rewriting, stats). Run: python -m benchmarks.micro_proxy [N]
(two passes of N requests, without and with stickiness; `make perf-count` counts them).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from proxy.core.config.load import parse_config
from proxy.core.state import PolicyStore
from proxy.core.stats import Stats
from proxy.dataplane.downstream import DownstreamProtocol
from proxy.dataplane.gateway import Gateway
from proxy.dataplane.upstream import UpstreamConnection

REQUEST = (
    b"GET /api/items?id=42 HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: wrk\r\n"
    b"Accept: */*\r\nCookie: gg_uid=bench-user-0001\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 10:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
)


class FakeTransport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written = 0
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, parts: Any) -> None:
        for p in parts:
            self.written += len(p)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        """Nothing arrives on a fake transport, so there is nothing to pause."""

    def resume_reading(self) -> None:
        """See pause_reading."""


def config(sticky: bool) -> Any:
    route: dict[str, Any] = {
        "name": "bench",
        "versions": {
            "blue": {"endpoints": ["http://127.0.0.1:9"]},
            "green": {"endpoints": ["http://127.0.0.1:10"]},
        },
        "stable": "blue",
        "weights": {"blue": 90, "green": 10},
    }
    if sticky:
        route["sticky"] = {"keys": ["header:X-User-Id"]}
    return parse_config({"listen": "127.0.0.1:0", "routes": [route]}, env={})


async def main(n: int) -> None:
    for sticky in (False, True):
        cfg = config(sticky)
        store = PolicyStore(cfg)
        gw = Gateway(cfg, store, Stats.from_config(cfg), asyncio.get_running_loop())
        pools = [p for p in gw.upstreams.pools()]
        for pool in pools:
            conn = UpstreamConnection(pool)
            conn.connection_made(FakeTransport(("127.0.0.1", 9)))  # type: ignore[arg-type]
            pool.conns.add(conn)
            pool.open += 1
            pool.idle.append(conn)
        down = DownstreamProtocol(gw)
        down.connection_made(FakeTransport(("127.0.0.1", 50000)))  # type: ignore[arg-type]
        size = len(RESPONSE)
        t0 = time.perf_counter()
        for _ in range(n):
            down.data_received(REQUEST)
            attempt = down.queue[0].attempt
            assert attempt is not None
            upstream = attempt.conn
            assert upstream is not None
            # What the loop does for a BufferedProtocol: the read lands in its buffer.
            upstream.get_buffer(size)[:size] = RESPONSE
            upstream.buffer_updated(size)
        dt = time.perf_counter() - t0
        # n=0 is the baseline of `make perf-count`: everything but the requests.
        per = f"{dt / n * 1e6:.2f} us per request" if n else "no requests"
        print(f"sticky={sticky}: {per} (n={n})")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50000))
