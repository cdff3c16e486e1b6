"""Shadow traffic in the control plane, on a real Mirrors filled with real comparisons:
GET /api/v1/routes/{route}/mirror (checked against openapi.yaml), `graygate mirror`, the
graygate_mirror_* series, the workers' batches (take_mirrors / merge_mirrors) and the mirror
window of both metrics sources."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.control import ctl_mirror
from proxy.control.admin import make_admin_app
from proxy.control.api import AdminContext
from proxy.control.metrics import make_registry, render
from proxy.control.source import LocalSource, PrometheusSource, SourceError
from proxy.control.store.events import EventLog
from proxy.core.config.load import parse_config
from proxy.core.config.model import CompareConfig
from proxy.core.figures import merge_mirrors, take_mirrors
from proxy.core.mirror import Capture, Mirrors, Mismatch, compare
from proxy.core.rollout import start
from proxy.core.state import PolicyStore
from proxy.core.stats import Stats
from tests.helpers.openapi_check import ResponseChecker

AT = 1_800_000_000.0
RULES = CompareConfig(headers=("content-type",), body="json", ignore_json_paths=("$.at",))


def make_config(prometheus: bool = False) -> Any:
    top: dict[str, Any] = {}
    if prometheus:
        top["analysis"] = {
            "source": "prometheus",
            "prometheus": {"url": "http://127.0.0.1:1", "scrape_interval": "1s"},
        }
    return parse_config(
        {
            **top,
            "routes": [
                {
                    "name": "shop",
                    "versions": {
                        "blue": {"endpoints": ["http://127.0.0.1:9001"]},
                        "green": {"endpoints": ["http://127.0.0.1:9002"]},
                    },
                    "stable": "blue",
                    "weights": {"blue": 100, "green": 0},
                    "mirror": {"percent": 5, "compare": {"body": "json"}},
                    "rollout": {
                        "steps": [{"mirror": "10m", "percent": 20}, 50, 100],
                        "interval": "3s",
                    },
                }
            ],
        },
        env={},
    )


def capture(status: int, body: object, ctype: str = "application/json") -> Capture:
    return Capture(status, {"content-type": ctype}, "", body, True, True)


def evidence(at: float, path: str, primary: Capture, shadow: Capture) -> Mismatch:
    c = compare(primary, shadow, RULES)
    return Mismatch(
        at,
        "shop",
        "green",
        "GET",
        path,
        c.result,
        (primary.status, shadow.status),
        c.headers,
        c.json_paths,
        ("d1", "d2"),
    )


def fill(mirrors: Mirrors) -> list[Mismatch]:
    """What a shadow run leaves: 3 matches, a JSON difference, a status and a header one."""
    ms = mirrors.get("shop", "green")
    same = capture(200, {"id": 7, "price": 10, "at": 1})
    for _ in range(3):
        ms.record("match", 0.004, None)
    rows = [
        evidence(AT, "/item/7", same, capture(200, {"id": 7, "price": 11, "at": 2})),
        evidence(AT + 1, "/item/8", same, capture(500, {"error": "boom"})),
        evidence(AT + 2, "/item/9", same, capture(200, {"id": 7, "price": 10}, "text/html")),
    ]
    for m, seconds in zip(rows, (0.02, 0.3, 2.0), strict=True):
        ms.record(m.result, seconds, m)
    ms.drop("max_inflight")
    ms.drop("max_inflight")
    ms.drop("max_body_bytes")
    return rows


class Admin:
    def __init__(self) -> None:
        self.config = make_config()
        self.store = PolicyStore(self.config)
        self.mirrors = Mirrors.from_config(self.config)

        async def reload() -> None:
            return None

        self.ctx = AdminContext(
            store=self.store,
            persist=lambda: None,
            events=EventLog(),
            registry=None,
            reload=reload,
            token=None,
            ready=lambda: True,
            mirrors=self.mirrors,
        )

    def start_mirror_step(self) -> None:
        route = self.config.routes[0]
        state = start(route, self.store.state("shop"), "green", None, now=AT)
        self.store.replace("shop", state)


@pytest.fixture
async def admin():
    a = Admin()
    checker = ResponseChecker()
    async with TestClient(TestServer(checker.install(make_admin_app(a.ctx)))) as client:
        a.client = client
        a.url = str(client.make_url(""))
        yield a
    checker.assert_clean()


async def test_mirror_view_of_the_routes_mirror_config(admin):
    rows = fill(admin.mirrors)
    r = await admin.client.get("/api/v1/routes/shop/mirror")
    assert r.status == 200
    data = await r.json()
    assert data["route"] == "shop"
    assert data["active"] == {"to": "green", "percent": 5.0, "step": False}
    assert data["config"]["percent"] == 5.0
    assert data["config"]["compare"]["body"] == "json"
    assert data["counts"]["green"] == {
        "match": 3,
        "status_mismatch": 1,
        "header_mismatch": 1,
        "body_mismatch": 1,
        "shadow_error": 0,
        "dropped": 3,
    }
    assert data["counts"]["blue"] == dict.fromkeys(data["counts"]["green"], 0)
    assert data["dropped"]["green"] == {
        "max_inflight": 2,
        "max_body_bytes": 1,
        "primary_incomplete": 0,
    }
    assert data["recent"] == [m.to_json() for m in rows]
    first = data["recent"][0]
    assert first["result"] == "body_mismatch"
    assert first["json_paths"] == [{"path": "$.price", "primary": "10", "shadow": "11"}]
    assert first["status"] == [200, 200]
    assert data["recent"][1]["result"] == "status_mismatch"
    assert data["recent"][2]["headers"] == ["content-type"]


async def test_mirror_view_during_a_mirror_step_and_unknown_route(admin):
    admin.start_mirror_step()
    data = await (await admin.client.get("/api/v1/routes/shop/mirror")).json()
    assert data["active"] == {"to": "green", "percent": 20.0, "step": True}
    assert data["recent"] == []
    r = await admin.client.get("/api/v1/routes/nope/mirror")
    assert r.status == 404
    assert await r.json() == {
        "error": {"code": "not_found", "message": "no route named 'nope'", "field": "route"}
    }


async def test_route_detail_shows_a_mirror_step_and_its_totals(admin):
    admin.start_mirror_step()
    data = await (await admin.client.get("/api/v1/routes/shop")).json()
    rollout = data["state"]["rollout"]
    assert rollout["steps"][0] == {
        "mirror": 600.0,
        "percent": 20.0,
        "max_mismatch_ratio": 0.01,
        "min_samples": 200,
    }
    assert (rollout["mirror_samples"], rollout["mirror_mismatches"]) == (0, 0)


async def test_start_rollout_with_mirror_steps_and_the_ordering_refusal(admin):
    r = await admin.client.post(
        "/api/v1/routes/shop/rollout",
        json={"canary": "green", "steps": [25, {"mirror": "5m"}]},
    )
    assert r.status == 422
    assert (await r.json())["error"] == {
        "code": "invalid",
        "message": "steps[1].mirror: mirror steps must come before the first weight step "
        "(an earlier step already sends 25% of users to the canary)",
        "field": "steps[1].mirror",
    }
    r = await admin.client.post(
        "/api/v1/routes/shop/rollout",
        json={"canary": "green", "steps": [{"mirror": "5m", "min_samples": 50}, 100]},
    )
    assert r.status == 200
    state = admin.store.state("shop")
    assert dict(state.weights) == {"blue": 100, "green": 0}
    assert state.rollout.steps[0].min_samples == 50


# ---- graygate mirror -------------------------------------------------------------------------


async def test_cli_table(admin, capsys):
    fill(admin.mirrors)
    assert await ctl_mirror.mirror(admin.url, None, "shop", False) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "shop: mirroring 5% to green (the route's mirror:)"
    assert out[1] == (
        "  green: 6 compared (3 match, 1 status_mismatch, 1 header_mismatch, 1 body_mismatch, "
        "0 shadow_error); 3 dropped (max_inflight 2, max_body_bytes 1)"
    )
    assert out[2].split() == [
        "TIME", "METHOD", "PATH", "RESULT", "STATUS", "HEADERS", "JSON", "PATHS"
    ]  # fmt: skip
    clock = [time.strftime("%H:%M:%S", time.localtime(AT + i)) for i in range(3)]
    assert out[3].split() == [
        clock[0], "GET", "/item/7", "body_mismatch", "200/200", "-", "$.price:", "10", "vs", "11"
    ]  # fmt: skip
    assert out[4].split()[:6] == [clock[1], "GET", "/item/8", "status_mismatch", "200/500", "-"]
    assert "$.id: 7 vs (absent)" in out[4]
    assert '$.error: (absent) vs "boom"' in out[4]
    assert out[5].split() == [
        clock[2], "GET", "/item/9", "header_mismatch", "200/200", "content-type", "-"
    ]  # fmt: skip
    assert len(out) == 6


async def test_cli_json_no_mismatches_and_unknown_route(admin, capsys):
    assert await ctl_mirror.mirror(admin.url, None, "shop", True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recent"] == [] and data["active"]["to"] == "green"
    assert await ctl_mirror.mirror(admin.url, None, "shop", False) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "no mismatches"
    assert await ctl_mirror.mirror(admin.url, None, "nope", False) == 2
    assert "not_found: no route named 'nope' (field: route)" in capsys.readouterr().err


def test_cli_parser_has_the_mirror_command():
    from proxy.cli import build_parser

    ns = build_parser().parse_args(["mirror", "shop", "--json", "--admin", "http://x:1"])
    assert (ns.route, ns.json, ns.admin) == ("shop", True, "http://x:1")
    ns = build_parser().parse_args(
        ["rollout", "start", "shop", "--steps", "[{mirror: 10m, percent: 20}, 5, 100]"]
    )
    assert ns.steps == [{"mirror": "10m", "percent": 20}, 5, 100]


# ---- metrics ---------------------------------------------------------------------------------


def test_metrics_render_every_label_set_from_mirrors():
    config = make_config()
    store = PolicyStore(config)
    mirrors = Mirrors.from_config(config)
    fill(mirrors)
    registry = make_registry(
        Stats.from_config(config), lambda: store.policy, lambda: [], mirrors=mirrors
    )
    text = render(registry).decode()
    lines = set(text.splitlines())
    for line in (
        'graygate_mirror_requests_total{result="match",route="shop",version="green"} 3.0',
        'graygate_mirror_requests_total{result="body_mismatch",route="shop",version="green"} 1.0',
        'graygate_mirror_requests_total{result="dropped",route="shop",version="green"} 3.0',
        'graygate_mirror_requests_total{result="shadow_error",route="shop",version="blue"} 0.0',
        'graygate_mirror_dropped_total{cause="max_inflight",route="shop",version="green"} 2.0',
        'graygate_mirror_dropped_total{cause="primary_incomplete",route="shop",version="blue"} 0.0',
        'graygate_mirror_duration_seconds_bucket{le="0.005",route="shop",version="green"} 3.0',
        'graygate_mirror_duration_seconds_bucket{le="0.5",route="shop",version="green"} 5.0',
        'graygate_mirror_duration_seconds_bucket{le="+Inf",route="shop",version="green"} 6.0',
        'graygate_mirror_duration_seconds_count{route="shop",version="green"} 6.0',
        "# TYPE graygate_mirror_duration_seconds histogram",
    ):
        assert line in lines, line
    # The same buckets as the request histogram.
    les = [
        ln.split('le="')[1].split('"')[0]
        for ln in text.splitlines()
        if ln.startswith("graygate_mirror_duration_seconds_bucket") and 'version="green"' in ln
    ]
    request_les = [
        ln.split('le="')[1].split('"')[0]
        for ln in text.splitlines()
        if ln.startswith("graygate_request_duration_seconds_bucket") and 'version="green"' in ln
    ]
    assert les == request_les and len(les) > 5
    total = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("graygate_mirror_duration_seconds_sum{") and "green" in ln
    )
    assert float(total.split()[-1]) == pytest.approx(0.012 + 0.02 + 0.3 + 2.0)


# ---- workers: a worker's batch into the supervisor's Mirrors ----------------------------------


def test_take_and_merge_carry_every_figure_and_the_new_mismatches():
    config = make_config()
    worker, supervisor = Mirrors.from_config(config), Mirrors.from_config(config)
    rows = fill(worker)
    batch = take_mirrors(worker)
    assert [(d.route, d.version) for d in batch] == [("shop", "green")]
    assert take_mirrors(worker) == []  # swapped out whole
    assert worker.recent("shop") == []
    merge_mirrors(supervisor, batch)
    merge_mirrors(supervisor, take_mirrors(Mirrors.from_config(config)))  # empty batch
    ms = supervisor.get("shop", "green")
    assert ms.results["match"] == 3 and ms.results["dropped"] == 3
    assert ms.dropped["max_inflight"] == 2
    assert sum(ms.bucket_counts) == 6
    assert ms.duration_sum == pytest.approx(2.332)
    assert supervisor.recent("shop") == rows
    assert ms.take_window() == (6, 3)
    # A second worker's batch adds up; a route a reload removed is dropped.
    other = Mirrors.from_config(config)
    other.get("shop", "green").record("shadow_error", 10.0, None)
    merge_mirrors(supervisor, take_mirrors(other))
    assert supervisor.get("shop", "green").take_window() == (1, 1)
    assert supervisor.get("shop", "green").results["shadow_error"] == 1


# ---- the mirror window of the metrics sources -------------------------------------------------


async def test_local_source_mirror_window_drains_from_begin():
    config = make_config()
    route = config.routes[0]
    mirrors = Mirrors.from_config(config)
    source = LocalSource(Stats.from_config(config), mirrors)
    fill(mirrors)
    assert source.begin(route, 0.0, 5.0) == 5.0  # earlier shadows are not this step's
    mirrors.get("shop", "green").record("match", 0.01, None)
    mirrors.get("shop", "green").record("shadow_error", 0.01, None)
    w = await source.mirror_window(route, "green", 5.0, 8.0)
    assert (w.samples, w.mismatches, w.start, w.end) == (2, 1, 5.0, 8.0)
    w = await source.mirror_window(route, "green", 8.0, 11.0)
    assert (w.samples, w.mismatches) == (0, 0)
    with pytest.raises(SourceError):
        await LocalSource(Stats.from_config(config)).mirror_window(route, "green", 0, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def prom():
    asked: list[str] = []
    answer: dict[str, Any] = {"rows": []}

    async def query(request: web.Request) -> web.Response:
        asked.append(request.query["query"])
        result = [{"metric": m, "value": [1003.0, str(v)]} for m, v in answer["rows"]]
        return web.json_response(
            {"status": "success", "data": {"resultType": "vector", "result": result}}
        )

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", asked, answer
    await runner.cleanup()


async def test_prometheus_mirror_window_sums_every_replica_without_drops(prom):
    url, asked, answer = prom
    route = make_config(prometheus=True).routes[0]
    assert route.rollout.analysis.prometheus is not None
    cfg = route.rollout.analysis.prometheus.__class__(url, scrape_interval=1.0)
    async with aiohttp.ClientSession() as session:
        source = PrometheusSource(cfg, session)
        with pytest.raises(SourceError, match="no graygate_mirror_requests_total data"):
            await source.mirror_window(route, "green", 1000.0, 1003.0)
        answer["rows"] = [
            ({"result": "match"}, 391.6),
            ({"result": "body_mismatch"}, 7.2),
            ({"result": "shadow_error"}, 1.0),
        ]
        w = await source.mirror_window(route, "green", 1000.0, 1003.0)
    assert (w.samples, w.mismatches) == (400, 8)
    assert asked[-1] == (
        'sum by (result) (increase(graygate_mirror_requests_total{route="shop", '
        'version="green", result!="dropped"}[3000ms]))'
    )


async def test_status_of_a_route_shows_the_last_decision(admin, capsys):
    from dataclasses import replace

    from proxy.control import ctl
    from proxy.core.analysis import mirror_verdict
    from proxy.core.rollout import decide

    admin.start_mirror_step()
    route = admin.config.routes[0]
    state = admin.store.state("shop")
    step = state.rollout.steps[0]
    d = decide(route, state, mirror_verdict(120, 1, 30.0, step, 0.99), now=AT + 30)
    admin.store.replace("shop", replace(d.state, revision=state.revision))
    assert await ctl.status(admin.url, None, False, "shop") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (
        "last decision: mirror step runs 570s more (1 of 120 shadow answers differed so far)"
    )
