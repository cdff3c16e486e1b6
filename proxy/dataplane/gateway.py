"""The data plane's shared state: the runtime snapshot of the policy every connection
reads (resolved once per policy revision), the pools, the connections, the one timer that
checks their timeouts, and the drain. Knows connections only as `Connection`; never
imports downstream or exchange.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Protocol

from proxy.core.config.model import Config
from proxy.core.hosts import host_name, matches
from proxy.core.mirror import Mirrors
from proxy.core.router import RouteView, views
from proxy.core.state import PolicyStore, RoutePolicy, RoutingPolicy
from proxy.core.stats import Stats, VersionStats
from proxy.dataplane.mirror import RouteMirror, Shadows
from proxy.dataplane.upstream import Upstreams, VersionPool

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})  # in host_name() form
WATCH_TICK = 0.1  # resolution of every timeout, client and upstream


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
    mirror: RouteMirror | None = None  # shadow copies (dataplane/mirror.py)


@dataclass(frozen=True, slots=True)
class Runtime:
    policy: RoutingPolicy
    routes: dict[str, RouteRuntime]
    views: tuple[RouteView, ...]  # policy.routes as the router's compiled copies


def build_runtime(
    policy: RoutingPolicy, upstreams: Upstreams, stats: Stats, shadows: Shadows | None = None
) -> Runtime:
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
            mirror=shadows.route(rp) if shadows is not None else None,
        )
    return Runtime(policy, routes, views(policy))


class Connection(Protocol):
    """What the watchdog and the drain need of a client connection."""

    def check(self, now: float) -> None: ...
    def idle(self) -> bool: ...
    def close(self) -> None: ...


class Gateway:
    """Shared state of the data plane: the runtime snapshot, pools, stats, connections."""

    def __init__(
        self,
        config: Config,
        store: PolicyStore,
        stats: Stats,
        loop: asyncio.AbstractEventLoop | None = None,
        mirrors: Mirrors | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_event_loop()
        self.store = store
        self.stats = stats
        self.upstreams = Upstreams(config)
        self.mirrors = mirrors if mirrors is not None else Mirrors.from_config(config)
        self.shadows = Shadows(config, self.mirrors, self.loop)  # pools of their own
        self.connections: set[Connection] = set()
        self.draining = False
        self.drained = asyncio.Event()  # set once draining and the last connection closed
        self.date_second = 0
        self.date = b""  # RFC 9110 6.6.1 Date for answers that have none; see refresh_date
        self.refresh_date()
        self.apply_config(config)
        self.runtime: Runtime = build_runtime(store.policy, self.upstreams, stats, self.shadows)
        store.subscribe(self.on_policy)

    def apply_config(self, config: Config) -> None:
        self.config = config
        self.via = f"1.1 {config.via}".encode()  # RFC 9110 7.6.3: the received version
        self.via10 = f"1.0 {config.via}".encode()
        self.access_log = config.access_log
        self.trusted = config.trusted_proxies
        self.replace_for = config.forwarded_for == "replace"
        self.upgrades = frozenset(p.encode() for p in config.upgrades)
        # Read per request: copies, as config objects are interpreted (~200 instructions a read).
        self.client_header_timeout = config.timeouts.client_header
        self.keepalive_timeout = config.timeouts.keepalive
        self.request_timeout = config.timeouts.request
        self.max_body_bytes = config.limits.max_body_bytes
        hosts = set(LOCAL_HOSTS)
        if config.listen.host not in ("0.0.0.0", "::", ""):
            hosts.add(host_name(config.listen.host))
        self.own_hosts = frozenset(hosts)

    def refresh_date(self) -> None:
        second = int(time.time())
        if second != self.date_second:
            self.date_second = second
            self.date = formatdate(second, usegmt=True).encode()

    def reconfigure(self, config: Config) -> None:
        """Reload: new pools and stats first, then the store swaps the policy (on_policy)."""
        self.apply_config(config)
        self.upstreams.reconfigure(config)
        self.shadows.reconfigure(config)  # its Mirrors too
        self.stats.reconfigure(config)

    def sweep_idle(self, now: float) -> None:
        """Close pooled connections idle too long: the users' and the shadows'."""
        self.upstreams.sweep_idle(now)
        self.shadows.upstreams.sweep_idle(now)

    def on_policy(self, policy: RoutingPolicy) -> None:
        self.runtime = build_runtime(policy, self.upstreams, self.stats, self.shadows)

    def is_foreign(self, host: str) -> bool:
        """An absolute-form target naming a host we do not serve: never proxied."""
        name = host_name(host)
        if name in self.own_hosts:
            return False
        # A catch-all route (`*`) serves any Host it is sent, but names no host of ours.
        return not any(
            (r.host_exact is not None or r.host_suffix is not None)
            and matches(name, r.host_exact, r.host_suffix)
            for r in self.runtime.policy.routes
        )

    async def watch(self) -> None:
        """The one timer of the data plane: client and upstream timeouts of every connection,
        and the cached Date value."""
        while True:
            await asyncio.sleep(WATCH_TICK)
            self.refresh_date()
            now = self.loop.time()
            for conn in list(self.connections):
                conn.check(now)

    def drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            if conn.idle():
                conn.close()
        if not self.connections:
            self.drained.set()

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self.draining and not self.connections:
            self.drained.set()

    async def close(self) -> None:
        for conn in list(self.connections):
            conn.close()
        await self.upstreams.close()
        await self.shadows.close()
