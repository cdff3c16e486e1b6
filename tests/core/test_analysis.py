"""The canary verdict: error ceiling, error increase, p99 limit and latency ratio, judged on
simulated windows (seeded) so false-fail and detection rates are measured, not assumed."""

from __future__ import annotations

import json
import math
import random
import time
from bisect import bisect_left
from collections import Counter

import pytest

from proxy.core.analysis import (
    Histogram,
    Judgement,
    Sample,
    binomial_sf,
    farrington_manning_z,
    histogram_latencies,
    mann_whitney_z,
    percentile,
    verdict,
    wilson_lower,
)
from proxy.core.config.model import AnalysisConfig
from proxy.core.stats import BUCKETS

ERRORS_ONLY = AnalysisConfig(
    min_samples=200,
    max_error_rate=0.01,
    max_error_rate_increase=0.005,
    max_p99_latency=None,
    max_latency_ratio=None,
    confidence=0.99,
)
RATIO_ONLY = AnalysisConfig(min_samples=200, max_p99_latency=None, max_latency_ratio=1.5)


def binomial(rng: random.Random, n: int, p: float) -> int:
    """Exact binomial draw by geometric gaps between errors: O(errors), not O(n)."""
    if p <= 0.0:
        return 0
    log_q = math.log1p(-p)
    count, pos = 0, -1
    while True:
        pos += 1 + int(math.log(1.0 - rng.random()) / log_q)
        if pos >= n:
            return count
        count += 1


def window(rng: random.Random, n: int, p: float) -> Sample:
    return Sample(n, binomial(rng, n, p), ())


def lognormal(rng: random.Random, n: int, scale: float = 1.0) -> tuple[float, ...]:
    return tuple(scale * rng.lognormvariate(math.log(0.05), 0.5) for _ in range(n))


def fail_rate(judgements: list[Judgement]) -> float:
    return sum(j.verdict == "fail" for j in judgements) / len(judgements)


# --- errors -------------------------------------------------------------------------------


def test_equal_error_rates_rarely_fail() -> None:
    rng = random.Random(20240601)
    results = []
    for _ in range(2000):
        canary = window(rng, rng.randint(200, 1000), 0.005)
        stable = window(rng, rng.randint(200, 1000), 0.005)
        results.append(verdict(canary, stable, ERRORS_ONLY))
    assert all(j.verdict in ("pass", "fail") for j in results)
    assert fail_rate(results) <= 0.01


def test_equal_error_rates_against_busy_stable_rarely_fail() -> None:
    # At a 5 % step stable sees about 19 times the canary's traffic.
    rng = random.Random(7)
    results = []
    for _ in range(2000):
        n = rng.randint(200, 1000)
        results.append(verdict(window(rng, n, 0.005), window(rng, 19 * n, 0.005), ERRORS_ONLY))
    assert fail_rate(results) <= 0.01


def test_five_percent_canary_against_half_percent_stable_fails() -> None:
    rng = random.Random(11)
    results = [
        verdict(window(rng, 1000, 0.05), window(rng, 1000, 0.005), ERRORS_ONLY) for _ in range(2000)
    ]
    assert fail_rate(results) >= 0.99


def test_error_increase_alone_detects_a_worse_canary() -> None:
    # Ceiling out of reach, so only the two-proportion test can fail these windows.
    cfg = AnalysisConfig(
        min_samples=200, max_error_rate=1.0, max_p99_latency=None, max_latency_ratio=None
    )
    rng = random.Random(12)
    results = [verdict(window(rng, 1000, 0.05), window(rng, 1000, 0.005), cfg) for _ in range(2000)]
    assert fail_rate(results) >= 0.99
    failed = next(j for j in results if j.verdict == "fail")
    assert any("exceeds stable" in r for r in failed.reasons)
    assert not any("ceiling" in r for r in failed.reasons)


