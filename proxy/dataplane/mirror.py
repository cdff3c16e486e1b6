"""Shadow traffic in the data plane (docs/mirroring.md): which requests are copied
(`RouteMirror.copy`), the copy that follows its exchange (`Copy`: body buffered, primary
captured, legs sent, compared once), and `Shadows`, which owns the shadow pools (an
Upstreams of their own, never the users'), the Mirrors counters and the noise floors.
"""

from __future__ import annotations

import asyncio
import time
from random import random
from typing import Protocol

from proxy.core.config.model import Config, MirrorConfig
from proxy.core.headers import Headers, request_head
from proxy.core.mirror import (
    ActiveMirror,
    Comparison,
    Mirrors,
    MirrorStats,
    Mismatch,
    NoiseFloor,
    compare,
)
from proxy.core.state import RoutePolicy
from proxy.dataplane.shadow import Leg, Recorder
from proxy.dataplane.upstream import Upstreams, VersionPool

SHADOW = (b"x-graygate-shadow", b"1")
FORCED = frozenset({"force_header", "force_cookie"})
PATH_KEPT = 200  # characters of the request path in the evidence


class Peer(Protocol):
    @property
    def client_ip_bytes(self) -> bytes: ...
    @property
    def trusted(self) -> bool: ...
    @property
    def scheme(self) -> bytes: ...


