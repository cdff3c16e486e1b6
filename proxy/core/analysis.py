"""The statistics of the canary verdict: one window of canary and stable outcomes in,
pass / fail / need_more_samples out, with the figures that decided it. Latencies come as
samples (local source) or as histogram buckets (prometheus), see histogram_latencies.
Pure: standard library and config only. Every fail is a one-sided test at the configured
confidence, so a few unlucky requests cannot fail a canary by noise alone.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

from proxy.core.config.model import AnalysisConfig, MirrorStep

Verdict = Literal["pass", "fail", "need_more_samples"]
Figure = float | int | None

_NORMAL = NormalDist()
# p99 exceeds a limit exactly when more than this fraction of requests lies above it.
_P99_TAIL = 0.01
# Latencies rebuilt from a histogram are capped like the local reservoir (stats.py).
HISTOGRAM_SAMPLES = 5000

# (upper bound in seconds, requests in that bucket alone), ascending; +inf last if present.
Histogram = tuple[tuple[float, int], ...]


@dataclass(frozen=True)
class Sample:
    """Outcomes of one version in one window; latencies may be a bounded subsample, or
    come as a histogram (used only when `latencies` is empty)."""

    requests: int
    errors: int
    latencies: tuple[float, ...] = ()
    histogram: Histogram = ()

    def __post_init__(self) -> None:
        if self.requests < 0 or not 0 <= self.errors <= self.requests:
            raise ValueError(f"need 0 <= errors <= requests, got {self.errors}/{self.requests}")


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reasons: tuple[str, ...]  # one sentence per failed check
    figures: dict[str, Figure]  # None: not computed (too few samples or check disabled)

    def to_json(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "figures": {k: _json_number(v) for k, v in self.figures.items()},
        }


def verdict(canary: Sample, stable: Sample, cfg: AnalysisConfig) -> Judgement:
    """Judge one window of the canary against the stable version.

    Checks, each one-sided at ``cfg.confidence``: the Wilson lower bound of the canary
    error rate against ``max_error_rate``; a Farrington-Manning test of
    ``p_canary - p_stable > max_error_rate_increase``; an exact binomial test that more
    than 1 % of canary latencies exceed ``max_p99_latency``; a Mann-Whitney U test that
    canary latencies are stochastically larger than ``max_latency_ratio`` x stable's
    (and the observed p99 ratio agrees). A Sample that carries a histogram instead of
    latencies is judged on the values histogram_latencies rebuilds from it.

    >>> cfg = AnalysisConfig(min_samples=100, max_p99_latency=None, max_latency_ratio=None)
    >>> verdict(Sample(1000, 2), Sample(9000, 30), cfg).verdict
    'pass'
    >>> verdict(Sample(1000, 60), Sample(9000, 30), cfg).reasons[0]
    'canary error rate 6.00% is above the 1.00% ceiling (lower bound 4.48%)'
    >>> verdict(Sample(50, 50), Sample(9000, 30), cfg).verdict
    'need_more_samples'
    """
    alpha = 1.0 - cfg.confidence
    z_crit = _NORMAL.inv_cdf(cfg.confidence)
    canary_latencies = canary.latencies or histogram_latencies(canary.histogram)
    stable_latencies = stable.latencies or histogram_latencies(stable.histogram)
    figures: dict[str, Figure] = {
        "confidence": cfg.confidence,
        "canary_requests": canary.requests,
        "canary_errors": canary.errors,
        "canary_error_rate": _rate(canary),
        "stable_requests": stable.requests,
        "stable_errors": stable.errors,
        "stable_error_rate": _rate(stable),
        "error_rate_lower_bound": None,
        "error_increase_z": None,
        "error_increase_p": None,
        "canary_latency_samples": len(canary_latencies),
        "stable_latency_samples": len(stable_latencies),
        "canary_p99": None,
        "stable_p99": None,
        "p99_exceed_fraction": None,
        "p99_exceed_p": None,
        "latency_ratio_z": None,
        "latency_ratio_p": None,
    }
    if canary.requests < cfg.min_samples:
        return Judgement("need_more_samples", (), figures)

    reasons: list[str] = []

    lower = wilson_lower(canary.errors, canary.requests, z_crit)
    figures["error_rate_lower_bound"] = lower
    if lower > cfg.max_error_rate:
        reasons.append(
            f"canary error rate {canary.errors / canary.requests:.2%} is above the "
            f"{cfg.max_error_rate:.2%} ceiling (lower bound {lower:.2%})"
        )

    # Against a nearly idle stable version the difference is mostly stable's noise.
    if stable.requests >= cfg.min_samples:
        z = farrington_manning_z(
            canary.errors,
            canary.requests,
            stable.errors,
            stable.requests,
            cfg.max_error_rate_increase,
        )
        p = _normal_sf(z)
        figures["error_increase_z"] = z
        figures["error_increase_p"] = p
        if p < alpha:
            reasons.append(
                f"canary error rate {canary.errors / canary.requests:.2%} exceeds stable's "
                f"{stable.errors / stable.requests:.2%} by more than "
                f"{cfg.max_error_rate_increase:.2%} (p={p:.2g})"
            )

    if len(canary_latencies) >= cfg.min_samples:
        canary_sorted = sorted(canary_latencies)
        figures["canary_p99"] = percentile(canary_sorted, 0.99)
        if cfg.max_p99_latency is not None:
            limit = cfg.max_p99_latency
            above = len(canary_sorted) - bisect_right(canary_sorted, limit)
            p = binomial_sf(above, len(canary_sorted), _P99_TAIL)
            figures["p99_exceed_fraction"] = above / len(canary_sorted)
            figures["p99_exceed_p"] = p
            if p < alpha:
                reasons.append(
                    f"canary p99 {figures['canary_p99']:.3f}s is above {limit:.3f}s "
                    f"({above} of {len(canary_sorted)} samples above it, p={p:.2g})"
                )
        if cfg.max_latency_ratio is not None and len(stable_latencies) >= cfg.min_samples:
            ratio = cfg.max_latency_ratio
            stable_scaled = sorted(x * ratio for x in stable_latencies)
            stable_p99 = percentile(stable_scaled, 0.99) / ratio
            figures["stable_p99"] = stable_p99
            z = mann_whitney_z(canary_sorted, stable_scaled)
            p = _normal_sf(z)
            figures["latency_ratio_z"] = z
            figures["latency_ratio_p"] = p
            canary_p99 = percentile(canary_sorted, 0.99)
            # The rank test sees the whole distribution; the p99 guard keeps the verdict
            # about the tail the operator configured.
            if p < alpha and canary_p99 > ratio * stable_p99:
                reasons.append(
                    f"canary latency is above {ratio:g}x stable's "
                    f"(p99 {canary_p99:.3f}s vs {stable_p99:.3f}s, p={p:.2g})"
                )

    return Judgement("fail" if reasons else "pass", tuple(reasons), figures)


def mirror_verdict(
    samples: int, mismatches: int, elapsed: float, step: MirrorStep, confidence: float
) -> Judgement:
    """Judge a mirror step on every shadow answer compared since it began (a shadow_error
    counts as a mismatch: a canary that cannot answer differs from stable).

    Below ``min_samples``: need_more_samples. Then ``fail`` as soon as the Wilson lower
    bound of the mismatch ratio at ``confidence`` is above ``max_mismatch_ratio``, ``pass``
    once ``elapsed`` reaches the step's duration. Otherwise need_more_samples with the
    figure ``mirror_remaining`` > 0: the step is still running (decide holds, uncounted).

    >>> step = MirrorStep(600.0, max_mismatch_ratio=0.01, min_samples=200)
    >>> mirror_verdict(400, 0, 600.0, step, 0.99).verdict
    'pass'
    >>> mirror_verdict(400, 20, 30.0, step, 0.99).reasons[0]
    '20 of 400 shadow answers differed (5.00%), above the 1.00% limit (lower bound 3.01%)'
    >>> mirror_verdict(400, 2, 30.0, step, 0.99).figures["mirror_remaining"]
    570.0
    """
    if not 0 <= mismatches <= samples:
        raise ValueError(f"need 0 <= mismatches <= samples, got {mismatches}/{samples}")
    remaining = max(0.0, step.seconds - elapsed)
    figures: dict[str, Figure] = {
        "confidence": confidence,
        "mirror_samples": samples,
        "mirror_mismatches": mismatches,
        "mismatch_ratio": mismatches / samples if samples else None,
        "mismatch_lower_bound": None,
        "max_mismatch_ratio": step.max_mismatch_ratio,
        "min_samples": step.min_samples,
        "mirror_elapsed": round(elapsed, 3),
        "mirror_remaining": round(remaining, 3),
    }
    if samples < step.min_samples:
        return Judgement("need_more_samples", (), figures)
    lower = wilson_lower(mismatches, samples, _NORMAL.inv_cdf(confidence))
    figures["mismatch_lower_bound"] = lower
    if lower > step.max_mismatch_ratio:
        reason = (
            f"{mismatches} of {samples} shadow answers differed ({mismatches / samples:.2%}), "
            f"above the {step.max_mismatch_ratio:.2%} limit (lower bound {lower:.2%})"
        )
        return Judgement("fail", (reason,), figures)
    return Judgement("pass" if remaining <= 0 else "need_more_samples", (), figures)


def histogram_latencies(histogram: Histogram, limit: int = HISTOGRAM_SAMPLES) -> tuple[float, ...]:
    """Per-request latencies equivalent to a histogram, for the tests that rank samples.

    A bucket's n requests are spread evenly over it on a log scale (geometric bounds hold
    roughly log-uniform latencies; the first bucket, from 0, linearly); the +inf bucket is
    spread over (last bound, 2 x last bound]. Above `limit` requests the counts are thinned
    in proportion (largest remainders), as the local window keeps a bounded reservoir.
    Comparisons across buckets are exact; within a bucket this is a model, so the verdict's
    resolution is the bucket width (tests/test_analysis.py measures level and power).

    >>> histogram_latencies(((1.0, 2), (4.0, 1)))
    (0.25, 0.75, 2.0)
    """
    total = sum(n for _, n in histogram)
    if total <= 0:
        return ()
    counts = [max(0, n) for _, n in histogram]
    if total > limit:
        shares = [n * limit / total for n in counts]
        counts = [math.floor(x) for x in shares]
        order = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
        for i in order[: limit - sum(counts)]:
            counts[i] += 1
    finite = [b for b, _ in histogram if math.isfinite(b)]
    top = max(finite, default=1.0)
    out: list[float] = []
    lower = 0.0
    for (bound, _), n in zip(histogram, counts, strict=True):
        upper = bound if math.isfinite(bound) else 2 * top
        for k in range(n):
            f = (k + 0.5) / n
            if lower > 0.0:
                out.append(lower * (upper / lower) ** f)
            else:
                out.append(upper * f)
        lower = upper
    return tuple(out)


def wilson_lower(successes: int, n: int, z: float) -> float:
    """Wilson score lower bound of a proportion (one-sided with the given z)."""
    if n == 0:
        return 0.0
    p = successes / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))


def farrington_manning_z(x1: int, n1: int, x2: int, n2: int, delta: float) -> float:
    """z of H0: p1 - p2 <= delta, with the variance at the restricted MLE under p1 - p2 = delta.

    Unlike the Wald (unpooled) z, the restricted variance does not collapse when a small
    window happens to have no errors, so it stays near its nominal level at low counts.
    """
    p1, p2 = x1 / n1, x2 / n2
    diff = p1 - p2 - delta
    r1, r2 = _fm_restricted(p1, n1, p2, n2, delta)
    var = r1 * (1 - r1) / n1 + r2 * (1 - r2) / n2
    if var <= 0.0:
        # Only when delta == 0 and every outcome agrees: no evidence either way.
        return 0.0 if diff <= 0 else math.inf
    return diff / math.sqrt(var)


def _fm_restricted(p1: float, n1: int, p2: float, n2: int, delta: float) -> tuple[float, float]:
    """Restricted MLE (p1~, p2~) with p1~ - p2~ = delta (Farrington & Manning 1990, closed form)."""
    theta = n2 / n1
    a = 1 + theta
    b = -(1 + theta + p1 + theta * p2 + delta * (theta + 2))
    c = delta * delta + delta * (2 * p1 + theta + 1) + p1 + theta * p2
    d = -p1 * delta * (1 + delta)
    v = b**3 / (27 * a**3) - b * c / (6 * a * a) + d / (2 * a)
    u2 = b * b / (9 * a * a) - c / (3 * a)
    if u2 <= 0.0:
        r1 = -b / (3 * a)
    else:
        u = math.copysign(math.sqrt(u2), v) if v != 0 else math.sqrt(u2)
        cos_arg = max(-1.0, min(1.0, v / u**3))
        w = (math.pi + math.acos(cos_arg)) / 3
        r1 = 2 * u * math.cos(w) - b / (3 * a)
    r1 = min(1.0, max(delta, r1))
    return r1, min(1.0, max(0.0, r1 - delta))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (n up to a few thousand)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_pmf = (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )
    if k > n * p:
        # Upper tail: terms fall geometrically from pmf(k).
        term, total, i = math.exp(log_pmf), 0.0, k
        odds = p / (1 - p)
        while i <= n and term > 0.0:
            total += term
            if term < total * 1e-17:
                break
            term *= (n - i) / (i + 1) * odds
            i += 1
        return min(1.0, total)
    # Lower part is the short sum: 1 - P(X <= k - 1), summed downward from pmf(k - 1).
    term = math.exp(log_pmf) * k / (n - k + 1) * (1 - p) / p
    total, i = 0.0, k - 1
    while i >= 0 and term > 0.0:
        total += term
        term *= i / (n - i + 1) * (1 - p) / p
        i -= 1
    return max(0.0, 1.0 - total)


def mann_whitney_z(x_sorted: list[float], y_sorted: list[float]) -> float:
    """z of the one-sided Mann-Whitney U test that x is stochastically larger than y.

    Normal approximation with tie correction and continuity correction; both inputs
    sorted ascending. O(n) after the sort: ranks come from one merge.
    """
    n1, n2 = len(x_sorted), len(y_sorted)
    n = n1 + n2
    rank_sum_x = 0.0
    tie_term = 0.0
    i = j = 0
    rank = 0  # ranks assigned so far
    while i < n1 or j < n2:
        value = x_sorted[i] if j >= n2 or (i < n1 and x_sorted[i] <= y_sorted[j]) else y_sorted[j]
        tx = 0
        while i < n1 and x_sorted[i] == value:
            tx += 1
            i += 1
        ty = 0
        while j < n2 and y_sorted[j] == value:
            ty += 1
            j += 1
        t = tx + ty
        mid_rank = rank + (t + 1) / 2
        rank_sum_x += tx * mid_rank
        tie_term += t * t * t - t
        rank += t
    u = rank_sum_x - n1 * (n1 + 1) / 2
    mean = n1 * n2 / 2
    var = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    if var <= 0.0:
        return 0.0
    return (u - mean - 0.5) / math.sqrt(var)


def percentile(values_sorted: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default method)."""
    if not values_sorted:
        raise ValueError("percentile of no values")
    pos = q * (len(values_sorted) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values_sorted) - 1)
    return values_sorted[lo] + (values_sorted[hi] - values_sorted[lo]) * (pos - lo)


def _normal_sf(z: float) -> float:
    if math.isinf(z):
        return 0.0 if z > 0 else 1.0
    return 1.0 - _NORMAL.cdf(z)


def _rate(s: Sample) -> float | None:
    return s.errors / s.requests if s.requests else None


def _json_number(v: Figure) -> Figure:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
