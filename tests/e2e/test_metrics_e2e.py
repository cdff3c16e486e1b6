"""/metrics end to end: a known mix of requests through the real gateway, then the Prometheus
exposition parsed with the client library's own parser and compared exactly."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.helpers import free_port, route_config

TIMEOUTS = {"connect": "500ms", "read": "2s", "request": "3s"}
FORCE = [{"header": "X-Canary", "value": "always", "to": "canary"}]
KINDS = {"connect", "timeout", "reset", "protocol"}
PHASES = {"idle", "progressing", "paused", "promoted", "rolled_back"}
VERDICTS = {"pass", "fail", "need_more_samples"}

# DESIGN.md section 6: family name (as the parser names it) -> (type, sample labels).
FAMILIES: dict[str, tuple[str, set[str]]] = {
    "graygate_requests": ("counter", {"route", "version", "code", "reason"}),
    "graygate_request_duration_seconds": ("histogram", {"route", "version"}),
    "graygate_upstream_errors": ("counter", {"route", "version", "kind"}),
    "graygate_route_weight": ("gauge", {"route", "version"}),
    "graygate_rollout_state": ("gauge", {"route", "state"}),
    "graygate_rollout_step": ("gauge", {"route"}),
    "graygate_rollout_verdicts": ("counter", {"route", "verdict"}),
    "graygate_endpoint_available": ("gauge", {"route", "version", "endpoint"}),
    "graygate_inflight_requests": ("gauge", {"route", "version"}),
    # Beyond section 6: several replicas (README, "Running several replicas").
    "graygate_state_store_up": ("gauge", {"backend"}),
    "graygate_controller_leader": ("gauge", set()),
    # DESIGN.md section 8a: shadow traffic, every (route, version) pre-initialised.
    "graygate_mirror_requests": ("counter", {"route", "version", "result"}),
    "graygate_mirror_duration_seconds": ("histogram", {"route", "version"}),
    "graygate_mirror_dropped": ("counter", {"route", "version", "cause"}),
}
# Beyond DESIGN.md section 6, with samples only when `notifications:` are configured
# (tests/control/test_notify.py checks their values).
NOTIFICATION_FAMILIES = {
    "graygate_notifications_delivered",
    "graygate_notifications_failed",
    "graygate_notifications_dropped",
}
# Exposed sample names of each family (counters carry the _total suffix).
SAMPLE_NAMES = {
    "graygate_requests": {"graygate_requests_total"},
    "graygate_request_duration_seconds": {
        "graygate_request_duration_seconds_bucket",
        "graygate_request_duration_seconds_count",
        "graygate_request_duration_seconds_sum",
    },
    "graygate_upstream_errors": {"graygate_upstream_errors_total"},
    "graygate_rollout_verdicts": {"graygate_rollout_verdicts_total"},
    "graygate_mirror_requests": {"graygate_mirror_requests_total"},
    "graygate_mirror_duration_seconds": {
        "graygate_mirror_duration_seconds_bucket",
        "graygate_mirror_duration_seconds_count",
        "graygate_mirror_duration_seconds_sum",
    },
    "graygate_mirror_dropped": {"graygate_mirror_dropped_total"},
}


async def scrape(session: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with session.get(admin + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(families) == len(list(text_string_to_metric_families(text))), "duplicate family"
    return families


def samples(families: dict[str, Any], name: str) -> list[Sample]:
    return [s for f in families.values() for s in f.samples if s.name == name]


def by(samples_: list[Sample], *labels: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for s in samples_:
        key = tuple(s.labels[k] for k in labels)
        assert key not in out, f"duplicate series {s}"
        out[key] = s.value
    return out


async def wait_unavailable(session: aiohttp.ClientSession, admin: str, route: str) -> None:
    deadline = time.monotonic() + 5
    while True:
        fams = await scrape(session, admin)
        values = by(samples(fams, "graygate_endpoint_available"), "route", "version", "endpoint")
        if [v for (r, _, _), v in values.items() if r == route] == [0]:
            return
        assert time.monotonic() < deadline, f"endpoint of {route} still available: {values}"
        await asyncio.sleep(0.05)


async def setup(upstreams, gateway):
    blue = await upstreams("blue")
    green = await upstreams("green")

    async def sick(request: web.Request) -> web.StreamResponse:
        # Fails its health check; never receives proxied traffic while unhealthy.
        return web.Response(status=503 if request.path == "/healthz" else 200, text="sick")

    sick_up = await upstreams("sick", sick)
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connect refused
    shop = route_config(blue.url, green.url, force=FORCE)
    shop["match"] = {"host": "*", "path_prefix": "/shop"}
    down = route_config(sick_up.url, name="down", match={"host": "*", "path_prefix": "/down"})
    down["health_check"] = {"path": "/healthz", "interval": "100ms", "timeout": "500ms"}
    dead = route_config(dead_url, name="dead", match={"host": "*", "path_prefix": "/dead"})
    gw = await gateway([shop, down, dead], timeouts=TIMEOUTS)
    return gw, blue, green, sick_up, dead_url


async def test_request_mix_counts_histograms_and_every_family(upstreams, gateway):
    gw, blue, green, sick, dead_url = await setup(upstreams, gateway)
    async with aiohttp.ClientSession() as s:
        # At rest, before any request: every family exists, nothing is in flight.
        fams = await scrape(s, gw.admin_url)
        for name, (kind, _) in FAMILIES.items():
            assert name in fams, f"family {name} missing"
            assert fams[name].type == kind, (name, fams[name].type)
        await wait_unavailable(s, gw.admin_url, "down")

        async def get(path: str, headers: dict[str, str] | None = None) -> int:
            async with s.get(gw.url + path, headers=headers) as resp:
                await resp.read()
                return resp.status

        # Distinct paths on purpose: paths must never become label values.
        for i in range(37):
            assert await get(f"/shop/item/{i}?q={i}") == 200
        for i in range(13):
            assert await get(f"/shop/cart/{i}", {"X-Canary": "always"}) == 200
        for i in range(5):
            assert await get(f"/down/{i}") == 503
        for i in range(3):
            assert await get(f"/dead/{i}") == 502
        assert await get("/nowhere") == 404
        assert len(blue.requests) == 37 and len(green.requests) == 13
        assert not [r for r in sick.requests if r["path"] != "/healthz"]

        fams = await scrape(s, gw.admin_url)

        # Names, types and label sets exactly as in DESIGN.md section 6.
        for name, (kind, labels) in FAMILIES.items():
            fam = fams[name]
            assert fam.type == kind, (name, fam.type)
            assert fam.samples, f"{name} has no samples"
            for sample in fam.samples:
                assert sample.name in SAMPLE_NAMES.get(name, {name}), sample
                extra = {"le"} if sample.name.endswith("_bucket") else set()
                assert set(sample.labels) == labels | extra, sample
        for name in NOTIFICATION_FAMILIES:
            assert fams[name].type == "counter" and not fams[name].samples
        known = FAMILIES.keys() | NOTIFICATION_FAMILIES
        assert not [n for n in fams if n.startswith("graygate_") and n not in known]

        requests = by(
            samples(fams, "graygate_requests_total"), "route", "version", "code", "reason"
        )
        assert requests == {
            ("shop", "blue", "200", "weight"): 37,
            ("shop", "green", "200", "force_header"): 13,
            ("down", "blue", "503", "weight"): 5,
            ("dead", "blue", "502", "weight"): 3,
        }

        counts = by(samples(fams, "graygate_request_duration_seconds_count"), "route", "version")
        assert counts == {
            ("shop", "blue"): 37,
            ("shop", "green"): 13,
            ("down", "blue"): 5,
            ("dead", "blue"): 3,
        }
        sums = by(samples(fams, "graygate_request_duration_seconds_sum"), "route", "version")
        assert sums[("shop", "blue")] > 0 and sums[("shop", "green")] > 0
        buckets = samples(fams, "graygate_request_duration_seconds_bucket")
        for key, count in counts.items():
            series = [b for b in buckets if (b.labels["route"], b.labels["version"]) == key]
            les = [float(b.labels["le"]) for b in series]
            assert les == sorted(les) and les[-1] == float("inf"), les
            values = [b.value for b in series]
            assert values == sorted(values), (key, values)  # cumulative
            assert values[-1] == count
            assert values[les.index(10.0)] == count  # every request took less than 10 s

        errors = by(samples(fams, "graygate_upstream_errors_total"), "route", "version", "kind")
        expected_errors = {
            (r, v, k): 0
            for r, v in (("shop", "blue"), ("shop", "green"), ("down", "blue"), ("dead", "blue"))
            for k in KINDS
        }
        expected_errors[("dead", "blue", "connect")] = 3
        assert errors == expected_errors

        inflight = by(samples(fams, "graygate_inflight_requests"), "route", "version")
        assert inflight == {
            ("shop", "blue"): 0,
            ("shop", "green"): 0,
            ("down", "blue"): 0,
            ("dead", "blue"): 0,
        }

        available = by(samples(fams, "graygate_endpoint_available"), "route", "version", "endpoint")
        assert available[("shop", "blue", blue.url)] == 1
        assert available[("shop", "green", green.url)] == 1
        assert available[("down", "blue", sick.url)] == 0
        assert set(available) == {
            ("shop", "blue", blue.url),
            ("shop", "green", green.url),
            ("down", "blue", sick.url),
            ("dead", "blue", dead_url),
        }

        weights = by(samples(fams, "graygate_route_weight"), "route", "version")
        assert weights == {
            ("shop", "blue"): 100,
            ("shop", "green"): 0,
            ("down", "blue"): 100,
            ("dead", "blue"): 100,
        }
        states = by(samples(fams, "graygate_rollout_state"), "route", "state")
        assert states == {
            (r, p): int(p == "idle") for r in ("shop", "down", "dead") for p in PHASES
        }
        verdicts = by(samples(fams, "graygate_rollout_verdicts_total"), "route", "verdict")
        assert verdicts == {(r, v): 0 for r in ("shop", "down", "dead") for v in VERDICTS}
        steps = by(samples(fams, "graygate_rollout_step"), "route")
        async with s.get(gw.admin_url + "/api/v1/routes/shop") as resp:
            shop_step = (await resp.json())["state"]["rollout"]["step"]
        assert steps[("shop",)] == shop_step


async def test_route_weight_follows_put_and_rollout_gauges_follow_the_rollout(upstreams, gateway):
    blue = await upstreams("blue")
    green = await upstreams("green")
    route = route_config(
        blue.url,
        green.url,
        rollout={
            "steps": [20, 50, 100],
            "interval": "1s",
            "analysis": {"min_samples": 50},
            "failure_limit": 2,
        },
    )
    gw = await gateway([route], timeouts=TIMEOUTS)
    admin = gw.admin_url
    async with aiohttp.ClientSession() as s:
        async with s.put(
            admin + "/api/v1/routes/shop/weights", json={"blue": 70, "green": 30}
        ) as r:
            assert r.status == 200, await r.text()
        fams = await scrape(s, admin)
        weights = by(samples(fams, "graygate_route_weight"), "route", "version")
        assert weights == {("shop", "blue"): 70, ("shop", "green"): 30}

        async with s.put(
            admin + "/api/v1/routes/shop/weights", json={"blue": 100, "green": 0}
        ) as r:
            assert r.status == 200, await r.text()
        async with s.post(admin + "/api/v1/routes/shop/rollout", json={"canary": "green"}) as r:
            assert r.status == 200, await r.text()
        fams = await scrape(s, admin)
        assert by(samples(fams, "graygate_route_weight"), "route", "version") == {
            ("shop", "blue"): 80,
            ("shop", "green"): 20,
        }
        states = by(samples(fams, "graygate_rollout_state"), "route", "state")
        assert states == {("shop", p): int(p == "progressing") for p in PHASES}
        assert by(samples(fams, "graygate_rollout_step"), "route") == {("shop",): 0}

        # No traffic: the first window (about one interval after the start) is inconclusive.
        deadline = time.monotonic() + 4
        while True:
            fams = await scrape(s, admin)
            verdicts = by(samples(fams, "graygate_rollout_verdicts_total"), "route", "verdict")
            if verdicts[("shop", "need_more_samples")] >= 1:
                break
            assert time.monotonic() < deadline, verdicts
            await asyncio.sleep(0.1)
        assert verdicts[("shop", "pass")] == 0 and verdicts[("shop", "fail")] == 0

        async with s.post(admin + "/api/v1/routes/shop/rollout/abort") as r:
            assert r.status == 200, await r.text()
        fams = await scrape(s, admin)
        states = by(samples(fams, "graygate_rollout_state"), "route", "state")
        assert states == {("shop", p): int(p == "rolled_back") for p in PHASES}
        assert by(samples(fams, "graygate_route_weight"), "route", "version") == {
            ("shop", "blue"): 100,
            ("shop", "green"): 0,
        }
        inflight = by(samples(fams, "graygate_inflight_requests"), "route", "version")
        assert inflight == {("shop", "blue"): 0, ("shop", "green"): 0}