def test_error_ceiling_alone_fails_when_both_versions_are_bad() -> None:
    # Canary no worse than stable, but both at 3 %: the ceiling fails it; the increase
    # test fires only as often as its level allows.
    rng = random.Random(13)
    results = [
        verdict(window(rng, 2000, 0.03), window(rng, 2000, 0.03), ERRORS_ONLY) for _ in range(500)
    ]
    assert fail_rate(results) >= 0.99
    assert all(any("ceiling" in r for r in j.reasons) for j in results if j.verdict == "fail")
    increase = sum(any("exceeds stable" in r for r in j.reasons) for j in results)
    assert increase <= 5


@pytest.mark.parametrize("n", [200, 400, 1000])
def test_canary_at_the_ceiling_rarely_fails(n: int) -> None:
    # True rate exactly max_error_rate: H0 holds at its boundary. The Wilson bound is
    # approximate (about 1.2-2.1 % instead of 1 % here, from the lattice of counts).
    cfg = AnalysisConfig(
        min_samples=200,
        max_error_rate=0.01,
        max_error_rate_increase=1.0,
        max_p99_latency=None,
        max_latency_ratio=None,
    )
    rng = random.Random(n)
    results = [verdict(window(rng, n, 0.01), window(rng, n, 0.01), cfg) for _ in range(2000)]
    assert fail_rate(results) <= 0.03


@pytest.mark.parametrize(("n_canary", "n_stable"), [(200, 200), (200, 4000), (1000, 200)])
def test_canary_at_the_allowed_increase_rarely_fails(n_canary: int, n_stable: int) -> None:
    # Canary worse by exactly max_error_rate_increase: the boundary of H0. Small stable
    # windows often hold no error at all, where a Wald z would over-reject. With a few
    # expected errors the normal approximation gives about 0-2 % at the 1 % level.
    cfg = AnalysisConfig(
        min_samples=200,
        max_error_rate=1.0,
        max_error_rate_increase=0.005,
        max_p99_latency=None,
        max_latency_ratio=None,
    )
    rng = random.Random(n_canary * 7 + n_stable)
    results = [
        verdict(window(rng, n_canary, 0.01), window(rng, n_stable, 0.005), cfg) for _ in range(2000)
    ]
    assert fail_rate(results) <= 0.03


def test_few_errors_in_a_small_window_pass() -> None:
    stable = Sample(200, 0)
    for errors in range(4):
        j = verdict(Sample(200, errors), stable, ERRORS_ONLY)
        assert j.verdict == "pass", (errors, j.reasons)


def test_below_min_samples_needs_more_samples_whatever_the_outcomes() -> None:
    slow = tuple([10.0] * 199)
    for canary in (Sample(0, 0), Sample(199, 199, slow), Sample(10, 0)):
        j = verdict(canary, Sample(10_000, 0, tuple([0.01] * 1000)), AnalysisConfig())
        assert j.verdict == "need_more_samples"
        assert j.reasons == ()
        assert j.figures["canary_requests"] == canary.requests
    assert verdict(Sample(200, 0), Sample(200, 0), ERRORS_ONLY).verdict == "pass"


def test_increase_check_skipped_when_stable_is_nearly_idle() -> None:
    # 4 % vs 0 % would fail the increase test; with 50 stable requests it is not judged.
    cfg = AnalysisConfig(
        min_samples=200, max_error_rate=1.0, max_p99_latency=None, max_latency_ratio=None
    )
    j = verdict(Sample(1000, 40), Sample(50, 0), cfg)
    assert j.verdict == "pass"
    assert j.figures["error_increase_z"] is None
    assert j.figures["error_increase_p"] is None
    j = verdict(Sample(1000, 40), Sample(1000, 0), cfg)
    assert j.verdict == "fail"
    assert isinstance(j.figures["error_increase_z"], float)


def test_figures_and_json() -> None:
    j = verdict(Sample(1000, 60, lognormal(random.Random(1), 300)), Sample(9000, 30), ERRORS_ONLY)
    assert j.verdict == "fail"
    f = j.figures
    assert f["canary_errors"] == 60 and f["stable_requests"] == 9000
    assert f["canary_error_rate"] == pytest.approx(0.06)
    assert 0.01 < f["error_rate_lower_bound"] < 0.06  # type: ignore[operator]
    assert f["error_increase_p"] < 0.01  # type: ignore[operator]
    out = j.to_json()
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert out["verdict"] == "fail" and len(out["reasons"]) == 2  # type: ignore[arg-type]


