import json
import random
import re

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from proxy.control.admin import make_admin_app
from proxy.control.api import AdminContext
from proxy.control.guard import check_admin_exposure
from proxy.control.metrics import make_registry
from proxy.control.store.events import EventLog
from proxy.control.store.file import FileStateStore
from proxy.core.config.load import load_config
from proxy.core.state import PolicyStore
from proxy.core.stats import Stats
from tests.helpers import raw_request, route_config
from tests.helpers.openapi_check import ResponseChecker

TOKEN = "s3cret-token"


def route(name, prefix, stable="blue"):
    return {
        "name": name,
        "match": {"host": "*", "path_prefix": prefix},
        "versions": {
            "blue": {"endpoints": ["http://127.0.0.1:9001"]},
            "green": {"endpoints": ["http://127.0.0.1:9002"]},
        },
        "stable": stable,
        "weights": {"blue": 100, "green": 0} if stable == "blue" else {"blue": 0, "green": 100},
        "sticky": {"keys": ["header:X-User-Id"]},
        "force": [{"header": "X-Canary", "value": "always", "to": "canary"}],
        "rollout": {"steps": [10, {"pause": True}, 50, 100]},
    }


def write_config(path, *routes):
    path.write_text(yaml.safe_dump({"routes": list(routes)}))


class Harness:
    def __init__(self, tmp_path, token=None, with_metrics=False):
        self.config_path = tmp_path / "graygate.yaml"
        write_config(self.config_path, route("shop", "/"), route("api", "/api"))
        config = load_config(str(self.config_path), env={})
        self.store = PolicyStore(config)
        self.events = EventLog()
        self.file = FileStateStore(tmp_path / "state.json")
        self.saves = 0
        self.is_ready = True
        self.clock = 1000.0
        self.stats = Stats.from_config(config, random.Random(1))
        registry = None
        if with_metrics:
            registry = make_registry(self.stats, lambda: self.store.policy, list)
        self.ctx = AdminContext(
            store=self.store,
            persist=self.persist,
            events=self.events,
            registry=registry,
            reload=self.reload,
            token=token,
            ready=lambda: self.is_ready,
            now=lambda: self.clock,
            stats=self.stats,
        )

    def persist(self):
        self.saves += 1
        self.file.save(self.store.states(), self.events.since())

    async def reload(self):
        config = load_config(str(self.config_path), env={})
        self.store.reconfigure(config)
        self.stats.reconfigure(config)


async def serve(harness):
    """The admin app with every answer checked against the OpenAPI document."""
    checker = ResponseChecker()
    async with TestClient(TestServer(checker.install(make_admin_app(harness.ctx)))) as client:
        harness.client = client
        harness.app = client.server.app
        yield harness
    checker.assert_clean()


@pytest.fixture
async def h(tmp_path):
    async for harness in serve(Harness(tmp_path)):
        yield harness


@pytest.fixture
async def ht(tmp_path):
    async for harness in serve(Harness(tmp_path, token=TOKEN, with_metrics=True)):
        yield harness


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def expect_error(resp, status, code, field=None):
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if field is not None:
        assert body["error"]["field"] == field
    return body


# ---- open endpoints ------------------------------------------------------------------------


async def test_health_and_readiness(h):
    resp = await h.client.get("/healthz")
    assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
    assert (await h.client.get("/readyz")).status == 200
    h.is_ready = False
    assert (await h.client.get("/readyz")).status == 503


async def test_metrics_absent_and_present(h, ht):
    await expect_error(await h.client.get("/metrics"), 404, "not_found")
    resp = await ht.client.get("/metrics")  # open even with a token configured
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert 'graygate_route_weight{route="shop",version="blue"} 100.0' in await resp.text()


async def test_dashboard_is_self_contained(ht):
    resp = await ht.client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    html = await resp.text()
    assert 'const API = "/api/v1"' in html
    # No asset from anywhere else: no absolute URL, no script or image source, and the one
    # link (the icon) is inline, so the browser asks for no /favicon.ico either.
    assert "http://" not in html and "https://" not in html
    assert re.findall(r"<link[^>]*>", html) == ['<link rel="icon" href="data:,">']
    assert re.search(r"<(script|img|iframe)[^>]*\ssrc=", html) is None


