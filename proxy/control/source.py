"""Metrics sources of the rollout controller: where a window of canary and stable outcomes
comes from. LocalSource drains this process's core.stats windows; PrometheusSource asks a
Prometheus server (PromQL over HTTP) about every replica's graygate_* series. Sources only
read figures; the controller judges them and writes the decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from proxy.control.metrics import DURATION, MIRROR_REQUESTS, REQUESTS
from proxy.core.analysis import Histogram, Sample
from proxy.core.config.model import PrometheusConfig, RouteConfig, SourceName
from proxy.core.mirror import Mirrors
from proxy.core.stats import Stats


class SourceError(Exception):
    """The window cannot be read (source unreachable, slow, or without data): the
    controller counts it as need_more_samples with this message, never as a fail."""


@dataclass(frozen=True)
class Window:
    canary: Sample
    stable: Sample
    start: float  # wall-clock seconds; the outcomes observed in [start, end]
    end: float


@dataclass(frozen=True)
class MirrorWindow:
    """The canary's shadow answers compared in [start, end] and those that differed
    (shadow_error included); dropped copies are no samples."""

    samples: int
    mismatches: int
    start: float
    end: float


class MetricsSource(Protocol):
    name: SourceName

    def lag(self, route: RouteConfig) -> float:
        """How long before now a window must end for its figures to be complete."""
        ...

    def begin(self, route: RouteConfig, start: float, now: float) -> float:
        """A new window of `route` opens (a new step, or a new leader); returns its start.
        `start` is when it should start, at the earliest."""
        ...

    async def window(
        self, route: RouteConfig, canary: str, stable: str, start: float, end: float
    ) -> Window: ...

    async def mirror_window(
        self, route: RouteConfig, canary: str, start: float, end: float
    ) -> MirrorWindow: ...


class LocalSource:
    """This process's own observations (the same ones /metrics renders). A window holds
    what was recorded since the last drain, so it starts when it is opened."""

    name: SourceName = "local"

    def __init__(self, stats: Stats, mirrors: Mirrors | None = None) -> None:
        self.stats = stats
        self.mirrors = mirrors

    def lag(self, route: RouteConfig) -> float:
        return 0.0

    def begin(self, route: RouteConfig, start: float, now: float) -> float:
        for version in route.version_names:
            self.stats.take_window(route.name, version)
            if self.mirrors is not None:
                self.mirrors.get(route.name, version).take_window()
        return now

    async def mirror_window(
        self, route: RouteConfig, canary: str, start: float, end: float
    ) -> MirrorWindow:
        if self.mirrors is None:
            raise SourceError("this process counts no shadow answers")
        samples, mismatches = self.mirrors.get(route.name, canary).take_window()
        return MirrorWindow(samples, mismatches, start, end)

    async def window(
        self, route: RouteConfig, canary: str, stable: str, start: float, end: float
    ) -> Window:
        return Window(
            Sample(*self.stats.take_window(route.name, canary)),
            Sample(*self.stats.take_window(route.name, stable)),
            start,
            end,
        )


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _seconds(value: float) -> str:
    return f"{max(1, round(value * 1000))}ms"  # PromQL ranges take integer units


class PrometheusSource:
    """Windows from PromQL over every replica's series, queried at the window's end:
    requests and errors (5xx) per version as increase() over the window, forced reasons
    left out by the `reason` label exactly like the local window; latency as the
    increase() of each graygate_request_duration_seconds bucket. The series have no
    reason label, so latency includes forced requests."""

    name: SourceName = "prometheus"

    def __init__(self, config: PrometheusConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session

    def lag(self, route: RouteConfig) -> float:
        return self.config.scrape_interval

    def begin(self, route: RouteConfig, start: float, now: float) -> float:
        return start

    def queries(self, route: RouteConfig, start: float, end: float) -> dict[str, str]:
        matchers = [f"route={_quote(route.name)}"]
        if self.config.replicas_selector:
            matchers.append(self.config.replicas_selector)
        excluded = route.rollout.analysis.exclude_reasons
        counted = [*matchers]
        if excluded:
            counted.append(f"reason!~{_quote('|'.join(excluded))}")
        rng = _seconds(end - start)
        sel = ", ".join(counted)
        return {
            "requests": f"sum by (version) (increase({REQUESTS}{{{sel}}}[{rng}]))",
            "errors": f'sum by (version) (increase({REQUESTS}{{{sel}, code=~"5.."}}[{rng}]))',
            "buckets": (
                f"sum by (version, le) "
                f"(increase({DURATION}_bucket{{{', '.join(matchers)}}}[{rng}]))"
            ),
        }

    async def window(
        self, route: RouteConfig, canary: str, stable: str, start: float, end: float
    ) -> Window:
        queries = self.queries(route, start, end)
        try:
            async with asyncio.timeout(self.config.timeout):
                answers = await asyncio.gather(*(self._query(q, end) for q in queries.values()))
        except TimeoutError:
            raise SourceError(
                f"prometheus {self.config.url} did not answer within "
                f"{self.config.timeout:g}s (window {start:.3f}-{end:.3f})"
            ) from None
        requests, errors, buckets = answers
        if not requests:
            raise SourceError(
                f"prometheus {self.config.url} has no {REQUESTS} data for route "
                f"{route.name!r} in window {start:.3f}-{end:.3f} (is it scraping every replica"
                + (
                    f" with {self.config.replicas_selector}"
                    if self.config.replicas_selector
                    else ""
                )
                + "?)"
            )
        return Window(
            _sample(canary, requests, errors, buckets),
            _sample(stable, requests, errors, buckets),
            start,
            end,
        )

    def mirror_query(self, route: RouteConfig, canary: str, start: float, end: float) -> str:
        matchers = [f"route={_quote(route.name)}", f"version={_quote(canary)}"]
        if self.config.replicas_selector:
            matchers.append(self.config.replicas_selector)
        sel = ", ".join([*matchers, 'result!="dropped"'])
        rng = _seconds(end - start)
        return f"sum by (result) (increase({MIRROR_REQUESTS}{{{sel}}}[{rng}]))"

    async def mirror_window(
        self, route: RouteConfig, canary: str, start: float, end: float
    ) -> MirrorWindow:
        """Every replica's shadows of `canary` judged as one: increase() per result."""
        try:
            async with asyncio.timeout(self.config.timeout):
                rows = await self._query(self.mirror_query(route, canary, start, end), end)
        except TimeoutError:
            raise SourceError(
                f"prometheus {self.config.url} did not answer within {self.config.timeout:g}s "
                f"(mirror window {start:.3f}-{end:.3f})"
            ) from None
        if not rows:
            raise SourceError(
                f"prometheus {self.config.url} has no {MIRROR_REQUESTS} data for route "
                f"{route.name!r} version {canary!r} in window {start:.3f}-{end:.3f}"
            )
        samples = mismatches = 0
        for row in rows:
            n = round(_value(row))
            samples += n
            if row.get("metric", {}).get("result") != "match":
                mismatches += n
        return MirrorWindow(samples, mismatches, start, end)

    async def _query(self, query: str, at: float) -> list[dict[str, Any]]:
        url = f"{self.config.url}/api/v1/query"
        try:
            async with self.session.get(url, params={"query": query, "time": f"{at:.3f}"}) as r:
                text = await r.text()
                status = r.status
        except aiohttp.ClientError as exc:
            raise SourceError(f"prometheus {self.config.url} unreachable: {exc}") from exc
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("status") != "success":
            detail = body.get("error") if isinstance(body, dict) else text[:200]
            raise SourceError(f"prometheus {self.config.url} answered {status}: {detail}")
        data = body.get("data")
        result = data.get("result") if isinstance(data, dict) else None
        if not isinstance(result, list):
            raise SourceError(f"prometheus {self.config.url} answered without a result vector")
        return result


