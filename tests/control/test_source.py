"""Metrics sources: the local window, and PromQL against a fake Prometheus HTTP API (real
aiohttp server on loopback) for the queries sent, the figures built from the answers, and
every way Prometheus can fail (unreachable, slow, error, no data) turned into SourceError."""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.control.source import LocalSource, PrometheusSource, SourceError, Sources, _per_bucket
from proxy.core.config.load import parse_config
from proxy.core.stats import Stats
from tests.helpers import free_port, route_config, serve_app

START, END = 1000.0, 1003.0


def config(**prometheus: Any) -> Any:
    route = route_config("http://127.0.0.1:9", "http://127.0.0.1:10", rollout={"interval": "3s"})
    return parse_config(
        {
            "analysis": {
                "source": "prometheus",
                "prometheus": {"url": "http://127.0.0.1:1", "scrape_interval": "1s", **prometheus},
            },
            "routes": [route],
        },
        env={},
    )


def vector(*rows: tuple[dict[str, str], float]) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": m, "value": [END, str(v)]} for m, v in rows],
        },
    }


class FakePrometheus:
    """Answers /api/v1/query by the query's first words; records what was asked."""

    def __init__(self) -> None:
        self.asked: list[dict[str, str]] = []
        self.delay = 0.0
        self.answers: dict[str, Any] = {}

    async def query(self, request: web.Request) -> web.Response:
        self.asked.append(dict(request.query))
        await asyncio.sleep(self.delay)
        q = request.query["query"]
        kind = "buckets" if "_bucket" in q else "errors" if 'code=~"5.."' in q else "requests"
        answer = self.answers.get(kind, vector())
        if isinstance(answer, web.Response):
            return answer
        return web.json_response(answer)


@pytest.fixture
async def prom() -> Any:
    fake = FakePrometheus()
    app = web.Application()
    app.router.add_get("/api/v1/query", fake.query)
    runner, port = await serve_app(app)
    fake.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield fake
    await runner.cleanup()


async def window(url: str, **prometheus: Any) -> Any:
    cfg = config(url=url, **prometheus)
    route = cfg.routes[0]
    assert route.rollout.analysis.prometheus is not None
    async with aiohttp.ClientSession() as session:
        source = PrometheusSource(route.rollout.analysis.prometheus, session)
        return await source.window(route, "green", "blue", START, END)


async def test_queries_name_the_route_selector_and_excluded_reasons(prom):
    prom.answers["requests"] = vector(({"version": "green"}, 300.4), ({"version": "blue"}, 2700))
    await window(prom.url, replicas_selector='job="graygate"')
    assert len(prom.asked) == 3
    assert {a["time"] for a in prom.asked} == {"1003.000"}
    queries = sorted(a["query"] for a in prom.asked)
    sel = 'route="shop", job="graygate"'
    reasons = 'reason!~"force_header|force_cookie"'
    assert queries == sorted(
        [
            f"sum by (version) (increase(graygate_requests_total{{{sel}, {reasons}}}[3000ms]))",
            f"sum by (version) (increase(graygate_requests_total{{{sel}, {reasons}, "
            f'code=~"5.."}}[3000ms]))',
            f"sum by (version, le) (increase(graygate_request_duration_seconds_bucket{{{sel}}}"
            "[3000ms]))",
        ]
    )


async def test_window_figures_from_increase_and_buckets(prom):
    prom.answers["requests"] = vector(({"version": "green"}, 300.4), ({"version": "blue"}, 2699.6))
    prom.answers["errors"] = vector(({"version": "green"}, 30.2))
    prom.answers["buckets"] = vector(
        ({"version": "green", "le": "0.1"}, 200.2),
        ({"version": "green", "le": "0.25"}, 299.9),
        ({"version": "green", "le": "+Inf"}, 300.1),
        ({"version": "blue", "le": "0.1"}, 2700),
        ({"version": "blue", "le": "0.25"}, 2700),
        ({"version": "blue", "le": "+Inf"}, 2700),
    )
    w = await window(prom.url)
    assert (w.canary.requests, w.canary.errors) == (300, 30)
    assert (w.stable.requests, w.stable.errors) == (2700, 0)
    assert w.canary.histogram == ((0.1, 200), (0.25, 100), (math.inf, 0))
    assert w.stable.histogram == ((0.1, 2700), (0.25, 0), (math.inf, 0))
    assert (w.start, w.end) == (START, END)


async def test_no_data_unreachable_slow_and_errors_are_source_errors(prom):
    with pytest.raises(SourceError, match=r"no graygate_requests_total data for route 'shop'"):
        await window(prom.url, replicas_selector='job="gg"')
    prom.answers["requests"] = web.json_response(
        {"status": "error", "errorType": "bad_data", "error": "parse error"}, status=400
    )
    with pytest.raises(SourceError, match=r"answered 400: parse error"):
        await window(prom.url)
    prom.answers["requests"] = web.Response(text="<html>proxy error</html>", status=502)
    with pytest.raises(SourceError, match=r"answered 502: <html>"):
        await window(prom.url)
    prom.delay = 0.5
    with pytest.raises(SourceError, match=r"did not answer within 0.2s"):
        await window(prom.url, timeout="200ms")
    with pytest.raises(SourceError, match=r"unreachable"):
        await window(f"http://127.0.0.1:{free_port()}")


def test_per_bucket_clamps_dips_from_extrapolation():
    assert _per_bucket({0.1: 10.4, 0.5: 9.8, math.inf: 12.0}) == (
        (0.1, 10),
        (0.5, 0),
        (math.inf, 2),
    )
    assert _per_bucket({}) == ()


async def test_local_source_drains_its_window_and_starts_at_begin():
    cfg = config()
    route = cfg.routes[0]
    stats = Stats.from_config(cfg, random.Random(1))
    stats.get("shop", "green").record(200, "weight", 0.01)
    source = LocalSource(stats)
    assert source.begin(route, 5.0, 7.0) == 7.0  # what was recorded before is dropped
    stats.get("shop", "green").record(500, "weight", 0.02)
    stats.get("shop", "green").record(200, "force_header", 0.02)  # excluded from the window
    w = await source.window(route, "green", "blue", 7.0, 9.0)
    assert (w.canary.requests, w.canary.errors, w.canary.latencies) == (1, 1, (0.02,))
    assert w.stable.requests == 0
    assert (await source.window(route, "green", "blue", 9.0, 11.0)).canary.requests == 0


async def test_sources_pick_per_route_and_share_one_session():
    cfg = config()
    sources = Sources(Stats.from_config(cfg))
    prom_route = cfg.routes[0]
    first = sources.for_route(prom_route)
    assert isinstance(first, PrometheusSource) and sources.for_route(prom_route) is first
    local_cfg = parse_config({"routes": [{**_route_dict(), "name": "local"}]}, env={})
    assert sources.for_route(local_cfg.routes[0]) is sources.local
    await sources.close()


def _route_dict() -> dict[str, Any]:
    return {"name": "x", "versions": {"blue": {"endpoints": ["http://127.0.0.1:9"]}}}
