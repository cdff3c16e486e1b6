"""One exchange: read the policy snapshot once, choose the version and endpoint, hand the
request to an upstream attempt (attempt.py), retry or fail over, record the outcome once.
Answers graygate's own responses (errors, no route, Max-Forwards: 0). Talks to the client
connection only through `Client`; never parses responses, never opens connections.
"""

from __future__ import annotations

import logging
import secrets
from abc import abstractmethod
from random import random
from time import perf_counter
from typing import Final

from proxy.core.headers import XFF, Headers, client_address, request_head
from proxy.core.responses import LocalAnswer, max_forwards
from proxy.core.router import cookies_of, match, pick
from proxy.core.stats import VersionStats
from proxy.dataplane.attempt import Attempt
from proxy.dataplane.feed import ClientSide, RequestFeed
from proxy.dataplane.gateway import Gateway, RouteRuntime
from proxy.dataplane.upstream import EndpointPool, UpstreamError, VersionPool

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("graygate.access")  # per-request lines, off by default

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
EMPTY: Final[dict[str, str]] = {}
MAX_FORWARDS_METHODS: Final = frozenset({b"OPTIONS", b"TRACE"})


class Client(ClientSide):
    """The client connection as an exchange sees it (downstream.DownstreamProtocol)."""

    __slots__ = ("client_ip", "client_ip_bytes", "scheme", "trusted")
    client_ip: str
    client_ip_bytes: bytes
    trusted: bool  # the peer is a trusted proxy: its X-Forwarded-For counts
    scheme: bytes  # b"https" on a TLS listener

    @abstractmethod
    def start_tunnel(self, ex: Exchange) -> None: ...
    @abstractmethod
    def finished(self, ex: Exchange) -> None: ...


def mint_uid() -> str:
    return secrets.token_hex(16)


