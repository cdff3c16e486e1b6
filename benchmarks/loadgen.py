"""Load generator on raw asyncio Protocols + httptools: closed loop or constant rate.

Constant-rate latency is measured from each request's scheduled send time, so a stalled
server is charged for the requests it delayed (no coordinated omission). Every run is
bounded by a deadline and a request count. Loopback targets only, unless allowed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

HARD_MAX_REQUESTS = 50_000_000
HARD_MAX_DURATION = 3600.0


class TargetError(ValueError):
    """The URL is malformed or points outside the loopback range without permission."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str
    host_header: str


def parse_target(url: str, allow_remote: bool = False) -> Target:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise TargetError(f"only http://host[:port]/path URLs are supported, got {url!r}")
    host = parts.hostname
    if not allow_remote and not is_loopback(host):
        raise TargetError(
            f"refusing non-loopback target {host!r}: load is only sent to 127.0.0.0/8 or ::1 "
            "(pass --allow-remote to override)"
        )
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(host, port, path, parts.netloc)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class LoadSpec:
    url: str
    concurrency: int = 64
    duration: float = 10.0
    rate: float | None = None  # total requests per second; None: closed loop
    headers: tuple[tuple[str, str], ...] = ()
    users: int = 0  # 0: anonymous requests; K: K users with their own cookie jar and id
    user_key: str = "both"  # header | cookie | both (what users send back)
    user_header: str = "X-User-Id"
    keepalive: bool = True
    max_requests: int | None = None
    timeout: float = 5.0  # per request
    version_header: str = "X-Graygate-Version"
    bucket: float = 0.1  # timeline resolution, seconds
    allow_remote: bool = False


@dataclass
class UserTrack:
    jar: dict[str, str] = field(default_factory=dict)
    versions: set[str] = field(default_factory=set)
    last: str | None = None
    flips: int = 0


@dataclass
class LoadResult:
    spec: LoadSpec
    started_wall: float = 0.0
    elapsed: float = 0.0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # connect, read, timeout, write
    statuses: dict[int, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    # bucket index -> {version or "error:<version>" or "flip": count}
    timeline: dict[int, dict[str, int]] = field(default_factory=dict)
    first_error_at: dict[str, float] = field(default_factory=dict)  # version -> seconds
    users: dict[int, UserTrack] = field(default_factory=dict)
    late_sends: int = 0  # constant rate: requests sent after their schedule

    def percentile(self, p: float) -> float | None:
        return percentile(sorted(self.latencies), p)

    def summary(self) -> dict[str, object]:
        lat = sorted(self.latencies)
        non2xx = sum(n for s, n in self.statuses.items() if not 200 <= s < 300)
        multi = sum(1 for u in self.users.values() if len(u.versions) > 1)
        out: dict[str, object] = {
            "url": self.spec.url,
            "concurrency": self.spec.concurrency,
            "rate_target": self.spec.rate,
            "duration": round(self.elapsed, 3),
            "started_wall": self.started_wall,
            "requests": self.requests,
            "rps": round(self.requests / self.elapsed, 1) if self.elapsed > 0 else 0.0,
            "errors": dict(self.errors),
            "errors_total": sum(self.errors.values()),
            "non2xx": non2xx,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "versions": dict(sorted(self.versions.items())),
            "version_share": {
                v: round(n / self.requests, 4) for v, n in sorted(self.versions.items())
            }
            if self.requests
            else {},
            "latency_ms": {
                name: _ms(percentile(lat, p))
                for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))
            }
            | {"max": _ms(lat[-1] if lat else None)},
            "late_sends": self.late_sends,
            "bucket_s": self.spec.bucket,
            "timeline": {str(k): v for k, v in sorted(self.timeline.items())},
            "first_error_s": dict(self.first_error_at),
        }
        if self.spec.users:
            out["users"] = {
                "total": len(self.users),
                "saw_multiple_versions": multi,
                "flips": sum(u.flips for u in self.users.values()),
            }
        return out


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100.0 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


class _Conn(asyncio.Protocol):
    """One client connection; one request in flight at a time (no pipelining)."""

    def __init__(self, version_header: bytes) -> None:
        self.version_header = version_header
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.sent_at = 0.0
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.version: str | None = None
        self.cookies: list[bytes] = []
        self.status = 0
        self.keep_alive = False
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == self.version_header:
            self.version = value.decode("latin-1")
        elif lname == b"set-cookie":
            self.cookies.append(value)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.done = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def send(self, request: bytes, now: float) -> asyncio.Future[None]:
        assert self.transport is not None
        self._reset()
        self.sent_at = now
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def expire(self) -> None:
        # Called by the watchdog: one timer task for all connections is cheaper than a
        # wait_for per request, which would halve the generator's rate.
        self._fail(TimeoutError())
        self.close()


