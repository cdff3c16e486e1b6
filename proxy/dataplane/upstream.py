"""Upstream endpoints: keep-alive connection pools, endpoint choice, outlier ejection
and optional active health checks. Knows nothing of routes' policy or of downstream;
an exchange borrows a connection, plugs its response parser in, and gives it back.
Data plane: asyncio + uvloop only, no aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterator
from time import monotonic
from typing import Final, Literal, Protocol, cast

from proxy.core.config.model import Config, Endpoint, HealthCheckConfig, Limits, OutlierConfig

logger = logging.getLogger(__name__)

ErrorKind = Literal["connect", "timeout", "reset", "protocol", "unavailable"]
# The one place a failure kind becomes the status of graygate's answer.
STATUS: Final[dict[ErrorKind, int]] = {
    "connect": 502,  # refused, unreachable
    "reset": 502,  # closed before or during the response
    "protocol": 502,  # a response that must not be relayed
    "unavailable": 503,  # the pool is full: try again soon (Retry-After)
    "timeout": 504,  # no connection, no answer or no bytes in time
}


class UpstreamError(Exception):
    """An upstream failure: what kind (its status comes from STATUS) and why."""

    def __init__(self, kind: ErrorKind, detail: str, retryable: bool = False):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retryable = retryable  # nothing of the request reached the upstream

    @property
    def status(self) -> int:
        return STATUS[self.kind]


# Upstream reads land in one buffer for every connection of the process (uvloop does the
# same for a plain Protocol, then copies each read into a new bytes object): a large read
# is handed on as a view of it, and a body relayed from it costs no copy in user space.
READ_BUFFER: Final = 262144
SMALL_READ: Final = 16384  # below this a read is copied out: bytes are cheaper to parse


class ReadBuffer:
    """Read into by every upstream connection, consumed before the next read. A consumer
    that leaves a view of it queued (a client transport that could not send it all at
    once) calls renew(): the next read gets a new buffer, the old one lives as long as
    the view."""

    __slots__ = ("buf", "view")

    def __init__(self) -> None:
        self.buf = bytearray(READ_BUFFER)
        self.view = memoryview(self.buf)

    def renew(self) -> None:
        self.buf = bytearray(READ_BUFFER)
        self.view = memoryview(self.buf)


READS: Final = ReadBuffer()


class ConnectionUser(Protocol):
    """What an upstream connection reports to the exchange that borrowed it."""

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_view(self, read: ReadBuffer, n: int) -> None: ...  # n >= SMALL_READ bytes
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class UpstreamConnection(asyncio.BufferedProtocol):
    __slots__ = ("closed", "endpoint", "idle_since", "reader", "transport", "user")

    def __init__(self, endpoint: EndpointPool) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.user: ConnectionUser | None = None
        self.reader: object | None = None  # left by a user for the next (attempt.py: its parser)
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return READS.view

    def buffer_updated(self, nbytes: int) -> None:
        user = self.user
        if user is None:
            # Bytes on an idle connection: the upstream is confused; never reuse it.
            self.close()
        elif nbytes < SMALL_READ:
            user.upstream_data(bytes(READS.view[:nbytes]))
        else:
            user.upstream_view(READS, nbytes)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.endpoint.forget(self)
        user, self.user = self.user, None
        if user is not None:
            user.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.user is not None:
            self.user.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.user is not None:
            self.user.upstream_resume_writing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class EndpointPool:
    """One upstream address of one version: its pool, load and outlier state."""

    def __init__(
        self,
        endpoint: Endpoint,
        route: str,
        version: str,
        limits: Limits,
        outlier: OutlierConfig,
        idle_timeout: float,
    ) -> None:
        self.endpoint = endpoint
        self.url = endpoint.url
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        self.host_header = f"{host}:{endpoint.port}".encode()  # Host for HTTP/1.0 clients
        self.route = route
        self.version = version
        self.limits = limits
        self.max_idle = limits.max_idle_per_endpoint  # read per request: a compiled copy
        self.outlier = outlier
        self.idle_timeout = idle_timeout
        self.idle: deque[UpstreamConnection] = deque()
        self.open = 0  # connections counted against max_connections_per_endpoint
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.outstanding = 0  # requests in flight (least-request balancing)
        self.failures = 0  # consecutive
        self.ejections = 0
        self.ejected_until = 0.0
        self.healthy = True  # active health check verdict
        self.retired = False
        self.conns: set[UpstreamConnection] = set()

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled keep-alive connection, without waiting; None when there is none."""
        idle = self.idle
        while idle:
            conn = idle.pop()  # most recently used first: least likely to be stale
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def acquire(self, connect_timeout: float) -> tuple[UpstreamConnection, bool]:
        """A connection for one exchange: (connection, reused). Waits for a pool slot
        when the endpoint is at max_connections (the caller bounds the wait)."""
        while True:
            conn = self.take_idle()
            if conn is not None:
                return conn, True
            if self.open < self.limits.max_connections_per_endpoint:
                break
            if len(self.waiters) >= self.limits.max_pending:
                raise UpstreamError("unavailable", "upstream connection pool is full")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._wake()  # we were woken but leave: pass the turn on
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
        self.open += 1
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self), ep.host, ep.port
                )
        except TimeoutError as exc:
            self._slot_freed()
            raise UpstreamError("timeout", f"connect to {ep.url} timed out", True) from exc
        except OSError as exc:
            self._slot_freed()
            raise UpstreamError("connect", f"connect to {ep.url} failed: {exc}", True) from exc
        except BaseException:
            self._slot_freed()
            raise
        self.conns.add(conn)
        return conn, False

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        conn.user = None
        if reusable and not self.retired and not conn.closed and len(self.idle) < self.max_idle:
            conn.idle_since = monotonic()
            if self.waiters:
                self.idle.append(conn)
                self._wake()
                return
            self.idle.append(conn)
            return
        conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            with contextlib.suppress(ValueError):
                self.idle.remove(conn)
            self._slot_freed()

    def _slot_freed(self) -> None:
        self.open -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def close_idle(self, older_than: float | None = None) -> None:
        keep: deque[UpstreamConnection] = deque()
        for conn in self.idle:
            if older_than is None or conn.idle_since < older_than:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep

    def close(self) -> None:
        self.retired = True
        self.close_idle()

    # Passive outlier detection: N consecutive failures eject for base * 2^k, capped.
    def succeeded(self) -> None:
        if self.failures:
            self.failures = 0

    def failed(self, now: float, siblings: list[EndpointPool]) -> bool:
        """Count a failure; returns True when this ejects the endpoint."""
        self.failures += 1
        cfg = self.outlier
        if cfg.consecutive_failures <= 0 or self.failures < cfg.consecutive_failures:
            return False
        others_up = any(p is not self and p.available(now) for p in siblings)
        if not others_up:
            return False  # never eject the last endpoint of a version
        duration = min(cfg.base_ejection * (2**self.ejections), cfg.max_ejection)
        self.ejections += 1
        self.ejected_until = now + duration
        self.failures = 0
        logger.warning(
            "ejected endpoint %s of %s/%s for %.1fs after %d consecutive failures",
            self.url,
            self.route,
            self.version,
            duration,
            cfg.consecutive_failures,
        )
        return True