async def test_unknown_path_and_method_are_json(h):
    await expect_error(await h.client.get("/nope"), 404, "not_found")
    await expect_error(await h.client.get("/api/v1/nope"), 404, "not_found")
    resp = await h.client.delete("/api/v1/routes/shop/weights")
    await expect_error(resp, 405, "method_not_allowed")
    assert "PUT" in resp.headers["Allow"]


# ---- reads ---------------------------------------------------------------------------------


async def test_list_and_get_route(h):
    body = await (await h.client.get("/api/v1/routes")).json()
    assert [r["name"] for r in body["routes"]] == ["shop", "api"]
    assert body["routes"][0]["weights"] == {"blue": 100, "green": 0}
    assert body["routes"][0]["rollout"]["state"] == "idle"

    resp = await h.client.get("/api/v1/routes/shop")
    assert resp.status == 200
    detail = await resp.json()
    assert resp.headers["ETag"] == f'"{detail["revision"]}"'
    assert detail["match"] == {"host": "*", "path_prefix": "/"}
    assert detail["versions"]["green"]["endpoints"] == ["http://127.0.0.1:9002"]
    assert detail["config"]["sticky"] is True
    assert detail["config"]["force_rules"] == 1
    assert detail["config"]["rollout"]["steps"] == [10, {"pause": True}, 50, 100]
    assert detail["state"] == h.store.state("shop").to_json()
    assert detail["stats"]["blue"]["requests"] == 0

    await expect_error(await h.client.get("/api/v1/routes/nope"), 404, "not_found", "route")


async def test_stats_endpoint_counts(h):
    vs = h.stats.get("shop", "green")
    vs.record(200, "weight", 0.002)
    vs.record(502, "weight", 0.004)
    vs.record(200, "force_header", 0.001)
    body = await (await h.client.get("/api/v1/stats")).json()
    green = body["routes"]["shop"]["green"]
    assert green["requests"] == 3 and green["errors"] == 1
    assert green["by_reason"] == {"weight": 2, "force_header": 1}
    assert green["window"] == {"requests": 2, "errors": 1}  # forced traffic left out
    assert body["routes"]["shop"]["blue"]["requests"] == 0


# ---- weights -------------------------------------------------------------------------------


async def put_weights(h, body, headers=None, params=None, raw=False):
    data = body if raw else json.dumps(body)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    return await h.client.put(
        "/api/v1/routes/shop/weights", data=data, headers=hdrs, params=params or {}
    )


async def test_put_weights_success_persists_and_records(h):
    before = h.store.state("shop")
    resp = await put_weights(
        h, {"blue": 90, "green": 10}, {"X-Graygate-Reason": "first canary users"}
    )
    assert resp.status == 200
    body = await resp.json()
    after = h.store.state("shop")
    assert dict(after.weights) == {"blue": 90, "green": 10}
    assert after.revision == before.revision + 1
    assert body["state"] == after.to_json()
    assert resp.headers["ETag"] == f'"{after.revision}"'
    assert h.store.policy.by_name["shop"].canary_weight == 10

    (event,) = h.events.since()
    assert event.route == "shop" and event.action == "weights"
    assert event.actor == "127.0.0.1"
    assert event.before == before.to_json() and event.after == after.to_json()
    assert event.reason == "first canary users"

    assert h.saves == 1
    states, events = h.file.load()
    assert states["shop"] == after and events == [event]

    resp = await put_weights(h, {"blue": 50, "green": 50}, params={"reason": "halfway"})
    assert resp.status == 200
    assert h.events.since(event.id)[0].reason == "halfway"