def test_to_json_drops_non_finite_figures() -> None:
    j = Judgement("fail", ("x",), {"z": math.inf, "p": 0.0, "n": 3, "skip": None})
    assert j.to_json()["figures"] == {"z": None, "p": 0.0, "n": 3, "skip": None}


def test_sample_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        Sample(10, 11)
    with pytest.raises(ValueError):
        Sample(10, -1)


# --- latency ------------------------------------------------------------------------------


def test_latency_twice_stable_fails_ratio() -> None:
    rng = random.Random(21)
    results = [
        verdict(
            Sample(1000, 0, lognormal(rng, 1000, 2.0)),
            Sample(1000, 0, lognormal(rng, 1000)),
            RATIO_ONLY,
        )
        for _ in range(1000)
    ]
    assert fail_rate(results) >= 0.99
    assert all("latency" in r for j in results if j.verdict == "fail" for r in j.reasons)


def test_latency_like_stable_passes_ratio() -> None:
    rng = random.Random(22)
    results = [
        verdict(
            Sample(1000, 0, lognormal(rng, 1000)), Sample(1000, 0, lognormal(rng, 1000)), RATIO_ONLY
        )
        for _ in range(1000)
    ]
    assert 1 - fail_rate(results) >= 0.99


def test_latency_at_the_allowed_ratio_rarely_fails() -> None:
    rng = random.Random(23)
    results = [
        verdict(
            Sample(500, 0, lognormal(rng, 500, 1.5)),
            Sample(500, 0, lognormal(rng, 500)),
            RATIO_ONLY,
        )
        for _ in range(400)
    ]
    assert fail_rate(results) <= 0.02


def test_ratio_needs_a_worse_observed_p99_too() -> None:
    # Canary slower in the body but with the same tail: the rank test alone is not enough.
    rng = random.Random(24)
    stable = tuple(rng.uniform(0.01, 0.02) for _ in range(980)) + (1.0,) * 20
    canary = tuple(rng.uniform(0.05, 0.06) for _ in range(980)) + (1.0,) * 20
    j = verdict(Sample(1000, 0, canary), Sample(1000, 0, stable), RATIO_ONLY)
    assert j.figures["latency_ratio_p"] < 1e-6  # type: ignore[operator]
    assert j.verdict == "pass"


def test_p99_limit_fails_a_slow_tail_and_ignores_a_few_slow_requests() -> None:
    cfg = AnalysisConfig(min_samples=200, max_p99_latency=0.5, max_latency_ratio=None)
    fast = [0.01] * 1000
    # 3 % of requests above 0.5 s: p99 is clearly above the limit.
    j = verdict(Sample(1000, 0, tuple(fast[:970] + [0.9] * 30)), Sample(0, 0), cfg)
    assert j.verdict == "fail"
    assert j.figures["canary_p99"] == pytest.approx(0.9)
    assert j.figures["p99_exceed_fraction"] == pytest.approx(0.03)
    # 3 of 200 (1.5 %) above: observed p99 is above the limit, but that is noise.
    j = verdict(Sample(200, 0, tuple(fast[:197] + [0.9] * 3)), Sample(0, 0), cfg)
    assert j.figures["canary_p99"] > 0.5  # type: ignore[operator]
    assert j.verdict == "pass"


def test_p99_at_the_limit_rarely_fails() -> None:
    # Exactly 1 % of requests above the limit, windows of 200-2000 samples.
    cfg = AnalysisConfig(min_samples=200, max_p99_latency=0.5, max_latency_ratio=None)
    rng = random.Random(31)
    results = []
    for _ in range(1000):
        n = rng.randint(200, 2000)
        slow = binomial(rng, n, 0.01)
        lat = (0.9,) * slow + (0.1,) * (n - slow)
        results.append(verdict(Sample(n, 0, lat), Sample(0, 0), cfg))
    assert fail_rate(results) <= 0.015


# --- latency from histogram buckets (the prometheus source) --------------------------------


