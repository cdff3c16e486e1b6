"""The dashboard's ring buffer: per-interval points from the cumulative Stats, bounded to its
span, following reloads; and GET /api/v1/routes/{route}/series (answers checked against the
OpenAPI document)."""

from __future__ import annotations

import asyncio
import random

import pytest
from test_admin import Harness, route, serve

from proxy.control.api import SERIES
from proxy.control.series import Series, bucket_p99
from proxy.core.config.load import parse_config
from proxy.core.stats import BUCKETS, Stats


def stats_for(*routes):
    config = parse_config({"routes": list(routes)}, env={})
    return config, Stats.from_config(config, random.Random(1))


def test_points_are_the_differences_between_samples():
    _, stats = stats_for(route("shop", "/"))
    series = Series(stats, interval=5.0, span=900.0)
    green = stats.get("shop", "green")
    green.record(200, "weight", 0.003)
    series.sample(100.0)  # baseline: what came before the first sample is no interval's
    assert series.points("shop", "green") == []
    for _ in range(98):
        green.record(200, "weight", 0.003)
    green.record(503, "weight", 0.004)
    green.record(200, "force_header", 0.2)  # forced traffic is served traffic: counted
    series.sample(105.0)
    (point,) = series.points("shop", "green")
    assert (point.time, point.seconds, point.requests, point.errors) == (105.0, 5.0, 100, 1)
    assert point.p99_seconds == 0.005  # the bucket of the 99th of 100: (0.0025, 0.005]
    assert point.to_json()["rate"] == 20.0 and point.to_json()["error_rate"] == 0.01

    series.sample(110.0)  # an idle interval is a point too: rate 0, no error rate, no p99
    idle = series.points("shop", "green")[-1].to_json()
    assert idle["requests"] == 0 and idle["rate"] == 0.0
    assert idle["error_rate"] is None and idle["p99_seconds"] is None
    assert [p.requests for p in series.points("shop", "blue")] == [0, 0]


def test_the_buffer_keeps_only_its_span():
    _, stats = stats_for(route("shop", "/"))
    series = Series(stats, interval=5.0, span=15.0)
    for i in range(10):
        stats.get("shop", "blue").record(200, "weight", 0.001)
        series.sample(100.0 + 5 * i)
    points = series.points("shop", "blue")
    assert [p.time for p in points] == [135.0, 140.0, 145.0]


def test_a_reload_drops_gone_routes_and_starts_new_ones_from_a_baseline():
    _, stats = stats_for(route("shop", "/"), route("api", "/api"))
    series = Series(stats)
    series.sample(0.0)
    series.sample(5.0)
    assert len(series.points("api", "blue")) == 1
    stats.reconfigure(parse_config({"routes": [route("shop", "/"), route("new", "/new")]}, {}))
    series.sample(10.0)
    assert series.points("api", "blue") == []
    assert series.points("new", "blue") == []  # baseline only
    assert len(series.points("shop", "blue")) == 2


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([0] * (len(BUCKETS) + 1), None),
        ([100] + [0] * len(BUCKETS), BUCKETS[0]),
        ([98, 1, 1] + [0] * (len(BUCKETS) - 2), BUCKETS[1]),
        ([0] * len(BUCKETS) + [5], None),  # above the last bound: unknown, not a number
    ],
)
def test_bucket_p99(counts, expected):
    assert bucket_p99(counts) == expected


@pytest.fixture
async def h(tmp_path):
    async for harness in serve(Harness(tmp_path)):
        yield harness


async def test_series_endpoint(h):
    series = h.app[SERIES]
    assert series.interval == 5.0 and series.span == 900.0
    series.sample(h.clock)
    h.stats.get("shop", "green").record(500, "weight", 0.01)
    h.clock += 5.0
    series.sample(h.clock)
    resp = await h.client.get("/api/v1/routes/shop/series")
    assert resp.status == 200
    body = await resp.json()
    assert body["route"] == "shop" and body["now"] == h.clock
    assert set(body["versions"]) == {"blue", "green"}
    (green,) = body["versions"]["green"]
    assert green["requests"] == 1 and green["error_rate"] == 1.0 and green["rate"] == 0.2

    h.clock += 901.0  # points older than the span are not served, even before they rotate
    body = await (await h.client.get("/api/v1/routes/shop/series")).json()
    assert body["versions"] == {"blue": [], "green": []}
    resp = await h.client.get("/api/v1/routes/nope/series")
    assert resp.status == 404 and (await resp.json())["error"]["field"] == "route"


async def test_the_sampling_task_takes_its_baseline_at_start_up(h):
    await asyncio.sleep(0)
    assert h.app[SERIES].points("shop", "blue") == []
    # Without the task's baseline this first sample would only set one, and make no point.
    h.app[SERIES].sample(h.clock + 5.0)
    assert len(h.app[SERIES].points("shop", "blue")) == 1
