import math
import random
from bisect import bisect_left

import pytest

from proxy.core.config.model import (
    AnalysisConfig,
    Config,
    Endpoint,
    Match,
    RolloutConfig,
    RouteConfig,
    VersionConfig,
)
from proxy.core.stats import (
    BUCKETS,
    RESERVOIR_SIZE,
    UPSTREAM_ERROR_KINDS,
    VERDICTS,
    Stats,
    VersionStats,
    Window,
    is_error,
)


def route(name, versions=("blue", "green"), exclude=("force_header", "force_cookie")):
    vcs = tuple(
        VersionConfig(v, (Endpoint(f"http://127.0.0.1:{9000 + i}", "127.0.0.1", 9000 + i),))
        for i, v in enumerate(versions)
    )
    weights = tuple((v, 100 if i == 0 else 0) for i, v in enumerate(versions))
    return RouteConfig(
        name=name,
        match=Match(),
        versions=vcs,
        stable=versions[0],
        weights=weights,
        rollout=RolloutConfig(analysis=AnalysisConfig(exclude_reasons=exclude)),
    )


def config(*routes):
    return Config(routes=routes)


def test_is_error_boundary():
    assert [is_error(s) for s in (200, 404, 499, 500, 502, 503, 504, 599)] == [
        False,
        False,
        False,
        True,
        True,
        True,
        True,
        True,
    ]


def test_buckets_sorted_and_positive():
    assert list(BUCKETS) == sorted(set(BUCKETS))
    assert BUCKETS[0] > 0


def test_record_counts_by_status_and_reason():
    vs = VersionStats(random.Random(1))
    vs.record(200, "weight", 0.001)
    vs.record(200, "weight", 0.002)
    vs.record(200, "cohort", 0.003)
    vs.record(503, "weight", 0.004)
    assert vs.counts == {(200, "weight"): 2, (200, "cohort"): 1, (503, "weight"): 1}
    assert vs.requests == 4
    assert vs.duration_sum == pytest.approx(0.010)


def test_histogram_bucket_placement_le_inclusive():
    vs = VersionStats(random.Random(1))
    values = [0.0, 0.0005, 0.00051, 0.001, 0.03, 0.25, 9.99, 10.0, 10.01, 1e6]
    for v in values:
        vs.record(200, "weight", v)
    expected = [0] * (len(BUCKETS) + 1)
    for v in values:
        # independent placement: first bound >= v, else +Inf
        idx = next((i for i, b in enumerate(BUCKETS) if v <= b), len(BUCKETS))
        expected[idx] += 1
    assert vs.bucket_counts == expected
    assert len(vs.bucket_counts) == len(BUCKETS) + 1
    # exact bound goes in its own bucket, just above goes in the next one
    assert vs.bucket_counts[0] == 2  # 0.0 and 0.0005
    assert vs.bucket_counts[-1] == 2  # 10.01 and 1e6
    assert sum(vs.bucket_counts) == len(values)
    assert math.isclose(vs.duration_sum, sum(values))


def test_window_counts_errors_and_excludes_forced_reasons():
    vs = VersionStats(random.Random(1), frozenset({"force_header", "force_cookie"}))
    vs.record(200, "weight", 0.01)
    vs.record(500, "cohort", 0.02)
    vs.record(502, "force_header", 0.03)
    vs.record(200, "force_cookie", 0.04)
    vs.record(504, "failover", 0.05)
    requests, errors, samples = vs.window.snapshot()
    assert (requests, errors) == (3, 2)
    assert sorted(samples) == [0.01, 0.02, 0.05]
    # excluded outcomes are still counted for /metrics
    assert vs.counts[(502, "force_header")] == 1
    assert vs.requests == 5


def test_window_reset():
    w = Window(random.Random(1))
    for i in range(10):
        w.add(i / 100, i % 3 == 0)
    assert w.snapshot()[:2] == (10, 4)
    w.reset()
    assert w.snapshot() == (0, 0, ())


def test_reservoir_bounded_and_deterministic():
    def fill(seed):
        w = Window(random.Random(seed), size=100)
        for i in range(10_000):
            w.add(float(i), False)
        return w.snapshot()

    a, b, c = fill(7), fill(7), fill(8)
    assert a == b
    assert a != c
    requests, errors, samples = a
    assert (requests, errors) == (10_000, 0)
    assert len(samples) == 100
    assert len(set(samples)) == 100
    assert all(0 <= s < 10_000 for s in samples)


def test_reservoir_keeps_everything_below_capacity():
    w = Window(random.Random(3))
    values = [i * 0.001 for i in range(RESERVOIR_SIZE)]
    for v in values:
        w.add(v, False)
    assert w.snapshot()[2] == tuple(values)
    w.add(99.0, False)
    assert len(w.snapshot()[2]) == RESERVOIR_SIZE