BAD_BODIES = [
    ([1, 2], None),
    ("blue", None),
    ({"blue": 90, "green": 10, "red": 0}, "red"),
    ({"blue": 90, "green": 10, "reason": "x"}, "reason"),
    ({"blue": 100}, "green"),
    ({"blue": 110, "green": -10}, "blue"),
    ({"blue": 90, "green": -10}, "green"),
    ({"blue": 90.0, "green": 10}, "blue"),
    ({"blue": 90, "green": 10.5}, "green"),
    ({"blue": True, "green": 99}, "blue"),
    ({"blue": "90", "green": 10}, "blue"),
    ({"blue": None, "green": 100}, "blue"),
    ({"blue": 101, "green": 0}, "blue"),
    ({"blue": 90, "green": 20}, "weights"),
    ({"blue": 0, "green": 0}, "weights"),
]


@pytest.mark.parametrize("body, field", BAD_BODIES)
async def test_put_weights_invalid_422_changes_nothing(h, body, field):
    before = h.store.state("shop")
    resp = await put_weights(h, body)
    await expect_error(resp, 422, "invalid", field)
    assert h.store.state("shop") == before
    assert h.events.since() == [] and h.saves == 0


@pytest.mark.parametrize("raw", ['{"blue": NaN, "green": 100}', '{"blue": Infinity}'])
async def test_put_weights_nan_is_invalid(h, raw):
    before = h.store.state("shop")
    await expect_error(await put_weights(h, raw, raw=True), 422, "invalid", "blue")
    assert h.store.state("shop") == before


@pytest.mark.parametrize(
    "data, content_type",
    [
        ("{blue: 90", "application/json"),
        ("", "application/json"),
        ('{"blue": 90, "green": 10}', "text/plain"),
        ("blue=90&green=10", "application/x-www-form-urlencoded"),
    ],
)
async def test_put_weights_bad_request_400(h, data, content_type):
    before = h.store.state("shop")
    resp = await h.client.put(
        "/api/v1/routes/shop/weights", data=data, headers={"Content-Type": content_type}
    )
    await expect_error(resp, 400, "bad_request")
    assert h.store.state("shop") == before and h.events.since() == []


async def test_put_weights_unknown_route_404(h):
    resp = await h.client.put("/api/v1/routes/nope/weights", json={"blue": 100, "green": 0})
    await expect_error(resp, 404, "not_found", "route")
    assert h.events.since() == []


@pytest.mark.parametrize("if_match", ["1", '"1"', 'W/"1"'])
async def test_if_match_current_revision_succeeds(h, if_match):
    assert h.store.state("shop").revision == 1
    resp = await put_weights(h, {"blue": 80, "green": 20}, {"If-Match": if_match})
    assert resp.status == 200
    assert h.store.state("shop").revision == 2


@pytest.mark.parametrize("if_match", ["7", '"0"'])
async def test_if_match_stale_409_changes_nothing(h, if_match):
    before = h.store.state("shop")
    resp = await put_weights(h, {"blue": 80, "green": 20}, {"If-Match": if_match})
    body = await expect_error(resp, 409, "stale_revision")
    assert body["state"] == before.to_json()
    assert h.store.state("shop") == before and h.events.since() == [] and h.saves == 0


async def test_if_match_garbage_400(h):
    before = h.store.state("shop")
    resp = await put_weights(h, {"blue": 80, "green": 20}, {"If-Match": "yesterday"})
    await expect_error(resp, 400, "bad_request", "If-Match")
    assert h.store.state("shop") == before


async def test_compare_and_set_second_writer_loses(h):
    rev = (await (await h.client.get("/api/v1/routes/shop")).json())["revision"]
    first = await put_weights(h, {"blue": 80, "green": 20}, {"If-Match": str(rev)})
    second = await put_weights(h, {"blue": 10, "green": 90}, {"If-Match": str(rev)})
    assert first.status == 200
    body = await expect_error(second, 409, "stale_revision")
    assert body["state"]["weights"] == {"blue": 80, "green": 20}
    assert dict(h.store.state("shop").weights) == {"blue": 80, "green": 20}


