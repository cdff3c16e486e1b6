"""Per-(route, version) outcome statistics: hot-path counters, latency histogram buckets and
the analysis window since the last rollout decision; what counts as an error.

Pure: standard library and config only. metrics.py renders these at scrape time and the
rollout loop drains the windows; neither adds work to record(), which runs once per request.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Final

from proxy.core.config.model import Config, RouteConfig

# Upper bounds (seconds, inclusive, Prometheus `le`); bucket_counts has one more slot for +Inf.
BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
UPSTREAM_ERROR_KINDS: Final[tuple[str, ...]] = ("connect", "timeout", "reset", "protocol")
VERDICTS: Final[tuple[str, ...]] = ("pass", "fail", "need_more_samples")
RESERVOIR_SIZE: Final = 5000

# (requests, errors, latency samples in seconds) of one window, in the field order of
# analysis.Sample: `Sample(*stats.take_window(route, version))`.
WindowSnapshot = tuple[int, int, tuple[float, ...]]


def is_error(status: int) -> bool:
    # Upstream 5xx and graygate's own 502/503/504 both arrive here as a status code.
    return status >= 500


class Window:
    """Outcomes since the last rollout decision, with a bounded uniform sample of latencies."""

    __slots__ = ("_rng", "errors", "requests", "samples", "size")

    def __init__(self, rng: random.Random, size: int = RESERVOIR_SIZE) -> None:
        self._rng = rng
        self.size = size
        self.requests = 0
        self.errors = 0
        self.samples: list[float] = []

    def add(self, seconds: float, error: bool) -> None:
        # Algorithm R: after n offers each latency is kept with probability size / n, so
        # the p99 estimate stays unbiased while memory stays bounded under any load.
        n = self.requests + 1
        self.requests = n
        if error:
            self.errors += 1
        samples = self.samples
        if len(samples) < self.size:
            samples.append(seconds)
        else:
            j = int(self._rng.random() * n)
            if j < self.size:
                samples[j] = seconds

    def snapshot(self) -> WindowSnapshot:
        return self.requests, self.errors, tuple(self.samples)

    def reset(self) -> None:
        self.requests = 0
        self.errors = 0
        self.samples = []


class VersionStats:
    """Counters of one (route, version); mutated in place by the data plane, read at scrape."""

    __slots__ = (
        "bucket_counts",
        "counts",
        "duration_sum",
        "exclude",
        "inflight",
        "upstream_errors",
        "window",
    )

    def __init__(self, rng: random.Random, exclude: frozenset[str] = frozenset()) -> None:
        self.counts: dict[tuple[int, str], int] = {}
        self.bucket_counts: list[int] = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative
        self.duration_sum = 0.0
        self.inflight = 0
        self.upstream_errors: dict[str, int] = dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
        self.window = Window(rng)
        # Forced (tester) traffic must not sway the canary verdict, but still shows in /metrics.
        self.exclude = exclude

    def record(self, status: int, reason: str, seconds: float) -> None:
        key = (status, reason)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        # The first bound not below the value (bisect_left: `le` is inclusive), by a loop:
        # compiled, most answers stop within three bounds, cheaper than the call.
        i = 0
        for bound in BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.bucket_counts[i] += 1
        self.duration_sum += seconds
        if reason not in self.exclude:
            self.window.add(seconds, status >= 500)  # is_error() inlined: a call is ~50 ns

    def upstream_error(self, kind: str) -> None:
        # KeyError on a kind outside UPSTREAM_ERROR_KINDS: label values must stay bounded.
        self.upstream_errors[kind] += 1

    @property
    def requests(self) -> int:
        return sum(self.bucket_counts)


def _exclude(route: RouteConfig) -> frozenset[str]:
    return frozenset(route.rollout.analysis.exclude_reasons)


class Stats:
    """VersionStats per route per version, plus rollout verdict counters per route."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._routes: dict[str, dict[str, VersionStats]] = {}
        self._verdicts: dict[str, dict[str, int]] = {}

    @classmethod
    def from_config(cls, config: Config, rng: random.Random | None = None) -> Stats:
        stats = cls(rng)
        stats.reconfigure(config)
        return stats

    def reconfigure(self, config: Config) -> None:
        # Surviving (route, version) pairs keep their objects, so counters never go backwards
        # on reload and a request in flight still records into the object it resolved.
        # The maps are rebuilt and swapped whole: readers never see a half-built one.
        routes: dict[str, dict[str, VersionStats]] = {}
        verdicts: dict[str, dict[str, int]] = {}
        for route in config.routes:
            old = self._routes.get(route.name, {})
            exclude = _exclude(route)
            versions: dict[str, VersionStats] = {}
            for name in route.version_names:
                vs = old.get(name)
                if vs is None:
                    vs = VersionStats(self._rng, exclude)
                else:
                    vs.exclude = exclude
                versions[name] = vs
            routes[route.name] = versions
            verdicts[route.name] = self._verdicts.get(route.name) or dict.fromkeys(VERDICTS, 0)
        self._routes = routes
        self._verdicts = verdicts

    def __getitem__(self, route: str) -> dict[str, VersionStats]:
        return self._routes[route]

    def get(self, route: str, version: str) -> VersionStats:
        return self._routes[route][version]

    def items(self) -> Iterator[tuple[str, str, VersionStats]]:
        for route, versions in self._routes.items():
            for version, vs in versions.items():
                yield route, version, vs

    def take_window(self, route: str, version: str) -> WindowSnapshot:
        window = self._routes[route][version].window
        sample = window.snapshot()
        window.reset()
        return sample

    def count_verdict(self, route: str, verdict: str) -> None:
        counts = self._verdicts.get(route)
        if counts is None:
            # The route was removed by a reload while its rollout tick was running.
            return
        if verdict not in counts:
            raise ValueError(f"unknown verdict {verdict!r}, expected one of {VERDICTS}")
        counts[verdict] += 1

    def verdicts(self) -> Iterator[tuple[str, dict[str, int]]]:
        for route, counts in self._verdicts.items():
            yield route, dict(counts)