class Primary(Protocol):
    """What a copy reads of its exchange, once, when it is made."""

    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def path(self) -> str: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def connection(self) -> bytes | None: ...
    @property
    def http11(self) -> bool: ...
    @property
    def has_body(self) -> bool: ...
    @property
    def chunked(self) -> bool: ...
    @property
    def upgrade(self) -> bool: ...
    @property
    def pending(self) -> list[bytes]: ...
    @property
    def body_done(self) -> bool: ...
    @property
    def version(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def client(self) -> Peer: ...


def suffixed(host: bytes, suffix: bytes) -> bytes:
    """The suffix goes before any port, as Envoy's mirror does: a:8080 -> a-shadow:8080."""
    name, colon, port = host.rpartition(b":")
    if colon and port.isdigit() and not name.endswith(b":") and (b"]" in name or b":" not in name):
        return name + suffix + b":" + port
    return host + suffix


class Shadows:
    """The data plane's shadow side, owned by the Gateway: reconfigured and closed with it."""

    def __init__(self, config: Config, mirrors: Mirrors, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.mirrors = mirrors
        self.upstreams = Upstreams(config)  # separate EndpointPools: never a user's slot
        self.floors: dict[tuple[str, str], NoiseFloor] = {}
        self.live: set[Copy] = set()  # copies whose legs still run
        self.apply(config)

    def apply(self, config: Config) -> None:
        self.config = config
        self.via = f"1.1 {config.via}".encode()
        self.via10 = f"1.0 {config.via}".encode()
        self.replace_for = config.forwarded_for == "replace"

    def reconfigure(self, config: Config) -> None:
        self.apply(config)
        self.upstreams.reconfigure(config)
        self.mirrors.reconfigure(config)

    def route(self, rp: RoutePolicy) -> RouteMirror | None:
        """The route's mirror for one policy snapshot (None: not mirrored)."""
        am = rp.mirror
        if am is None:
            return None
        floor = None
        if am.config.noise == "stable":
            floor = self.floors.setdefault((rp.name, am.to), NoiseFloor())
        return RouteMirror(self, rp, am, floor)

    async def close(self) -> None:
        for copy in list(self.live):
            for leg in copy.legs:
                leg.finish("graygate shut down")
        await self.upstreams.close()


class RouteMirror:
    """One route's mirror in one snapshot: eligibility, and the copies it makes."""

    __slots__ = (
        "active",
        "config",
        "floor",
        "methods",
        "names",
        "route",
        "shadows",
        "stable",
        "stable_pool",
        "stats",
        "suffix",
        "target",
    )

    def __init__(
        self, shadows: Shadows, rp: RoutePolicy, am: ActiveMirror, floor: NoiseFloor | None
    ) -> None:
        cfg = am.config
        self.shadows = shadows
        self.route = rp.name
        self.active = am
        self.config: MirrorConfig = cfg
        self.methods = frozenset(m.encode() for m in cfg.methods)
        self.stats: MirrorStats = shadows.mirrors.get(rp.name, am.to)
        pools = shadows.upstreams.versions[rp.name]
        self.target: VersionPool = pools[am.to]
        self.stable = rp.stable
        self.stable_pool = pools[rp.stable] if floor is not None else None
        self.floor = floor
        self.suffix = cfg.host_suffix.encode() if cfg.host_suffix else b""
        rules = cfg.compare
        self.names = frozenset(h.encode() for h in rules.headers if h not in rules.ignore_headers)

    def copy(self, ex: Primary) -> Copy | None:
        """A copy of this request, or None when it is not eligible (not counted) or its
        body is declared too large (counted as dropped)."""
        if ex.method not in self.methods or ex.upgrade or ex.version == self.active.to:
            return None
        if ex.reason in FORCED and not self.config.forced:
            return None
        if random() * 100 >= self.active.percent:
            return None
        if ex.has_body and not ex.chunked:
            declared = next((v for n, v in ex.headers if n == b"content-length"), b"0")
            if int(declared) > self.config.max_body_bytes:
                self.stats.drop("max_body_bytes")
                return None
        copy = Copy(self, ex)
        return None if copy.dead else copy  # dropped at once: the exchange need not feed it


class Copy:
    """One mirrored request, fed by its exchange (sides.Tap): request body, primary answer,
    its end; compared and recorded once, when the primary and every leg are done."""

    __slots__ = (
        "body",
        "body_bytes",
        "dead",
        "ex",
        "left",
        "legs",
        "method",
        "path",
        "primary",
        "primary_ok",
        "primary_seen",
        "rm",
    )

    def __init__(self, rm: RouteMirror, ex: Primary) -> None:
        self.rm = rm
        self.ex: Primary | None = ex  # until launched
        self.method = ex.method.decode("latin-1")
        self.path = ex.path.partition("?")[0][:PATH_KEPT]
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.dead = False  # dropped: nothing more is done or counted
        self.legs: list[Leg] = []
        self.left = 0  # legs still running
        self.primary = Recorder(rm.config.compare, rm.names)
        self.primary_seen = False  # the exchange ended
        self.primary_ok = False  # ... with a complete upstream answer
        if ex.has_body and ex.pending:  # body read before the exchange started
            for part in ex.pending[1::3] if ex.chunked else ex.pending:
                self.request_body(part)  # [1::3]: the data of each (size, data, CRLF)
        if not self.dead and (not ex.has_body or ex.body_done):
            self.launch()

    # -- the exchange's side (sides.Tap) ---------------------------------------------------
    def request_body(self, data: bytes) -> None:
        if self.dead or self.ex is None:
            return
        self.body_bytes += len(data)
        if self.body_bytes > self.rm.config.max_body_bytes:
            self.rm.stats.drop("max_body_bytes")
            self.dead = True
            self.body = []
            self.ex = None
            return
        self.body.append(bytes(data))

    def request_end(self) -> None:
        if not self.dead and self.ex is not None:
            self.launch()

    def primary_body(self, data: bytes | memoryview) -> None:
        if not self.dead:
            self.primary.body(data)

    def primary_end(self, complete: bool, status: int, headers: Headers) -> None:
        self.primary_seen = True
        self.primary_ok = complete
        self.primary.head(status, headers)
        self.primary.finish(complete)
        if self.dead:
            return
        if self.ex is not None:  # the request body never completed: nothing was sent
            self.ex = None
            self.dead = True
            self.rm.stats.drop("primary_incomplete")
            return
        if self.left == 0:
            self.judge()

    # -- the shadow side --------------------------------------------------------------------
    def launch(self) -> None:
        ex = self.ex
        assert ex is not None
        self.ex = None
        rm = self.rm
        stats = rm.stats
        if stats.inflight >= rm.config.max_inflight:
            stats.drop("max_inflight")
            self.dead = True
            return
        stats.inflight += 1
        sh = rm.shadows
        sh.live.add(self)
        data = [self.head(ex), *self.body]
        self.body = []
        pools = [rm.target] if rm.stable_pool is None else [rm.target, rm.stable_pool]
        self.left = len(pools)
        head_only = ex.method == b"HEAD"
        for _ in pools:
            rec = Recorder(rm.config.compare, rm.names)
            self.legs.append(Leg(self, sh.loop, rec, head_only, rm.config.timeout))
        for leg, pool in zip(self.legs, pools, strict=True):
            leg.start(pool, sh.config.timeouts.connect, data)

    def head(self, ex: Primary) -> bytes:
        """The primary's head with the shadow's Host (suffixed) and X-Graygate-Shadow: 1."""
        rm = self.rm
        host: bytes | None = None
        headers: Headers = []
        for name, value in ex.headers:
            if name == b"host":
                host = value if host is None else host
            elif name != SHADOW[0]:
                headers.append((name, value))
        if host is None:
            eps = rm.target.endpoints
            host = eps[0].host_header if eps else b"localhost"
        if rm.suffix:
            host = suffixed(host, rm.suffix)
        headers.insert(0, (b"host", host))
        if ex.chunked:
            headers.append((b"content-length", b"%d" % self.body_bytes))
        headers.append(SHADOW)
        client = ex.client
        return request_head(
            ex.method,
            ex.target,
            headers,
            ex.connection,
            client.client_ip_bytes,
            client.trusted,
            rm.shadows.via if ex.http11 else rm.shadows.via10,
            host,
            False,
            False,
            rm.shadows.replace_for,
            client.scheme,
        )

    def leg_done(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.rm.stats.inflight -= 1
            self.rm.shadows.live.discard(self)
            if self.primary_seen:
                self.judge()

    def judge(self) -> None:
        rm = self.rm
        stats = rm.stats
        legs, self.legs = self.legs, []  # each leg holds its copy: break the cycle
        if not self.primary_ok:
            stats.drop("primary_incomplete")
            return
        rules = rm.config.compare
        primary = self.primary.capture
        canary = legs[0]
        result: Comparison = compare(primary, canary.rec.capture, rules)
        if rm.floor is not None and result.result != "shadow_error":
            baseline = compare(primary, legs[1].rec.capture, rules)
            if baseline.result != "shadow_error":
                rm.floor.observe(result, baseline)
            result = rm.floor.judge(result)
        seconds = canary.ended_at - canary.started
        evidence = None
        if result.result != "match":
            shadow = canary.rec.capture
            evidence = Mismatch(
                at=time.time(),
                route=rm.route,
                version=rm.active.to,
                method=self.method,
                path=self.path,
                result=result.result,
                status=(primary.status, shadow.status),
                headers=result.headers,
                json_paths=result.json_paths,
                digests=(primary.digest, shadow.digest),
                detail=shadow.error,
            )
        stats.record(result.result, seconds, evidence)