# ---- auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/api/v1/routes"),
        ("GET", "/api/v1/routes/shop"),
        ("GET", "/api/v1/routes/does-not-exist"),
        ("PUT", "/api/v1/routes/does-not-exist/weights"),
        ("GET", "/api/v1/no-such-thing"),
        ("GET", "/api/v1/events"),
        ("POST", "/api/v1/reload"),
    ],
)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN])
async def test_auth_401_before_route_lookup(ht, method, path, auth):
    headers = {"Authorization": auth} if auth else {}
    resp = await ht.client.request(method, path, headers=headers, json={"blue": 1})
    await expect_error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert ht.events.since() == []


async def test_auth_token_accepted_and_actor_is_token(ht):
    assert (await ht.client.get("/api/v1/routes", headers=AUTH)).status == 200
    await expect_error(await ht.client.get("/api/v1/routes/nope", headers=AUTH), 404, "not_found")
    resp = await ht.client.put(
        "/api/v1/routes/shop/weights", json={"blue": 70, "green": 30}, headers=AUTH
    )
    assert resp.status == 200
    assert ht.events.since()[0].actor == "token"
    # health endpoints stay open
    assert (await ht.client.get("/healthz")).status == 200
    assert (await ht.client.get("/readyz")).status == 200


# ---- rollout -------------------------------------------------------------------------------


async def post(h, path, body=None, headers=None):
    kwargs = {"json": body} if body is not None else {}
    return await h.client.post(f"/api/v1/routes/{path}", headers=headers or {}, **kwargs)


async def test_rollout_lifecycle(h):
    resp = await post(h, "shop/rollout", {"canary": "green"})
    assert resp.status == 200, await resp.text()
    state = h.store.state("shop")
    assert state.rollout.phase == "progressing" and state.rollout.canary == "green"
    assert dict(state.weights) == {"blue": 90, "green": 10}
    assert state.rollout.step_started == h.clock

    # a second start, and manual weights during a rollout, are conflicts
    before = h.store.state("shop")
    body = await expect_error(await post(h, "shop/rollout", {"canary": "green"}), 409, "conflict")
    assert body["state"] == before.to_json()
    await expect_error(await put_weights(h, {"blue": 50, "green": 50}), 409, "conflict")
    assert h.store.state("shop") == before

    assert (await post(h, "shop/rollout/pause")).status == 200
    assert h.store.state("shop").rollout.phase == "paused"
    await expect_error(await post(h, "shop/rollout/pause"), 409, "conflict")
    h.clock = 2000.0
    assert (await post(h, "shop/rollout/resume")).status == 200
    assert h.store.state("shop").rollout.phase == "progressing"

    assert (await post(h, "shop/rollout/promote")).status == 200
    state = h.store.state("shop")
    assert state.stable == "green" and state.standby == "blue"
    assert dict(state.weights) == {"blue": 0, "green": 100}

    resp = await post(h, "shop/rollback", headers={"X-Graygate-Reason": "bad release"})
    assert resp.status == 200
    state = h.store.state("shop")
    assert state.stable == "blue" and dict(state.weights) == {"blue": 100, "green": 0}
    await expect_error(await post(h, "shop/rollback"), 409, "conflict")

    actions = [e.action for e in h.events.since(route="shop")]
    assert actions == [
        "rollout.start",
        "rollout.pause",
        "rollout.resume",
        "rollout.promote",
        "rollback",
    ]
    assert h.events.since()[-1].reason == "bad release"
    assert h.saves == 5
    assert h.file.load()[0]["shop"] == state


async def test_rollout_start_custom_steps_and_default_canary(h):
    resp = await post(h, "api/rollout", {"steps": [20, {"pause": "10m"}, 100]})
    assert resp.status == 200, await resp.text()
    state = h.store.state("api")
    assert state.rollout.canary == "green" and dict(state.weights)["green"] == 20
    body = await resp.json()
    assert body["state"]["rollout"]["steps"] == [20, {"pause": 600.0}, 100]
    assert (await post(h, "api/rollout/abort")).status == 200
    state = h.store.state("api")
    assert state.rollout.phase == "rolled_back" and dict(state.weights)["green"] == 0