def binned(latencies: tuple[float, ...]) -> Histogram:
    """The per-bucket counts graygate_request_duration_seconds_bucket would hold."""
    counts = Counter(bisect_left(BUCKETS, x) for x in latencies)
    bounds = (*BUCKETS, math.inf)
    return tuple((b, counts.get(i, 0)) for i, b in enumerate(bounds))


def histogram_window(rng: random.Random, n: int, scale: float = 1.0) -> Sample:
    return Sample(n, 0, (), binned(lognormal(rng, n, scale)))


def histogram_fail_rate(scale: float, windows: int, seed: int, n: int = 1000) -> float:
    rng = random.Random(seed)
    results = [
        verdict(histogram_window(rng, n, scale), histogram_window(rng, n), RATIO_ONLY)
        for _ in range(windows)
    ]
    return fail_rate(results)


def test_histogram_latency_like_stable_passes_ratio() -> None:
    # Same distribution, 1,000 requests each, only the buckets known: measured 0 of 500 fail.
    assert 1 - histogram_fail_rate(1.0, 500, seed=51) >= 0.99


def test_histogram_latency_twice_stable_fails_ratio() -> None:
    # Canary twice as slow, buckets only: measured 498 of 500 windows fail (99.6 %),
    # as the per-request test does on the same distributions.
    assert histogram_fail_rate(2.0, 500, seed=52) >= 0.99


def test_histogram_latency_at_the_allowed_ratio_rarely_fails() -> None:
    # At exactly max_latency_ratio the result depends on how latencies fall inside buckets
    # 2-2.5x wide; for this distribution (sigma 0.5 around 50 ms) 0 of 300 fail. Narrower
    # spreads (sigma 0.25 around 200 ms) fail up to about 30 % at the exact boundary: the
    # bucket width is the resolution of a histogram (README, "Running several replicas").
    assert histogram_fail_rate(1.5, 300, seed=53) <= 0.02


def test_histogram_p99_limit_uses_the_buckets_above_it() -> None:
    cfg = AnalysisConfig(min_samples=200, max_p99_latency=0.5, max_latency_ratio=None)
    fast = (0.01,) * 970
    slow = Sample(1000, 0, (), binned(fast + (0.9,) * 30))
    j = verdict(slow, Sample(0, 0), cfg)
    assert j.verdict == "fail"
    assert j.figures["p99_exceed_fraction"] == pytest.approx(0.03)
    assert j.figures["canary_latency_samples"] == 1000
    ok = Sample(1000, 0, (), binned(fast + (0.4,) * 30))
    assert verdict(ok, Sample(0, 0), cfg).verdict == "pass"


def test_histogram_latencies_keep_buckets_and_thin_large_windows() -> None:
    h: Histogram = ((0.1, 3), (0.25, 0), (1.0, 2), (math.inf, 1))
    values = histogram_latencies(h)
    assert len(values) == 6 and list(values) == sorted(values)
    assert all(0 < v <= 0.1 for v in values[:3])
    assert all(0.25 < v <= 1.0 for v in values[3:5])
    assert 1.0 < values[5] <= 2.0
    big = histogram_latencies(((0.1, 30_000), (1.0, 10_001)), limit=5000)
    assert len(big) == 5000
    assert sum(v <= 0.1 for v in big) == 3750
    assert histogram_latencies(()) == () == histogram_latencies(((1.0, 0),))
    # Explicit latencies win over a histogram.
    j = verdict(Sample(300, 0, (0.01,) * 300, ((10.0, 300),)), Sample(0, 0), RATIO_ONLY)
    assert j.figures["canary_p99"] == pytest.approx(0.01)


def test_latency_checks_skipped_without_enough_samples_or_thresholds() -> None:
    slow = tuple([5.0] * 300)
    fast = tuple([0.01] * 300)
    cfg = AnalysisConfig(min_samples=200, max_p99_latency=0.5, max_latency_ratio=1.5)
    assert verdict(Sample(1000, 0, slow), Sample(1000, 0, fast), cfg).verdict == "fail"
    # Too few canary latency samples: neither latency check runs.
    j = verdict(Sample(1000, 0, slow[:199]), Sample(1000, 0, fast), cfg)
    assert j.verdict == "pass" and j.figures["canary_p99"] is None
    # Too few stable samples: only the ratio is skipped.
    j = verdict(Sample(1000, 0, slow), Sample(1000, 0, fast[:10]), cfg)
    assert j.figures["latency_ratio_p"] is None and j.figures["p99_exceed_p"] is not None
    # Thresholds off.
    off = AnalysisConfig(min_samples=200, max_p99_latency=None, max_latency_ratio=None)
    j = verdict(Sample(1000, 0, slow), Sample(1000, 0, fast), off)
    assert j.verdict == "pass" and j.figures["p99_exceed_p"] is None