class Exchange(RequestFeed[Client]):
    """A request whose head has been parsed; start() answers it exactly once, then end()
    hands the connection back to the client side (Client.finished)."""

    __slots__ = (
        "connection",
        "cookie",
        "cookie_extra",
        "ep",
        "error",
        "has_body",
        "host",
        "path",
        "reason",
        "retries",
        "rr",
        "started",
        "target",
        "tried",
        "version",
        "vpool",
        "vstats",
    )

    def __init__(
        self,
        client: Client,
        gw: Gateway,
        method: bytes,
        target: bytes,
        path: str,
        host: str,
        headers: Headers,
        connection: bytes | None,
        cookie: str,
        http11: bool,
        keep_alive: bool,
        body: bool,
        chunked: bool,
        upgrade: bool,
        error: LocalAnswer | None = None,
    ) -> None:
        self.client = client
        self.gw = gw
        self.method = method
        self.target = target
        self.path = path
        self.host = host
        self.headers = headers
        self.connection = connection  # the client's Connection value
        self.cookie = cookie
        self.http11 = http11
        self.keep_alive = keep_alive
        self.has_body = body
        self.chunked = chunked
        self.upgrade = upgrade
        self.error = error  # answered locally with this
        self.body_done = not body
        self.body_seen = 0
        self.pending = []
        self.pending_bytes = 0
        self.early = b""  # bytes after an upgrade request, for the tunnel
        self.extra = ()
        self.version = ""
        self.reason = ""
        self.rr: RouteRuntime | None = None
        self.cookie_extra: tuple[tuple[bytes, bytes], ...] = ()
        self.ended = False
        self.head_sent = False  # the response head went to the client
        self.head = b""
        self.vpool: VersionPool | None = None
        self.vstats: VersionStats | None = None  # counted in its inflight while set
        self.ep: EndpointPool | None = None  # counted in ep.outstanding while set
        self.tried: list[EndpointPool] = []
        self.retries = 0
        self.attempt = None
        self.started = 0.0
        self.deadline = 0.0
        self.shadow = None  # the mirrored copy (dataplane/mirror.py)

    # -- choosing ---------------------------------------------------------------------------
    def start(self) -> None:
        """Answer this request: locally (errors, no route) or through an upstream."""
        if self.error is not None:
            self.respond_local(self.error)
            self.end(self.error.status)
            return
        if self.method in MAX_FORWARDS_METHODS:
            forwards = max_forwards(self.method, self.target, self.headers)
            if forwards is not None:
                self.respond(200, *forwards)
                self.end(200)
                return
        gw = self.gw
        self.started = perf_counter()
        rt = gw.runtime
        route = match(rt.views, self.host, self.path)
        if route is None:
            self.respond_local(LocalAnswer(404, "no_route", "no route matches this request"))
            self.end(404)
            return
        rr = rt.routes[route.name]
        headers_map = EMPTY
        if rr.header_keys:
            keys = rr.header_keys
            headers_map = {
                k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers if k in keys
            }
        cookies = cookies_of(self.cookie) if route.needs_cookies and self.cookie else EMPTY
        choice = pick(route, headers_map, cookies, random(), mint_uid)
        version = choice.version
        reason: str = choice.reason
        if choice.new_cookie is not None:
            cookie = rr.cookie_prefix + choice.new_cookie.encode() + rr.cookie_suffix
            self.extra = ((b"set-cookie", cookie),)
        now = gw.loop.time()
        self.rr = rr
        self.cookie_extra = self.extra
        ep = self.use_version(version, reason, now)
        if ep is None and rr.failover and version != route.stable:
            self.leave_version(503, 0.0)  # the chosen version failed this one
            ep = self.use_version(route.stable, "failover", now)
        if ep is None:
            answer = LocalAnswer(503, "no_endpoint", f"no available endpoint for version {version}")
            self.respond_local(answer)
            self.end(503)
            return
        self.retries = rr.retries
        self.deadline = now + gw.request_timeout
        client = self.client
        self.head = request_head(
            self.method,
            self.target,
            self.headers,
            self.connection,
            client.client_ip_bytes,
            client.trusted,
            gw.via if self.http11 else gw.via10,
            ep.host_header,
            self.upgrade,
            self.chunked,
            gw.replace_for,
            client.scheme,
        )
        if rr.mirror is not None:
            self.shadow = rr.mirror.copy(self)
        self.forward(ep)

    def use_version(self, version: str, reason: str, now: float) -> EndpointPool | None:
        """The one place a version's inflight count is entered; leave_version leaves it."""
        rr = self.rr
        assert rr is not None
        self.version = version
        self.reason = reason
        self.extra = self.cookie_extra + rr.version_headers[version]
        self.vstats = vstats = rr.stats[version]
        vstats.inflight += 1
        self.vpool = vpool = rr.pools[version]
        self.tried = []
        return vpool.pick(now)

    def leave_version(self, status: int, duration: float) -> None:
        vstats = self.vstats
        if vstats is not None:
            self.vstats = None
            vstats.inflight -= 1
            vstats.record(status, self.reason, duration)

    def forward(self, ep: EndpointPool) -> None:
        self.ep = ep
        ep.outstanding += 1
        self.attempt = Attempt(self, self.client, self.gw, ep)

    def drop_endpoint(self) -> None:
        ep = self.ep
        if ep is not None:
            ep.outstanding -= 1
            self.ep = None

    # -- the attempt's outcomes (sides.Owner) -------------------------------------------------
    def attempt_done(self, status: int) -> None:
        """The response went to the client whole."""
        ep = self.ep
        if ep is not None:
            if status >= 500:
                assert self.vpool is not None
                ep.failed(self.gw.loop.time(), self.vpool.endpoints)
            else:
                ep.succeeded()
        self.end(status)

    def attempt_failed(self, exc: UpstreamError, retry_safe: bool) -> None:
        """The upstream failed after the request was (partly) sent."""
        ep = self.ep
        if ep is not None and retry_safe and not self.has_body and self.method in IDEMPOTENT:
            # A pooled connection the upstream had already closed: try once more afresh.
            self.drop_endpoint()
            self.forward(ep)
            return
        assert self.vstats is not None
        self.vstats.upstream_error(exc.kind if exc.kind != "unavailable" else "connect")
        if ep is not None and exc.kind != "timeout":
            assert self.vpool is not None
            ep.failed(self.gw.loop.time(), self.vpool.endpoints)
        self.drop_endpoint()
        self.error_out(exc)

    def connect_failed(self, ep: EndpointPool, exc: UpstreamError) -> None:
        self.drop_endpoint()
        assert self.vstats is not None and self.vpool is not None
        if exc.kind != "unavailable":
            self.vstats.upstream_error("timeout" if exc.kind == "timeout" else "connect")
            ep.failed(self.gw.loop.time(), self.vpool.endpoints)
        self.tried.append(ep)
        now = self.gw.loop.time()
        if exc.retryable and len(self.tried) <= self.retries and now < self.deadline:
            nxt = self.vpool.pick(now, tuple(self.tried))
            if nxt is not None:
                self.forward(nxt)
                return
        rr = self.rr
        assert rr is not None
        stable = rr.policy.stable
        if exc.retryable and rr.failover and self.version != stable and now < self.deadline:
            # Nothing was sent: serve from stable, and count it against the chosen version.
            self.leave_version(exc.status, perf_counter() - self.started)
            fallback = self.use_version(stable, "failover", now)
            if fallback is not None:
                self.forward(fallback)
                return
        self.error_out(exc)

    def overrun(self) -> None:
        if self.vstats is not None:
            self.vstats.upstream_error("protocol")

    def error_out(self, exc: UpstreamError) -> None:
        if self.head_sent:
            self.client.abort()  # cut mid-response: the client must see a truncated answer
            self.end(502)
        else:
            status = exc.status
            self.respond_local(LocalAnswer(status, exc.kind, exc.detail))
            self.end(status)

    def tunnel_started(self) -> None:
        self.client.start_tunnel(self)

    # -- endings -----------------------------------------------------------------------------
    def client_lost(self, status: int = 499) -> None:
        if self.ended:
            return
        if self.attempt is not None:
            self.attempt.abandon()
        self.end(status)

    def end(self, status: int) -> None:
        if self.ended:
            return
        self.ended = True
        self.drop_endpoint()
        a = self.attempt
        if a is not None:
            # The parser's relay points at the attempt, the attempt at us: break both
            # cycles now rather than leave them to the garbage collector (a no-op when
            # the attempt's own ending has let the parser go already).
            a.let_go(None, False)
            self.attempt = None
        self.pending = []
        if self.shadow is not None:  # the primary's head is the attempt's final one
            done = a is not None and (a.complete or a.until_close) and a.status == status
            self.shadow.primary_end(done, a.status if a else 0, a.resp_headers if a else [])
            self.shadow = None
        self.leave_version(status, perf_counter() - self.started)
        if self.gw.access_log:
            log_access(self, status)
        self.client.finished(self)

    # -- the tunnel's end, from the client side -----------------------------------------------
    def tunnel_close(self) -> None:
        if self.attempt is not None:
            self.attempt.tunnel_close()
        self.drop_endpoint()
        self.end(101)


def log_access(ex: Exchange, status: int) -> None:
    # No headers, cookies or tokens: only what identifies the exchange.
    rr = ex.rr
    client = ex.client.client_ip
    if ex.client.trusted:  # behind a trusted proxy: the client it names (README, "addresses")
        chain = [v for n, v in ex.headers if n == XFF]
        client = client_address(client, chain, ex.gw.trusted)
    # One mapping argument: the text line is formatted from it, and --log-format json
    # emits its keys as fields.
    access_logger.info(
        "%(client)s %(method)s %(path)s %(status)d route=%(route)s version=%(version)s "
        "reason=%(reason)s %(duration_ms).1fms",
        {
            "client": client,
            "method": ex.method.decode("latin-1"),
            "path": ex.path,
            "status": status,
            "route": rr.policy.name if rr is not None else "-",
            "version": ex.version or "-",
            "reason": ex.reason or "-",
            "duration_ms": round((perf_counter() - ex.started) * 1000, 3) if ex.started else 0.0,
        },
    )