@pytest.mark.parametrize(
    "body, field",
    [
        ({"canary": "red"}, "canary"),
        ({"canary": "blue"}, "canary"),
        ({"canary": 3}, "canary"),
        ({"canary": "green", "steps": []}, "steps"),
        ({"canary": "green", "steps": "5,10"}, "steps"),
        ({"canary": "green", "steps": [5, 101]}, "steps[1]"),
        ({"canary": "green", "steps": [5, {"pause": "soon"}]}, "steps[1].pause"),
        ({"canary": "green", "steps": [50, 10]}, "steps[1]"),  # the config's rule: increasing
        ({"canary": "green", "steps": [0, 100]}, "steps[0]"),  # and weights 1..100
        ({"canary": "green", "steps": [True]}, "steps[0]"),
        ({"canary": "green", "color": "x"}, "color"),
        (["green"], None),
    ],
)
async def test_rollout_start_invalid(h, body, field):
    before = h.store.state("shop")
    await expect_error(await post(h, "shop/rollout", body), 422, "invalid", field)
    assert h.store.state("shop") == before and h.events.since() == []


async def test_rollout_steps_refused_with_the_message_of_graygate_check(h):
    resp = await post(h, "shop/rollout", {"canary": "green", "steps": [10, 50, 25]})
    body = await resp.json()
    assert resp.status == 422
    # What `graygate check` prints for the same list under routes[0].rollout.steps.
    assert body["error"]["message"] == (
        "steps[2]: steps must increase; the previous weight step is 50, got 25"
    )


async def test_weights_refused_with_the_message_of_graygate_check(h):
    body = await (await put_weights(h, {"blue": 90, "green": 20})).json()
    assert body["error"] == {
        "code": "invalid",
        "message": "weights must sum to 100, got 110",
        "field": "weights",
    }


@pytest.mark.parametrize("action", ["pause", "resume", "promote", "abort"])
async def test_rollout_actions_without_rollout_conflict(h, action):
    before = h.store.state("shop")
    body = await expect_error(await post(h, f"shop/rollout/{action}"), 409, "conflict")
    assert body["state"] == before.to_json()
    assert h.store.state("shop") == before and h.events.since() == [] and h.saves == 0


async def test_rollout_unknown_action_and_route(h):
    await expect_error(await post(h, "shop/rollout/explode"), 404, "not_found")
    await expect_error(await post(h, "nope/rollout/pause"), 404, "not_found", "route")
    await expect_error(await post(h, "nope/rollback"), 404, "not_found", "route")


async def test_rollout_stale_if_match(h):
    before = h.store.state("shop")
    resp = await post(h, "shop/rollout", {"canary": "green"}, {"If-Match": '"99"'})
    await expect_error(resp, 409, "stale_revision")
    assert h.store.state("shop") == before


# ---- events --------------------------------------------------------------------------------


async def test_events_query(h):
    await put_weights(h, {"blue": 90, "green": 10})
    await h.client.put("/api/v1/routes/api/weights", json={"blue": 50, "green": 50})
    await put_weights(h, {"blue": 80, "green": 20})
    all_events = (await (await h.client.get("/api/v1/events")).json())["events"]
    assert [e["id"] for e in all_events] == [1, 2, 3]
    assert all_events[1]["after"]["weights"] == {"blue": 50, "green": 50}
    shop = (await (await h.client.get("/api/v1/events?route=shop")).json())["events"]
    assert [e["id"] for e in shop] == [1, 3]
    later = (await (await h.client.get("/api/v1/events?since=1&route=shop")).json())["events"]
    assert [e["id"] for e in later] == [3]
    await expect_error(await h.client.get("/api/v1/events?since=x"), 400, "bad_request", "since")


# ---- reload --------------------------------------------------------------------------------