class LoadRun:
    """Owns one bounded run; `progress` is called about once a second."""

    def __init__(
        self, spec: LoadSpec, progress: Callable[[LoadResult, float], None] | None = None
    ) -> None:
        if spec.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not 0 < spec.duration <= HARD_MAX_DURATION:
            raise ValueError(f"duration must be in (0, {HARD_MAX_DURATION:.0f}] s")
        if spec.rate is not None and spec.rate <= 0:
            raise ValueError("rate must be > 0")
        self.spec = spec
        self.target = parse_target(spec.url, spec.allow_remote)
        self.progress = progress
        self.result = LoadResult(spec)
        self.max_requests = min(spec.max_requests or HARD_MAX_REQUESTS, HARD_MAX_REQUESTS)
        self.issued = 0
        self.vh = spec.version_header.lower().encode("latin-1")
        conc = spec.concurrency
        if spec.users:
            # A user's requests are sequential, as a browser's are: no more connections than users.
            conc = min(conc, spec.users)
            self.result.users = {k: UserTrack() for k in range(spec.users)}
        self.concurrency = conc
        head = [f"GET {self.target.path} HTTP/1.1", f"Host: {self.target.host_header}"]
        head += [f"{k}: {v}" for k, v in spec.headers]
        if not spec.keepalive:
            head.append("Connection: close")
        self.head = "\r\n".join(head)
        self.static_request = (self.head + "\r\n\r\n").encode("latin-1")

    def _request_for(self, user: int | None) -> bytes:
        if user is None:
            return self.static_request
        extra = []
        if self.spec.user_key in ("header", "both"):
            extra.append(f"{self.spec.user_header}: user-{user}")
        jar = self.result.users[user].jar
        if jar and self.spec.user_key in ("cookie", "both"):
            extra.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in jar.items()))
        return (self.head + "".join("\r\n" + e for e in extra) + "\r\n\r\n").encode("latin-1")

    async def run(self) -> LoadResult:
        # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + self.spec.duration
        self.hard_stop = self.deadline + self.spec.timeout
        self.result.started_wall = time.time()
        self.conns: set[_Conn] = set()
        workers = [asyncio.ensure_future(self._worker(c)) for c in range(self.concurrency)]
        ticker = asyncio.ensure_future(self._ticker())
        try:
            await asyncio.gather(*workers)
        finally:
            ticker.cancel()
            for w in workers:
                w.cancel()
            await asyncio.gather(ticker, *workers, return_exceptions=True)
            for conn in self.conns:
                conn.close()
        self.result.elapsed = min(time.perf_counter(), self.hard_stop) - self.t0
        return self.result

    async def _ticker(self) -> None:
        step = 0.1
        last_progress = self.t0
        while True:
            await asyncio.sleep(step)
            now = time.perf_counter()
            for conn in list(self.conns):
                waiter = conn.waiter
                overdue = now - conn.sent_at > self.spec.timeout or now > self.hard_stop
                if waiter is not None and not waiter.done() and overdue:
                    conn.expire()
            if self.progress is not None and now - last_progress >= 1.0:
                last_progress = now
                self.progress(self.result, now - self.t0)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Conn(self.vh), self.target.host, self.target.port),
            self.spec.timeout,
        )
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _error(self, kind: str) -> None:
        errs = self.result.errors
        errs[kind] = errs.get(kind, 0) + 1

    async def _worker(self, index: int) -> None:
        spec, res, clock = self.spec, self.result, time.perf_counter
        users = (
            [u for u in range(spec.users) if u % self.concurrency == index] if spec.users else []
        )
        interval = self.concurrency / spec.rate if spec.rate else 0.0
        j = 0
        conn: _Conn | None = None
        try:
            while self.issued < self.max_requests:
                now = clock()
                scheduled = now
                if spec.rate:
                    scheduled = self.t0 + (index / spec.rate) + j * interval
                    if scheduled >= self.deadline or now >= self.hard_stop:
                        break
                    if scheduled > now:
                        await asyncio.sleep(scheduled - now)
                        now = clock()
                    elif now - scheduled > 0.001:
                        res.late_sends += 1
                elif now >= self.deadline:
                    break
                user = users[j % len(users)] if users else None
                j += 1
                self.issued += 1
                if conn is None or conn.closed:
                    try:
                        conn = await self._connect()
                    except (TimeoutError, OSError):
                        self._error("connect")
                        conn = None
                        await asyncio.sleep(0.01)
                        continue
                    self.conns.add(conn)
                try:
                    await conn.send(self._request_for(user), now)
                except TimeoutError:
                    self._error("timeout")
                    conn.close()
                    continue
                except (OSError, httptools.HttpParserError):
                    self._error("read")
                    conn.close()
                    continue
                finally:
                    if conn.closed or conn.waiter is None or not conn.waiter.done():
                        self.conns.discard(conn)
                done = clock()
                self._record(conn, user, scheduled, done)
                if not spec.keepalive or not conn.keep_alive:
                    conn.close()
                    self.conns.discard(conn)
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    def _record(self, conn: _Conn, user: int | None, scheduled: float, done: float) -> None:
        res = self.result
        res.requests += 1
        res.latencies.append(done - scheduled)
        res.statuses[conn.status] = res.statuses.get(conn.status, 0) + 1
        version = conn.version or "-"
        res.versions[version] = res.versions.get(version, 0) + 1
        rel = done - self.t0
        slot = res.timeline.setdefault(int(rel / self.spec.bucket), {})
        slot[version] = slot.get(version, 0) + 1
        if conn.status >= 500:
            key = "error:" + version
            slot[key] = slot.get(key, 0) + 1
            res.first_error_at.setdefault(version, round(rel, 4))
        if user is not None:
            track = res.users[user]
            for raw in conn.cookies:
                pair = raw.decode("latin-1").split(";", 1)[0]
                name, sep, value = pair.partition("=")
                if sep:
                    track.jar[name.strip()] = value.strip()
            if conn.version is not None:
                if track.last is not None and track.last != conn.version:
                    track.flips += 1
                    slot["flip"] = slot.get("flip", 0) + 1
                track.last = conn.version
                track.versions.add(conn.version)


async def run_load(
    spec: LoadSpec, progress: Callable[[LoadResult, float], None] | None = None
) -> LoadResult:
    return await LoadRun(spec, progress).run()
