"""One request/response exchange: read the policy snapshot once, choose the version and
endpoint, forward the head, pump bodies both ways with flow control, record the outcome
once. Owns the mapping of upstream failures to 502/503/504 (the only place it happens).
Data plane: no aiohttp. downstream.py owns the client connection and parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass
from random import random
from typing import TYPE_CHECKING

import httptools

from proxy.headers import Headers, forwarding, response_via, serialize, strip_hop_by_hop
from proxy.router import choose, match_route, parse_cookies
from proxy.state import RoutePolicy, RoutingPolicy
from proxy.stats import Stats, VersionStats
from proxy.upstream import EndpointPool, UpstreamConnection, UpstreamError, Upstreams, VersionPool

if TYPE_CHECKING:
    from proxy.downstream import DownstreamProtocol, Gateway

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
NO_BODY_STATUS = frozenset({204, 304})
EMPTY: dict[str, str] = {}
REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    499: b"Client Closed Request",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
BODY_BUFFER_LIMIT = 256 * 1024  # request body held while the upstream connection opens


def mint_uid() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class RouteRuntime:
    """Everything the hot path needs for one route, resolved once per policy snapshot."""

    policy: RoutePolicy
    pools: dict[str, VersionPool]
    stats: dict[str, VersionStats]
    header_keys: frozenset[bytes]  # request headers the router reads
    version_headers: dict[str, tuple[tuple[bytes, bytes], ...]]
    cookie_prefix: bytes  # b"gg_uid="
    cookie_suffix: bytes  # b"; Path=/; Max-Age=...; HttpOnly; SameSite=Lax"
    failover: bool
    retries: int


@dataclass(frozen=True, slots=True)
class Runtime:
    policy: RoutingPolicy
    routes: dict[str, RouteRuntime]


def build_runtime(policy: RoutingPolicy, upstreams: Upstreams, stats: Stats) -> Runtime:
    routes: dict[str, RouteRuntime] = {}
    vh = policy.config.version_header
    for rp in policy.routes:
        cfg = rp.config
        keys = {f.name.encode("latin-1") for f in rp.force if f.kind == "header"}
        prefix = suffix = b""
        if cfg.sticky is not None:
            keys |= {k.name.encode("latin-1") for k in cfg.sticky.keys if k.kind == "header"}
            c = cfg.sticky.cookie
            prefix = c.name.encode() + b"="
            suffix = f"; Path={c.path}; Max-Age={int(c.max_age)}; HttpOnly; SameSite=Lax".encode()
            if c.secure:
                suffix += b"; Secure"
        names = cfg.version_names
        routes[rp.name] = RouteRuntime(
            policy=rp,
            pools=upstreams.versions[rp.name],
            stats={v: stats.get(rp.name, v) for v in names},
            header_keys=frozenset(keys),
            version_headers={
                v: (((vh.lower().encode("latin-1"), v.encode()),) if vh else ()) for v in names
            },
            cookie_prefix=prefix,
            cookie_suffix=suffix,
            failover=cfg.failover,
            retries=cfg.retries,
        )
    return Runtime(policy, routes)


class ClientGone(Exception):
    pass


class Exchange:
    """A request whose head has been parsed; run() answers it exactly once."""

    def __init__(
        self,
        down: DownstreamProtocol,
        method: bytes,
        target: bytes,
        path: str,
        host: str,
        headers: Headers,
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
        self.cookie = cookie
        self.http11 = http11
        self.keep_alive = keep_alive
        self.has_body = body
        self.chunked = chunked
        self.upgrade = upgrade
        self.error = error  # answer locally with this (status, code, message)
        self.body_done = not body  # the whole request body has been read
        self.pending: list[bytes] = []  # request body before the upstream connection exists
        self.pending_bytes = 0
        self.body_seen = 0  # decoded body bytes of a chunked request, for max_body_bytes
        self.conn: UpstreamConnection | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.done: asyncio.Future[int] | None = None
        self.out: list[bytes] = []  # response bytes gathered during one feed
        self.head_sent = False  # the response head went to the client
        self.got_bytes = False  # anything at all came back from the upstream
        self.status = 0
        self.resp_reason = b""
        self.resp_headers: Headers = []
        self.resp_chunked_out = False
        self.until_close = False
        self.complete = False
        self.upstream_reads_paused = False
        self.last_io = 0.0
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.version = ""
        self.extra_headers: tuple[tuple[bytes, bytes], ...] = ()
        self.tunnel = False
        self.early: bytes = b""  # bytes after an upgrade request, for the tunnel

    # -- request body, fed by downstream --------------------------------------------------
    def request_body(self, data: bytes) -> None:
        conn = self.conn
        frame = (b"%x\r\n" % len(data), data, b"\r\n") if self.chunked else (data,)
        if conn is not None and conn.transport is not None and self.done is not None:
            self.last_io = self.gw.loop.time()
            conn.transport.writelines(frame)
            return
        self.pending.extend(frame)
        self.pending_bytes += len(data)
        if self.pending_bytes > BODY_BUFFER_LIMIT:
            self.down.pause_reading(self.down.PAUSE_BUFFER)

    def request_end(self) -> None:
        self.body_done = True
        if self.chunked:
            if self.conn is not None and self.conn.transport is not None and self.done is not None:
                self.conn.transport.write(b"0\r\n\r\n")
            else:
                self.pending.append(b"0\r\n\r\n")

    # -- the exchange -----------------------------------------------------------------------
    async def run(self) -> None:
        gw = self.gw
        down = self.down
        if self.error is not None:
            status, code, message = self.error
            down.respond_local(self, status, code, message)
            return
        started = time.perf_counter()
        rt = gw.runtime
        route = match_route(rt.policy, self.host, self.path)
        if route is None:
            down.respond_local(self, 404, "no_route", "no route matches this request")
            return
        rr = rt.routes[route.name]
        headers_map = EMPTY
        if rr.header_keys:
            headers_map = {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in self.headers
                if k in rr.header_keys
            }
        cookies = parse_cookies(self.cookie) if route.needs_cookies and self.cookie else EMPTY
        choice = choose(route, headers_map, cookies, random(), mint_uid)
        version = choice.version
        reason: str = choice.reason
        if choice.new_cookie is not None:
            self.extra_headers = (
                (b"set-cookie", rr.cookie_prefix + choice.new_cookie.encode() + rr.cookie_suffix),
            )
        loop = gw.loop
        now = loop.time()
        vpool = rr.pools[version]
        ep = vpool.pick(now)
        if ep is None and rr.failover and version != route.stable:
            rr.stats[version].record(503, reason, 0.0)  # the chosen version failed this one
            version, reason = route.stable, "failover"
            vpool = rr.pools[version]
            ep = vpool.pick(now)
        self.version = version
        self.extra_headers += rr.version_headers[version]
        vstats = rr.stats[version]
        if ep is None:
            vstats.record(503, reason, time.perf_counter() - started)
            down.respond_local(
                self, 503, "no_endpoint", f"no available endpoint for version {version}"
            )
            return
        vstats.inflight += 1
        try:
            status = await self.forward(route, vpool, ep, vstats, rr.retries)
        except UpstreamError as exc:
            status = exc.status
            if self.head_sent:
                status = 502  # cut mid-response: the client saw a broken answer
                down.abort()
            else:
                down.respond_local(self, exc.status, exc.kind, exc.detail)
        except ClientGone:
            status = 499
        finally:
            vstats.inflight -= 1
        vstats.record(status, reason, time.perf_counter() - started)

    async def forward(
        self,
        route: RoutePolicy,
        vpool: VersionPool,
        ep: EndpointPool,
        vstats: VersionStats,
        retries: int,
    ) -> int:
        gw = self.gw
        loop = gw.loop
        timeouts = gw.config.timeouts
        self.deadline = loop.time() + timeouts.request
        tried: list[EndpointPool] = []
        head = self.upstream_head(ep)
        stale_retry = self.method in IDEMPOTENT and not self.has_body
        while True:
            ep.outstanding += 1
            try:
                try:
                    conn, reused = await ep.acquire(
                        min(timeouts.connect, max(0.0, self.deadline - loop.time()))
                    )
                except UpstreamError as exc:
                    vstats.upstream_error("timeout" if exc.kind == "timeout" else "connect")
                    ep.failed(loop.time(), vpool.endpoints)
                    tried.append(ep)
                    nxt = None
                    if len(tried) <= retries and loop.time() < self.deadline:
                        nxt = vpool.pick(loop.time(), tuple(tried))
                    if nxt is None:
                        raise
                    ep = nxt
                    continue
                if self.down.closed:
                    ep.release(conn, True)
                    raise ClientGone()
                try:
                    status = await self.exchange_on(conn, head)
                except UpstreamError as exc:
                    ep.release(conn, False)
                    if exc.retryable and reused and stale_retry and not self.got_bytes:
                        continue  # a pooled connection the upstream had closed: try a fresh one
                    vstats.upstream_error(exc.kind)
                    if exc.kind != "timeout":
                        ep.failed(loop.time(), vpool.endpoints)
                    raise
                except ClientGone:
                    ep.release(conn, False)
                    raise
                if status >= 500:
                    ep.failed(loop.time(), vpool.endpoints)
                else:
                    ep.succeeded()
                return status
            finally:
                ep.outstanding -= 1

    def upstream_head(self, ep: EndpointPool) -> bytes:
        gw = self.gw
        headers = strip_hop_by_hop(self.headers, keep_upgrade=self.upgrade)
        host = b""
        for name, value in headers:
            if name == b"host":
                host = value
                break
        else:
            host = f"{ep.endpoint.host}:{ep.endpoint.port}".encode()
            headers.append((b"host", host))
        if self.chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        down = self.down
        headers = forwarding(headers, down.client_ip, host, down.trusted, gw.via)
        return serialize(self.method + b" " + self.target + b" HTTP/1.1\r\n", headers)

    async def exchange_on(self, conn: UpstreamConnection, head: bytes) -> int:
        loop = self.gw.loop
        self.conn = conn
        conn.user = self
        self.parser = httptools.HttpResponseParser(self)
        self.resp_headers = []
        self.got_bytes = False
        self.done = fut = loop.create_future()
        transport = conn.transport
        assert transport is not None
        self.last_io = loop.time()
        if self.pending:
            transport.writelines([head, *self.pending])
            self.pending = []
            self.pending_bytes = 0
            self.down.resume_reading(self.down.PAUSE_BUFFER)
        else:
            transport.write(head)
        self.arm_timer()
        try:
            status: int = await fut
            return status
        finally:
            self.disarm_timer()
            self.done = None

    # -- timers: one lazy handle, re-armed only when it fires --------------------------------
    def arm_timer(self) -> None:
        timeouts = self.gw.config.timeouts
        due = self.last_io + timeouts.read
        if not self.head_sent:
            due = min(due, self.deadline)
        self.timer = self.gw.loop.call_at(due, self.on_timer)

    def disarm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def on_timer(self) -> None:
        self.timer = None
        if self.done is None or self.done.done():
            return
        now = self.gw.loop.time()
        read = self.gw.config.timeouts.read
        if now - self.last_io >= read:
            self.fail(UpstreamError("timeout", 504, f"upstream sent nothing for {read:g}s"))
        elif not self.head_sent and now >= self.deadline:
            self.fail(UpstreamError("timeout", 504, "upstream did not answer within the deadline"))
        else:
            self.arm_timer()

    # -- upstream side: ConnectionUser + httptools callbacks ----------------------------------
    def upstream_data(self, data: bytes) -> None:
        if self.tunnel:
            self.down.send(data)
            return
        parser = self.parser
        if parser is None or self.done is None:
            return
        self.got_bytes = True
        self.last_io = self.gw.loop.time()
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.flush()
            if self.status == 101 and self.upgrade:
                self.start_tunnel(data[exc.args[0] :])
                return
            self.fail(UpstreamError("protocol", 502, "unexpected protocol switch from upstream"))
            return
        except httptools.HttpParserError as exc:
            self.flush()
            self.fail(UpstreamError("protocol", 502, f"invalid response from upstream: {exc}"))
            return
        self.flush()
        if self.complete:
            self.finish()

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.tunnel:
            self.down.close()
            self.resolve(101)
            return
        if self.done is None or self.done.done():
            return
        if self.until_close and self.head_sent:
            if self.resp_chunked_out:
                self.down.send(b"0\r\n\r\n")
            self.complete = True
            self.keep_alive = self.keep_alive and self.resp_chunked_out
            self.finish(reusable=False)
            return
        if not self.got_bytes:
            self.fail(UpstreamError("reset", 502, "upstream closed the connection", True))
        else:
            self.fail(UpstreamError("reset", 502, "upstream closed the connection mid-response"))

    def upstream_pause_writing(self) -> None:
        self.down.pause_reading(self.down.PAUSE_UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self.down.resume_reading(self.down.PAUSE_UPSTREAM)

    def on_status(self, reason: bytes) -> None:
        self.resp_reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.resp_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        self.status = status
        if 100 <= status < 200 and status != 101:
            # Interim responses (100 Continue, 103 Early Hints) go to HTTP/1.1 clients as-is.
            if self.http11:
                head = serialize(b"HTTP/1.1 %d %s\r\n" % (status, self.resp_reason), [])
                self.out.append(head)
            self.resp_headers = []
            return
        headers = self.resp_headers
        cl = te = False
        for name, _ in headers:
            if name == b"content-length":
                cl = True
            elif name == b"transfer-encoding":
                te = True
        no_body = self.method == b"HEAD" or status in NO_BODY_STATUS
        if status == 101:
            headers = strip_hop_by_hop(headers, keep_upgrade=True)
        else:
            headers = strip_hop_by_hop(headers)
        if not no_body and status != 101 and (te or not cl):
            self.until_close = not te
            if self.http11:
                self.resp_chunked_out = True
                headers.append((b"transfer-encoding", b"chunked"))
            else:
                self.keep_alive = False  # HTTP/1.0 client: the close delimits the body
        headers = response_via(headers, self.gw.via)
        headers.extend(self.extra_headers)
        down = self.down
        if status != 101:
            if not self.body_done or down.gw.draining:
                self.keep_alive = False
            if not self.keep_alive:
                headers.append((b"connection", b"close"))
            elif not self.http11:
                headers.append((b"connection", b"keep-alive"))
        self.out.append(serialize(b"HTTP/1.1 %d %s\r\n" % (status, self.resp_reason), headers))
        self.head_sent = True
        if no_body:
            self.complete = True

    def on_body(self, data: bytes) -> None:
        if self.resp_chunked_out:
            self.out.append(b"%x\r\n" % len(data))
            self.out.append(data)
            self.out.append(b"\r\n")
        else:
            self.out.append(data)

    def on_message_complete(self) -> None:
        if self.status < 200 and self.status != 101:
            return  # an interim response; the final one follows on the same parser
        if self.resp_chunked_out:
            self.out.append(b"0\r\n\r\n")
        self.complete = True

    def flush(self) -> None:
        out = self.out
        if out:
            self.down.send_all(out)
            self.out = []

    # -- endings -----------------------------------------------------------------------------
    def finish(self, reusable: bool = True) -> None:
        conn = self.conn
        parser = self.parser
        if conn is not None and reusable:
            reusable = (
                parser is not None
                and parser.should_keep_alive()
                and self.body_done
                and not self.until_close
                and self.method != b"HEAD"  # framing of a HEAD answer is unknown to the parser
            )
            if self.upstream_reads_paused and conn.transport is not None:
                conn.transport.resume_reading()
                self.upstream_reads_paused = False
        self.resolve_with_release(reusable)

    def resolve_with_release(self, reusable: bool) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.endpoint.release(conn, reusable)
        self.resolve(self.status)

    def resolve(self, status: int) -> None:
        fut = self.done
        if fut is not None and not fut.done():
            fut.set_result(status)

    def fail(self, exc: BaseException) -> None:
        fut = self.done
        conn = self.conn
        if conn is not None:
            conn.user = None
            conn.close()
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def client_lost(self) -> None:
        self.fail(ClientGone())

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
            conn.transport.resume_reading()

    # -- WebSocket and other upgrades: a byte tunnel once the upstream said 101 ---------------
    def start_tunnel(self, rest: bytes) -> None:
        self.tunnel = True
        self.disarm_timer()
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
        self.resolve(101)

    def cancel(self) -> None:
        with contextlib.suppress(Exception):
            self.fail(ClientGone())