async def test_reload_bad_file_keeps_old_config(h):
    await put_weights(h, {"blue": 70, "green": 30})
    before_policy = h.store.policy
    h.config_path.write_text(
        yaml.safe_dump({"routes": [{**route("shop", "/"), "weights": {"blue": 120, "green": 0}}]})
    )
    resp = await h.client.post("/api/v1/reload")
    body = await expect_error(resp, 422, "invalid_config")
    assert body["error"]["field"] == "routes[0].weights.blue"
    assert "120" in body["error"]["message"]
    assert h.store.policy is before_policy
    assert [e.action for e in h.events.since()] == ["weights"]


async def test_reload_good_file_applies_and_keeps_runtime_weights(h):
    await put_weights(h, {"blue": 70, "green": 30})
    write_config(h.config_path, route("shop", "/"), route("extra", "/extra"))
    resp = await h.client.post("/api/v1/reload", params={"reason": "add extra"})
    assert resp.status == 200
    assert (await resp.json())["routes"] == ["shop", "extra"]
    assert dict(h.store.state("shop").weights) == {"blue": 70, "green": 30}
    names = [r["name"] for r in (await (await h.client.get("/api/v1/routes")).json())["routes"]]
    assert names == ["shop", "extra"]
    event = h.events.since()[-1]
    assert event.action == "reload" and event.route is None and event.reason == "add extra"
    assert "api" in event.before["routes"] and "extra" in event.after["routes"]
    assert set(h.file.load()[0]) == {"shop", "extra"}


# ---- exposure check ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"])
def test_exposure_loopback_without_token_ok(host):
    check_admin_exposure(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "admin.example.com"])
def test_exposure_public_needs_token(host):
    with pytest.raises(ValueError, match=r"admin\.token"):
        check_admin_exposure(host, None)
    with pytest.raises(ValueError):
        check_admin_exposure(host, "")
    check_admin_exposure(host, "tok")


# ---- Host and Origin: DNS rebinding and cross-site requests ---------------------------------
# A page the operator visits can point its own name at 127.0.0.1 (DNS rebinding) or post to
# the admin from another origin. The browser then sends that name as Host, and its own origin
# as Origin / Sec-Fetch-Site; the admin refuses both before any handler runs.

REBOUND_HOSTS = ["evil.example", "evil.example:9901", "127.0.0.1.evil.example", "localhost.evil"]
CHECKED_PATHS = [
    "/",
    "/metrics",
    "/api/v1/routes",
    "/api/v1/routes/shop",
    "/api/v1/events",
    "/api/v1/stats",
]


@pytest.fixture
async def hm(tmp_path):
    """No token (the loopback default) and metrics on: the set-up rebinding aims at."""
    harness = Harness(tmp_path, with_metrics=True)
    async with TestClient(TestServer(make_admin_app(harness.ctx))) as client:
        harness.client = client
        yield harness


def unchanged(h, before):
    assert h.store.state("shop") == before
    assert h.events.since() == [] and h.saves == 0


@pytest.mark.parametrize("path", CHECKED_PATHS)
@pytest.mark.parametrize("host", REBOUND_HOSTS)
async def test_foreign_host_403_on_every_admin_path(hm, path, host):
    resp = await hm.client.get(path, headers={"Host": host})
    body = await expect_error(resp, 403, "forbidden_host", "Host")
    assert host in body["error"]["message"]
    assert "access-control-allow-origin" not in {k.lower() for k in resp.headers}


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("PUT", "/api/v1/routes/shop/weights", {"blue": 0, "green": 100}),
        ("POST", "/api/v1/routes/shop/rollout", {"canary": "green"}),
        ("POST", "/api/v1/routes/shop/rollback", {}),
        ("POST", "/api/v1/reload", {}),
    ],
)
async def test_foreign_host_mutation_403_changes_nothing(hm, method, path, body):
    before = hm.store.state("shop")
    policy = hm.store.policy
    resp = await hm.client.request(method, path, json=body, headers={"Host": "evil.example:80"})
    await expect_error(resp, 403, "forbidden_host", "Host")
    unchanged(hm, before)
    assert hm.store.policy is policy  # not even reloaded