def test_reservoir_is_roughly_uniform():
    # Algorithm R keeps each offer with probability size/n: the late half of the stream
    # must be about half of the sample, not over- or under-represented.
    w = Window(random.Random(11), size=1000)
    n = 20_000
    for i in range(n):
        w.add(float(i), False)
    late = sum(1 for s in w.snapshot()[2] if s >= n / 2)
    assert 430 < late < 570


def test_upstream_errors_preinitialised_and_bounded():
    vs = VersionStats(random.Random(1))
    assert vs.upstream_errors == dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
    vs.upstream_error("connect")
    vs.upstream_error("connect")
    vs.upstream_error("timeout")
    assert vs.upstream_errors == {"connect": 2, "timeout": 1, "reset": 0, "protocol": 0}
    with pytest.raises(KeyError):
        vs.upstream_error("dns")


def test_stats_from_config_and_get():
    stats = Stats.from_config(config(route("shop"), route("api", ("v1",))), random.Random(1))
    assert [(r, v) for r, v, _ in stats.items()] == [
        ("shop", "blue"),
        ("shop", "green"),
        ("api", "v1"),
    ]
    assert stats.get("shop", "green") is stats["shop"]["green"]
    assert stats.get("shop", "green") is not stats.get("shop", "blue")
    with pytest.raises(KeyError):
        stats.get("shop", "red")
    with pytest.raises(KeyError):
        stats.get("nope", "blue")


def test_exclude_comes_from_analysis_config():
    stats = Stats.from_config(config(route("shop", exclude=("cohort",))), random.Random(1))
    vs = stats.get("shop", "blue")
    assert vs.exclude == frozenset({"cohort"})
    vs.record(200, "cohort", 0.1)
    vs.record(200, "force_header", 0.1)
    assert vs.window.snapshot()[0] == 1


def test_reconfigure_keeps_surviving_counters():
    stats = Stats.from_config(config(route("shop"), route("old", ("a",))), random.Random(1))
    blue = stats.get("shop", "blue")
    blue.record(200, "weight", 0.01)
    blue.upstream_error("reset")
    stats.get("shop", "green").record(500, "weight", 0.01)
    stats.count_verdict("shop", "fail")

    new = config(route("shop", ("blue", "red"), exclude=()), route("fresh", ("x",)))
    stats.reconfigure(new)

    assert stats.get("shop", "blue") is blue
    assert blue.counts == {(200, "weight"): 1}
    assert blue.upstream_errors["reset"] == 1
    assert blue.exclude == frozenset()
    assert stats.get("shop", "red").counts == {}
    assert stats.get("fresh", "x").counts == {}
    with pytest.raises(KeyError):
        stats.get("shop", "green")
    with pytest.raises(KeyError):
        stats.get("old", "a")
    assert dict(stats.verdicts()) == {
        "shop": {"pass": 0, "fail": 1, "need_more_samples": 0},
        "fresh": dict.fromkeys(VERDICTS, 0),
    }
    # a request that resolved `blue` before the reload keeps recording into the live object
    blue.record(200, "weight", 0.01)
    assert stats.get("shop", "blue").counts[(200, "weight")] == 2


def test_take_window_returns_and_resets():
    stats = Stats.from_config(config(route("shop")), random.Random(1))
    green = stats.get("shop", "green")
    for i in range(5):
        green.record(500 if i == 0 else 200, "cohort", 0.01 * (i + 1))
    green.record(200, "force_header", 9.0)
    requests, errors, samples = stats.take_window("shop", "green")
    assert (requests, errors) == (5, 1)
    assert sorted(samples) == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    assert stats.take_window("shop", "green") == (0, 0, ())
    # counters are cumulative and unaffected by draining the window
    assert green.requests == 6
    assert stats.take_window("shop", "blue") == (0, 0, ())


def test_count_verdict():
    stats = Stats.from_config(config(route("shop")), random.Random(1))
    assert dict(stats.verdicts()) == {"shop": dict.fromkeys(VERDICTS, 0)}
    stats.count_verdict("shop", "pass")
    stats.count_verdict("shop", "pass")
    stats.count_verdict("shop", "need_more_samples")
    assert dict(stats.verdicts())["shop"] == {"pass": 2, "fail": 0, "need_more_samples": 1}
    with pytest.raises(ValueError, match="unknown verdict"):
        stats.count_verdict("shop", "maybe")
    stats.count_verdict("gone", "pass")  # removed by a reload: ignored
    assert "gone" not in dict(stats.verdicts())


def test_bisect_agrees_with_linear_placement_on_random_values():
    rng = random.Random(5)
    vs = VersionStats(rng)
    expected = [0] * (len(BUCKETS) + 1)
    for _ in range(2000):
        v = rng.expovariate(10.0)
        vs.record(200, "weight", v)
        expected[next((i for i, b in enumerate(BUCKETS) if v <= b), len(BUCKETS))] += 1
    assert vs.bucket_counts == expected
    assert bisect_left(BUCKETS, BUCKETS[3]) == 3
