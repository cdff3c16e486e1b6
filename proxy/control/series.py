"""The last 15 minutes of per-interval figures of every (route, version): request count
and rate, errors and error rate, p99; a ring buffer fed from the cumulative Stats by one
sampling task (owned by the admin app), served at GET /api/v1/routes/{route}/series.
Reads Stats only; never adds work to the hot path.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from proxy.core.stats import BUCKETS, Stats, VersionStats, is_error

INTERVAL = 5.0  # seconds between two points
SPAN = 900.0  # seconds kept: the dashboard's 15 minutes


@dataclass(frozen=True, slots=True)
class Point:
    time: float  # end of the interval (wall clock, seconds)
    seconds: float  # length of the interval
    requests: int
    errors: int
    p99_seconds: float | None  # upper bound of the bucket holding the 99th percentile

    def to_json(self) -> dict[str, object]:
        return {
            "time": self.time,
            "seconds": self.seconds,
            "requests": self.requests,
            "errors": self.errors,
            "rate": self.requests / self.seconds if self.seconds > 0 else None,
            "error_rate": self.errors / self.requests if self.requests else None,
            "p99_seconds": self.p99_seconds,
        }


@dataclass(frozen=True, slots=True)
class _Totals:
    requests: int
    errors: int
    buckets: tuple[int, ...]


def bucket_p99(bucket_counts: list[int] | tuple[int, ...]) -> float | None:
    """Upper bound of the bucket holding the 99th percentile, as histogram_quantile would;
    None without requests or when it lies in the +Inf bucket."""
    total = sum(bucket_counts)
    if total == 0:
        return None
    rank, seen = 0.99 * total, 0
    for i, n in enumerate(bucket_counts):
        seen += n
        if seen >= rank:
            return BUCKETS[i] if i < len(BUCKETS) else None
    return None


def _totals(vs: VersionStats) -> _Totals:
    # Copies first: the data plane runs on this loop too, but a copy keeps the three
    # figures of one point consistent with each other.
    counts = dict(vs.counts)
    buckets = tuple(vs.bucket_counts)
    errors = sum(n for (status, _), n in counts.items() if is_error(status))
    return _Totals(sum(counts.values()), errors, buckets)


class Series:
    """Points per (route, version), at most SPAN / INTERVAL of them each."""

    def __init__(self, stats: Stats, interval: float = INTERVAL, span: float = SPAN) -> None:
        self.stats = stats
        self.interval = interval
        self.span = span
        self._size = max(1, round(span / interval))
        self._points: dict[tuple[str, str], deque[Point]] = {}
        self._last: dict[tuple[str, str], tuple[float, _Totals]] = {}

    def sample(self, now: float) -> None:
        """Close the interval that ends at `now` for every (route, version). The first
        sample of a pair only sets its baseline; pairs gone after a reload are dropped."""
        seen: set[tuple[str, str]] = set()
        for route, version, vs in self.stats.items():
            key = (route, version)
            seen.add(key)
            totals = _totals(vs)
            last = self._last.get(key)
            self._last[key] = (now, totals)
            if last is None:
                continue
            then, before = last
            requests = totals.requests - before.requests
            if requests < 0 or now <= then:
                continue  # counters were replaced (a version re-added) or the clock went back
            delta = [a - b for a, b in zip(totals.buckets, before.buckets, strict=True)]
            point = Point(
                time=now,
                seconds=now - then,
                requests=requests,
                errors=totals.errors - before.errors,
                p99_seconds=bucket_p99(delta),
            )
            points = self._points.get(key)
            if points is None:
                points = self._points[key] = deque(maxlen=self._size)
            points.append(point)
        for key in set(self._last) - seen:
            del self._last[key]
            self._points.pop(key, None)

    def points(self, route: str, version: str) -> list[Point]:
        return list(self._points.get((route, version), ()))

    async def run(self, clock: Callable[[], float]) -> None:
        """Sample every `interval` seconds until cancelled."""
        self.sample(clock())
        while True:
            await asyncio.sleep(self.interval)
            self.sample(clock())