class VersionPool:
    """The endpoints of one version of one route, and the choice among them."""

    def __init__(self, route: str, version: str, balance: str, endpoints: list[EndpointPool]):
        self.route = route
        self.version = version
        self.endpoints = endpoints
        self.round_robin = balance == "round_robin"
        self._next = 0

    def pick(self, now: float, tried: tuple[EndpointPool, ...] = ()) -> EndpointPool | None:
        """Least outstanding requests among available endpoints (ties rotate), or round robin."""
        eps = self.endpoints
        n = len(eps)
        if n == 1:
            ep = eps[0]
            return ep if ep.available(now) and ep not in tried else None
        start = self._next
        best: EndpointPool | None = None
        best_at = 0
        for i in range(n):
            at = (start + i) % n
            ep = eps[at]
            if ep in tried or not ep.available(now):
                continue
            if best is None or (not self.round_robin and ep.outstanding < best.outstanding):
                best, best_at = ep, at
                if self.round_robin:
                    break
        if best is not None:
            self._next = (best_at + 1) % n  # the turn passes from the chosen one, not the start
        return best

    def any_available(self, now: float) -> bool:
        return any(ep.available(now) for ep in self.endpoints)


class Upstreams:
    """Every VersionPool of the current config; survives reloads endpoint by endpoint."""

    def __init__(self, config: Config) -> None:
        self._pools: dict[tuple[str, str, str], EndpointPool] = {}
        self.versions: dict[str, dict[str, VersionPool]] = {}
        self._health_tasks: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        old = self._pools
        pools: dict[tuple[str, str, str], EndpointPool] = {}
        versions: dict[str, dict[str, VersionPool]] = {}
        for route in config.routes:
            versions[route.name] = {}
            for v in route.versions:
                eps: list[EndpointPool] = []
                for ep in v.endpoints:
                    key = (route.name, v.name, ep.url)
                    pool = old.get(key)
                    if pool is None:
                        pool = EndpointPool(
                            ep,
                            route.name,
                            v.name,
                            config.limits,
                            route.outlier,
                            config.timeouts.upstream_idle,
                        )
                    else:
                        pool.limits = config.limits
                        pool.max_idle = config.limits.max_idle_per_endpoint
                        pool.outlier = route.outlier
                        pool.idle_timeout = config.timeouts.upstream_idle
                    pools[key] = pool
                    eps.append(pool)
                versions[route.name][v.name] = VersionPool(route.name, v.name, route.balance, eps)
        for key, pool in old.items():
            if key not in pools:
                pool.close()
                task = self._health_tasks.pop(key, None)
                if task is not None:
                    task.cancel()
        self._pools = pools
        self.versions = versions
        self._routes = {r.name: r for r in config.routes}

    def pools(self) -> Iterator[EndpointPool]:
        return iter(self._pools.values())

    def endpoint_states(self, now: float) -> list[tuple[str, str, str, bool]]:
        return [(p.route, p.version, p.url, p.available(now)) for p in self._pools.values()]

    def sweep_idle(self, now: float) -> None:
        for pool in self._pools.values():
            if pool.idle:
                pool.close_idle(older_than=now - pool.idle_timeout)

    def start_health_checks(self) -> None:
        for key, pool in self._pools.items():
            route = self._routes[key[0]]
            if route.health_check is not None and key not in self._health_tasks:
                self._health_tasks[key] = asyncio.get_running_loop().create_task(
                    _health_loop(pool, route.health_check)
                )

    async def close(self) -> None:
        tasks = list(self._health_tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._health_tasks.clear()
        for pool in self._pools.values():
            pool.close()
            for conn in list(pool.conns):
                conn.close()


async def probe(host: str, port: int, path: str, within: float) -> bool:
    """One active health check: GET path, healthy on a 2xx or 3xx status."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "User-Agent: graygate-health\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
    parts = line.split(b" ", 2)
    return len(parts) >= 2 and parts[1][:1] in (b"2", b"3")


async def _health_loop(pool: EndpointPool, cfg: HealthCheckConfig) -> None:
    ep = pool.endpoint
    while True:
        ok = await probe(ep.host, ep.port, cfg.path, cfg.timeout)
        if ok != pool.healthy:
            logger.warning(
                "endpoint %s of %s/%s is now %s",
                ep.url,
                pool.route,
                pool.version,
                "healthy" if ok else "unhealthy",
            )
            pool.healthy = ok
        await asyncio.sleep(cfg.interval)