async def test_foreign_host_refused_before_the_token(ht):
    # With a token the 403 still comes first: a rebound page learns nothing, not even a 401.
    resp = await ht.client.get("/api/v1/routes", headers={"Host": "evil.example", **AUTH})
    await expect_error(resp, 403, "forbidden_host", "Host")


async def test_missing_host_403(hm):
    port = hm.client.server.port
    answer = await raw_request(port, b"GET /api/v1/routes HTTP/1.0\r\n\r\n")
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == b"403", answer[:80]
    assert b'"code": "forbidden_host"' in answer


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:9901",
        "LocalHost:1234",
        "localhost.",
        "127.0.0.1",
        "127.0.0.1:9901",
        "127.1.2.3:80",
        "[::1]",
        "[::1]:9901",
    ],
)
async def test_loopback_hosts_accepted_with_any_port(hm, host):
    # Any port: kubectl port-forward and ssh -L change it; rebinding controls only the name.
    resp = await hm.client.get("/api/v1/routes", headers={"Host": host})
    assert resp.status == 200, await resp.text()
    resp = await hm.client.put(
        "/api/v1/routes/shop/weights", json={"blue": 90, "green": 10}, headers={"Host": host}
    )
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
@pytest.mark.parametrize("host", ["10.244.1.7:9901", "evil.example", "graygate"])
async def test_health_probes_answer_any_host(hm, path, host):
    # kubelet probes send the pod IP (or a Service name) as Host; a probe changes nothing and
    # tells nothing, so, as Envoy's and Traefik's ping endpoints, it is not checked.
    resp = await hm.client.get(path, headers={"Host": host})
    assert resp.status == 200, await resp.text()


MUTATIONS = [
    ("PUT", "/api/v1/routes/shop/weights", {"blue": 0, "green": 100}),
    ("POST", "/api/v1/routes/shop/rollout", {"canary": "green"}),
    ("POST", "/api/v1/reload", {}),
]


@pytest.mark.parametrize("method, path, body", MUTATIONS)
@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "null"},  # sandboxed frames, file:// pages, cross-origin redirects
        {"Origin": "http://localhost:3000"},  # another local app: same site, other origin
        {"Origin": "https://127.0.0.1:{port}"},  # same host and port, other scheme
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-site"},
    ],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None,
)
async def test_cross_site_mutation_403_changes_nothing(hm, method, path, body, headers):
    port = hm.client.server.port
    headers = {k: v.format(port=port) for k, v in headers.items()}
    before = hm.store.state("shop")
    policy = hm.store.policy
    resp = await hm.client.request(method, path, json=body, headers=headers)
    await expect_error(resp, 403, "cross_origin")
    assert "access-control-allow-origin" not in {k.lower() for k in resp.headers}
    unchanged(hm, before)
    assert hm.store.policy is policy


async def test_preflight_from_foreign_origin_refused_without_cors_grant(hm):
    resp = await hm.client.options(
        "/api/v1/routes/shop/weights",
        headers={
            "Origin": "http://evil.example",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type",
            "Sec-Fetch-Site": "cross-site",
            "Sec-Fetch-Mode": "cors",
        },
    )
    await expect_error(resp, 403, "cross_origin")
    assert not {k.lower() for k in resp.headers} & {
        "access-control-allow-origin",
        "access-control-allow-methods",
        "access-control-allow-headers",
    }