# --- the statistics against slow references -----------------------------------------------


def test_mann_whitney_matches_a_quadratic_reference_with_ties() -> None:
    rng = random.Random(41)
    for _ in range(30):
        x = [rng.randint(0, 20) for _ in range(rng.randint(3, 60))]
        y = [rng.randint(0, 25) for _ in range(rng.randint(3, 60))]
        # U counts pairs x > y, ties count half.
        u = sum((a > b) + 0.5 * (a == b) for a in x for b in y)
        n1, n2 = len(x), len(y)
        n = n1 + n2
        ties = sum(t**3 - t for t in Counter(x + y).values())
        var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
        expected = (u - n1 * n2 / 2 - 0.5) / math.sqrt(var) if var > 0 else 0.0
        assert mann_whitney_z(sorted(x), sorted(y)) == pytest.approx(expected)
    assert mann_whitney_z([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.0


def test_mann_whitney_is_fast_on_large_windows() -> None:
    rng = random.Random(42)
    x = sorted(rng.random() for _ in range(5000))
    y = sorted(rng.random() for _ in range(5000))
    t0 = time.perf_counter()
    mann_whitney_z(x, y)
    assert time.perf_counter() - t0 < 0.5


def test_binomial_sf_matches_exact_sums() -> None:
    for n, k, p in [
        (200, 3, 0.01),
        (1000, 0, 0.01),
        (1000, 5, 0.01),
        (1000, 20, 0.01),
        (50, 7, 0.2),
    ]:
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert binomial_sf(k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-15)
    assert binomial_sf(11, 10, 0.5) == 0.0


def test_farrington_manning_restricted_estimate_maximises_the_likelihood() -> None:
    # The z must use the variance at the MLE under p1 - p2 = delta; check that MLE numerically.
    from proxy.core.analysis import _fm_restricted

    def loglik(r1: float, x1: int, n1: int, x2: int, n2: int, d: float) -> float:
        r2 = r1 - d
        if not (0 < r1 < 1 and 0 < r2 < 1):
            return -math.inf
        return (
            x1 * math.log(r1)
            + (n1 - x1) * math.log(1 - r1)
            + x2 * math.log(r2)
            + (n2 - x2) * math.log(1 - r2)
        )

    rng = random.Random(43)
    for _ in range(100):
        n1, n2 = rng.randint(50, 2000), rng.randint(50, 5000)
        x1, x2 = rng.randint(0, n1 // 10), rng.randint(0, n2 // 10)
        d = rng.choice([0.005, 0.01, 0.05])
        r1, r2 = _fm_restricted(x1 / n1, n1, x2 / n2, n2, d)
        assert r1 - r2 == pytest.approx(d)
        lo, hi = d + 1e-12, 1 - 1e-12
        for _ in range(200):
            a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            if loglik(a, x1, n1, x2, n2, d) < loglik(b, x1, n1, x2, n2, d):
                lo = a
            else:
                hi = b
        assert r1 == pytest.approx(lo, abs=1e-6)
    assert farrington_manning_z(0, 100, 0, 100, 0.0) == 0.0
    assert farrington_manning_z(50, 100, 5, 100, 0.005) > 5


def test_wilson_and_percentile_reference_values() -> None:
    # Wilson 95 % two-sided for 10/100 is [0.0552, 0.1744]; z = 1.96.
    assert wilson_lower(10, 100, 1.959964) == pytest.approx(0.0552, abs=1e-4)
    assert wilson_lower(0, 0, 2.0) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile(list(map(float, range(101))), 0.99) == 99.0
