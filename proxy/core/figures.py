"""Figures that cross processes with `workers: N`: a worker takes what its Stats and Mirrors
counted since the last batch (take, take_mirrors), the supervisor adds the batch into its own
(merge, merge_mirrors), so /metrics, the API and the rollout see every request and shadow.
Pure: plain values in and out; the hot path is untouched, a batch swaps counters out whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.core.mirror import DROP_CAUSES, RESULTS, DropCause, MirrorResult, Mirrors, Mismatch
from proxy.core.stats import BUCKETS, UPSTREAM_ERROR_KINDS, Stats

Pair = tuple[str, str]  # (route, version)


@dataclass(frozen=True, slots=True)
class VersionDelta:
    """What one (route, version) of one worker counted since its previous batch."""

    route: str
    version: str
    counts: dict[tuple[int, str], int]  # (status, reason) -> requests
    buckets: list[int]  # per bucket, not cumulative, len(BUCKETS) + 1
    duration_sum: float
    upstream_errors: dict[str, int]
    window_requests: int
    window_errors: int
    samples: list[float]  # latencies of the unforced requests (every one, below the cap)
    inflight: int  # absolute: requests in flight on this worker right now


def take(stats: Stats) -> list[VersionDelta]:
    """Swap out every counter that moved since the last call and return them; a pair with
    nothing counted and nothing in flight is left out (the supervisor reads that as 0)."""
    out: list[VersionDelta] = []
    for route, version, vs in stats.items():
        window = vs.window
        moved = window.requests or any(vs.bucket_counts) or any(vs.upstream_errors.values())
        if not moved and not vs.inflight:
            continue
        counts, vs.counts = vs.counts, {}
        buckets, vs.bucket_counts = vs.bucket_counts, [0] * (len(BUCKETS) + 1)
        duration_sum, vs.duration_sum = vs.duration_sum, 0.0
        errors, vs.upstream_errors = vs.upstream_errors, dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
        requests, window_errors, samples = window.requests, window.errors, window.samples
        window.reset()
        out.append(
            VersionDelta(
                route,
                version,
                counts,
                buckets,
                duration_sum,
                {k: n for k, n in errors.items() if n},
                requests,
                window_errors,
                samples,
                vs.inflight,
            )
        )
    return out


def merge(stats: Stats, deltas: Iterable[VersionDelta]) -> None:
    """Add a worker's batch into the supervisor's Stats. A pair the supervisor no longer
    has (a reload removed its route meanwhile) is dropped, as a single process drops it."""
    for d in deltas:
        try:
            vs = stats.get(d.route, d.version)
        except KeyError:
            continue
        counts = vs.counts
        for key, n in d.counts.items():
            counts[key] = counts.get(key, 0) + n
        buckets = vs.bucket_counts
        for i, n in enumerate(d.buckets):
            buckets[i] += n
        vs.duration_sum += d.duration_sum
        for kind, n in d.upstream_errors.items():
            vs.upstream_errors[kind] += n
        window = vs.window
        for seconds in d.samples:
            window.add(seconds, False)  # the reservoir decides which latencies it keeps
        # Counts are exact even if a worker's own reservoir had to drop samples.
        window.requests += d.window_requests - len(d.samples)
        window.errors += d.window_errors


def inflight_of(deltas: Iterable[VersionDelta]) -> dict[Pair, int]:
    return {(d.route, d.version): d.inflight for d in deltas if d.inflight}


def set_inflight(stats: Stats, per_worker: Iterable[Mapping[Pair, int]]) -> None:
    """The inflight gauge is a sum over the live workers' last reports."""
    totals: dict[Pair, int] = {}
    for report in per_worker:
        for pair, n in report.items():
            totals[pair] = totals.get(pair, 0) + n
    for route, version, vs in stats.items():
        vs.inflight = totals.get((route, version), 0)


@dataclass(frozen=True, slots=True)
class MirrorDelta:
    """What one (route, shadow version) of one worker's Mirrors counted since its previous
    batch, with the mismatches it recorded meanwhile (oldest first)."""

    route: str
    version: str
    results: dict[MirrorResult, int]
    dropped: dict[DropCause, int]
    buckets: list[int]  # per bucket, not cumulative, len(BUCKETS) + 1
    duration_sum: float
    window_samples: int
    window_mismatches: int
    recent: list[Mismatch]


def take_mirrors(mirrors: Mirrors) -> list[MirrorDelta]:
    """As `take`, for shadow copies; a pair that counted nothing is left out. The worker's
    own recent mismatches leave with the batch (the supervisor keeps the route's last 50)."""
    out: list[MirrorDelta] = []
    for route, version, ms in mirrors.items():
        if not any(ms.results.values()) and not ms.recent:
            continue
        results, ms.results = ms.results, dict.fromkeys(RESULTS, 0)
        dropped, ms.dropped = ms.dropped, dict.fromkeys(DROP_CAUSES, 0)
        buckets, ms.bucket_counts = ms.bucket_counts, [0] * (len(BUCKETS) + 1)
        duration_sum, ms.duration_sum = ms.duration_sum, 0.0
        samples, mismatches = ms.take_window()
        recent = list(ms.recent)
        ms.recent.clear()
        out.append(
            MirrorDelta(
                route,
                version,
                {k: n for k, n in results.items() if n},
                {k: n for k, n in dropped.items() if n},
                buckets,
                duration_sum,
                samples,
                mismatches,
                recent,
            )
        )
    return out


def merge_mirrors(mirrors: Mirrors, deltas: Iterable[MirrorDelta]) -> None:
    """Add a worker's shadow batch into the supervisor's Mirrors (a pair a reload removed
    meanwhile is dropped, as for requests)."""
    for d in deltas:
        try:
            ms = mirrors.get(d.route, d.version)
        except KeyError:
            continue
        for result, n in d.results.items():
            ms.results[result] += n
        for cause, n in d.dropped.items():
            ms.dropped[cause] += n
        for i, n in enumerate(d.buckets):
            ms.bucket_counts[i] += n
        ms.duration_sum += d.duration_sum
        ms.window_samples += d.window_samples
        ms.window_mismatches += d.window_mismatches
        ms.recent.extend(d.recent)