def _value(row: Mapping[str, Any]) -> float:
    try:
        v = float(row["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) and v > 0 else 0.0


def _sample(
    version: str,
    requests: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    buckets: list[dict[str, Any]],
) -> Sample:
    # increase() extrapolates to the window's edges, so counts come back fractional.
    def count(rows: list[dict[str, Any]]) -> int:
        return round(sum(_value(r) for r in rows if r.get("metric", {}).get("version") == version))

    n = count(requests)
    cumulative: dict[float, float] = {}
    for row in buckets:
        metric = row.get("metric", {})
        if metric.get("version") != version:
            continue
        with contextlib.suppress(KeyError, ValueError):
            le = float(metric["le"])  # "+Inf" parses as inf
            cumulative[le] = cumulative.get(le, 0.0) + _value(row)
    return Sample(n, min(n, count(errors)), (), _per_bucket(cumulative))


def _per_bucket(cumulative: Mapping[float, float]) -> Histogram:
    """Cumulative `le` counts -> counts per bucket; extrapolation can make a cumulative
    count dip below the previous bound's, which is clamped to 0."""
    out: list[tuple[float, int]] = []
    below = 0
    for le in sorted(cumulative):
        total = max(below, round(cumulative[le]))
        out.append((le, total - below))
        below = total
    return tuple(out)


class Sources:
    """One LocalSource and one PrometheusSource per distinct prometheus config, sharing
    an HTTP session that lives as long as the controller (`close`)."""

    def __init__(self, stats: Stats, mirrors: Mirrors | None = None) -> None:
        self.local = LocalSource(stats, mirrors)
        self._session: aiohttp.ClientSession | None = None
        self._prometheus: dict[PrometheusConfig, PrometheusSource] = {}

    def for_route(self, route: RouteConfig) -> MetricsSource:
        analysis = route.rollout.analysis
        if analysis.source != "prometheus" or analysis.prometheus is None:
            return self.local
        source = self._prometheus.get(analysis.prometheus)
        if source is None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            source = PrometheusSource(analysis.prometheus, self._session)
            self._prometheus[analysis.prometheus] = source
        return source

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._prometheus.clear()
