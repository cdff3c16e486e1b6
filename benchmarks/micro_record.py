"""Micro-benchmark: ns per VersionStats.record() against prometheus_client's labelled
Counter.inc() and Histogram.observe(), the cost the custom collector avoids on the hot path.

Run: .venv/bin/python benchmarks/micro_record.py [--n 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import timeit

from prometheus_client import CollectorRegistry, Counter, Histogram

from proxy.core.stats import BUCKETS, VersionStats


def best_ns(stmt: str, env: dict[str, object], n: int, repeat: int) -> float:
    times = timeit.repeat(stmt, globals=env, number=n, repeat=repeat)
    return min(times) / n * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200_000, help="calls per timing run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    args = parser.parse_args()

    rng = random.Random(1)
    # A realistic mix: mostly 200 within a few ms, some forced, a few errors; more calls
    # than the reservoir holds, so the replacement branch is exercised too.
    latencies = [rng.expovariate(300.0) for _ in range(4096)]
    statuses = [503 if rng.random() < 0.01 else 200 for _ in range(4096)]
    reasons = ["force_header" if rng.random() < 0.05 else "cohort" for _ in range(4096)]
    vs = VersionStats(random.Random(2), frozenset({"force_header", "force_cookie"}))
    registry = CollectorRegistry()
    counter = Counter(
        "bench_requests", "x", ["route", "version", "code", "reason"], registry=registry
    )
    histogram = Histogram(
        "bench_duration_seconds", "x", ["route", "version"], buckets=BUCKETS, registry=registry
    )
    env: dict[str, object] = {
        "vs": vs,
        "counter": counter,
        "histogram": histogram,
        "lat": latencies,
        "st": statuses,
        "rs": reasons,
    }
    cases = {
        "loop overhead (index arithmetic only)": "i = (i + 1) & 4095; lat[i]; st[i]; rs[i]",
        "VersionStats.record()": "i = (i + 1) & 4095; vs.record(st[i], rs[i], lat[i])",
        "Counter.labels(...).inc()": (
            "i = (i + 1) & 4095; counter.labels('shop', 'green', str(st[i]), rs[i]).inc()"
        ),
        "Histogram.labels(...).observe()": (
            "i = (i + 1) & 4095; histogram.labels('shop', 'green').observe(lat[i])"
        ),
    }
    for name, stmt in cases.items():
        env["i"] = 0
        ns = best_ns(f"global i\n{stmt}", env, args.n, args.repeat)
        print(f"{name:40s} {ns:8.0f} ns/call")
    print(f"window: {vs.window.requests} requests, {len(vs.window.samples)} samples kept")


if __name__ == "__main__":
    main()