async def test_cross_origin_read_gets_no_cors_grant(hm):
    # A foreign page may send a GET (it changes nothing), but without
    # Access-Control-Allow-Origin its script cannot read the answer.
    resp = await hm.client.get(
        "/api/v1/routes",
        headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert resp.status == 200
    assert "access-control-allow-origin" not in {k.lower() for k in resp.headers}


async def test_dashboard_in_a_browser_keeps_working(hm):
    """What a browser sends when the operator opens http://127.0.0.1:PORT/ and the page
    fetches the API (same-origin fetch: no Origin on GET; Origin on a PUT)."""
    port = hm.client.server.port
    own = f"http://127.0.0.1:{port}"
    nav = {
        "Host": f"127.0.0.1:{port}",
        "Sec-Fetch-Site": "none",
        "Sec-Fetch-Mode": "navigate",
        "Sec-Fetch-Dest": "document",
        "Accept": "text/html",
    }
    page = await hm.client.get("/", headers=nav)
    assert page.status == 200 and page.content_type == "text/html"
    fetch = {
        "Host": f"127.0.0.1:{port}",
        "Sec-Fetch-Site": "same-origin",
        "Sec-Fetch-Mode": "cors",
        "Sec-Fetch-Dest": "empty",
        "Referer": own + "/",
    }
    for path in ("/api/v1/routes", "/api/v1/stats"):
        resp = await hm.client.get(path, headers=fetch)
        assert resp.status == 200, await resp.text()
    resp = await hm.client.put(
        "/api/v1/routes/shop/weights",
        json={"blue": 80, "green": 20},
        headers={**fetch, "Origin": own},
    )
    assert resp.status == 200, await resp.text()
    assert dict(hm.store.state("shop").weights) == {"blue": 80, "green": 20}
    # A bookmark or a link from a wiki: a cross-site navigation to the page is fine.
    resp = await hm.client.get("/", headers={**nav, "Sec-Fetch-Site": "cross-site"})
    assert resp.status == 200


async def test_same_origin_mutation_through_localhost_name(hm):
    port = hm.client.server.port
    resp = await hm.client.post(
        "/api/v1/routes/shop/rollout",
        json={"canary": "green"},
        headers={
            "Host": f"localhost:{port}",
            "Origin": f"http://localhost:{port}",
            "Sec-Fetch-Site": "same-origin",
        },
    )
    assert resp.status == 200, await resp.text()


async def test_allowed_hosts_through_the_real_app(upstreams, gateway):
    """admin.allowed_hosts from the config file, through the real App and its listener."""
    blue = await upstreams("blue")
    gw = await gateway(
        [route_config(blue.url)],
        admin={"allowed_hosts": ["graygate.internal", "[fd00::1]", "10.0.0.5"]},
    )
    url = gw.admin_url + "/api/v1/routes/shop/weights"
    async with aiohttp.ClientSession() as s:
        for host in ("graygate.internal", "GRAYGATE.internal:9901", "[fd00::1]:80", "10.0.0.5"):
            async with s.get(gw.admin_url + "/api/v1/routes", headers={"Host": host}) as r:
                assert r.status == 200, (host, await r.text())
        for host in ("other.internal", "graygate.internal.evil.example", "10.0.0.6"):
            async with s.put(url, json={"blue": 0}, headers={"Host": host}) as r:
                await expect_error(r, 403, "forbidden_host", "Host")
        async with s.get(gw.admin_url + "/metrics", headers={"Host": "evil.example"}) as r:
            await expect_error(r, 403, "forbidden_host", "Host")
        async with s.get(gw.admin_url + "/healthz", headers={"Host": "evil.example"}) as r:
            assert r.status == 200
    assert dict(gw.app.store.state("shop").weights) == {"blue": 100}


@pytest.mark.parametrize(
    "host, local, allowed, ok",
    [
        ("10.1.2.3:9901", "10.1.2.3", (), True),  # the address this connection came in on
        ("[fd00::7]:9901", "fd00::7", (), True),
        ("10.1.2.4:9901", "10.1.2.3", (), False),
        ("admin.example", "10.1.2.3", ("admin.example",), True),
        ("anything.example", "10.1.2.3", ("*",), True),
        ("", "127.0.0.1", ("*",), False),  # no Host at all: never a browser, still refused
        ("evil.example", "127.0.0.1", (), False),
        ("127.0.0.1", "10.1.2.3", (), True),
    ],
)
def test_host_names_listener(host, local, allowed, ok):
    from proxy.control.guard import host_allowed

    assert host_allowed(host, local, "0.0.0.0", allowed) is ok
