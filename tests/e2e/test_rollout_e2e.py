"""End-to-end rollouts: the controller inside the real App (and the real `graygate` command)
judging real traffic from real aiohttp upstreams, steered through the admin API and the CLI."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from proxy.core.router import bucket
from tests.helpers import free_port, route_config
from tests.helpers.rollout import (
    Hit,
    Traffic,
    api,
    events,
    route_state,
    run_cli,
    scrape,
    stop_process,
    wait_listening,
    wait_state,
)

INTERVAL = 1.0
FAILURE_LIMIT = 2
USERS = [f"user-{i:03d}" for i in range(200)]
TIMEOUTS = {"connect": "500ms", "read": "2s", "request": "3s"}
FORCE = [
    {"header": "X-Canary", "value": "always", "to": "canary"},
    {"header": "X-Canary", "value": "never", "to": "stable"},
]


# ---- helpers -------------------------------------------------------------------------------


def rollout_route(
    blue: str,
    green: str,
    steps: list[Any],
    analysis: dict[str, Any] | None = None,
    **rollout: Any,
) -> dict[str, Any]:
    return route_config(
        blue,
        green,
        sticky={"keys": ["header:X-User-Id"]},
        force=FORCE,
        rollout={
            "steps": steps,
            "interval": "1s",
            # Identical blue and green handlers: a latency-ratio check would only add noise.
            "analysis": {
                "min_samples": 50,
                "max_error_rate": 0.01,
                "max_error_rate_increase": 0.005,
                "max_p99_latency": "1s",
                "max_latency_ratio": None,
                "confidence": 0.99,
                **(analysis or {}),
            },
            "failure_limit": FAILURE_LIMIT,
            **rollout,
        },
    )


def named(version: str, handler: Callable[[web.Request, int], int]) -> Any:
    """An upstream handler answering the status `handler(request, n)` for its n-th request."""
    counter = itertools.count(1)

    async def serve(request: web.Request) -> web.StreamResponse:
        await request.read()
        status = handler(request, next(counter))
        return web.json_response(
            {"version": version}, status=status, headers={"X-Upstream": version}
        )

    return serve


async def served_by(session: aiohttp.ClientSession, url: str, users: list[str]) -> dict[str, str]:
    """One request per user (no force header): which upstream served it."""
    seen: dict[str, str] = {}
    for user in users:
        async with session.get(url + "/probe", headers={"X-User-Id": user}) as resp:
            await resp.read()
            assert resp.status == 200, (user, resp.status)
            upstream = resp.headers.get("X-Upstream", "?")
            assert resp.headers.get("X-Graygate-Version") == upstream
            seen[user] = upstream
    return seen


def flips(hits: list[Hit]) -> dict[str, list[str]]:
    """Per user, the upstreams that served them in request order, repeats collapsed."""
    per_user: dict[str, list[str]] = {}
    for h in sorted(hits, key=lambda h: h.seq):
        if h.user is None or h.forced or h.upstream is None:
            continue
        seq = per_user.setdefault(h.user, [])
        if not seq or seq[-1] != h.upstream:
            seq.append(h.upstream)
    return per_user


def controller_events(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in evs if e["actor"] == "rollout-controller"]


# ---- automatic rollback ----------------------------------------------------------------------


async def test_failing_canary_is_rolled_back_and_every_cohort_returns_to_blue(upstreams, gateway):
    blue = await upstreams("blue", named("blue", lambda r, n: 200))
    # Deterministic 10 % errors: every tenth request green receives is a 500, never two in a row
    # (so passive outlier ejection never hides green from the controller).
    green = await upstreams("green", named("green", lambda r, n: 500 if n % 10 == 0 else 200))
    gw = await gateway([rollout_route(blue.url, green.url, [30, 60, 100])], timeouts=TIMEOUTS)
    async with aiohttp.ClientSession() as s:
        traffic = await Traffic(gw.url, rate=400, users=USERS).start()
        try:
            await asyncio.sleep(0.3)  # the load is flowing before the canary takes any
            status, body = await api(
                s, gw.admin_url, "POST", "/routes/shop/rollout", {"canary": "green"}
            )
            started = time.monotonic()
            assert status == 200, body
            assert body["state"]["rollout"]["state"] == "progressing"
            assert body["state"]["weights"] == {"blue": 70, "green": 30}
            limit = (FAILURE_LIMIT + 1) * INTERVAL + 1.5
            state = await wait_state(
                s, gw.admin_url, lambda st: st["rollout"]["state"] != "progressing", limit + 2
            )
            elapsed = time.monotonic() - started
        finally:
            await traffic.stop()

        assert state["rollout"]["state"] == "rolled_back", state
        assert state["weights"] == {"blue": 100, "green": 0}
        assert state["stable"] == "blue"
        first_bad = min(h.at for h in traffic.hits if h.upstream == "green" and h.status == 500)
        assert first_bad - started < INTERVAL, "green was not failing during the first window"
        assert elapsed <= limit, f"rolled back {elapsed:.2f}s after the first bad window"

        # Nothing but green's own 500s reached the clients: no 502/503 from the gateway.
        assert not traffic.failures, traffic.failures[:3]
        assert {(h.upstream, h.status) for h in traffic.hits} <= {
            ("blue", 200),
            ("green", 200),
            ("green", 500),
        }
        # At 30 % exactly the users whose bucket is below 3000 met green, each at most once.
        canary_users = {u for u in USERS if bucket(b"shop", u) < 3000}
        history = flips(traffic.hits)
        assert {u for u, seq in history.items() if "green" in seq} == canary_users
        assert all(
            seq in (["blue"], ["green"], ["blue", "green"], ["green", "blue"])
            for seq in history.values()
        )

        evs = await events(s, gw.admin_url)
        ctl = controller_events(evs)
        rollback = [e for e in ctl if e["action"] == "rollout.rollback"]
        assert len(rollback) == 1, [e["action"] for e in ctl]
        figures = rollback[0]["figures"]
        assert figures["canary_requests"] >= 50
        assert 0.05 <= figures["canary_error_rate"] <= 0.15, figures
        assert figures["stable_requests"] > 0 and figures["stable_error_rate"] == 0.0, figures
        assert figures["error_rate_lower_bound"] > 0.01, figures
        assert rollback[0]["after"]["rollout"]["state"] == "rolled_back"
        assert rollback[0]["after"]["weights"] == {"blue": 100, "green": 0}
        assert "rolled back" in (rollback[0]["reason"] or ""), rollback[0]
        # Consecutive failed windows led to it: the judgement just before was a fail too.
        judged = [e for e in ctl if e["action"] != "rollout.hold"]
        assert [e["action"] for e in judged[-FAILURE_LIMIT:]] == [
            "rollout.fail",
            "rollout.rollback",
        ]
        # The route view shows the decision and its figures.
        detail = await route_state(s, gw.admin_url)
        assert detail["rollout"]["last_verdict"]["verdict"] == "fail"
        assert detail["rollout"]["last_verdict"]["action"] == "rollback"
        assert detail["rollout"]["failures"] == FAILURE_LIMIT

        metrics = await scrape(s, gw.admin_url)
        assert metrics[("graygate_rollout_verdicts_total", "route=shop", "verdict=fail")] >= 2
        assert metrics[("graygate_rollout_state", "route=shop", "state=rolled_back")] == 1
        assert metrics[("graygate_route_weight", "route=shop", "version=green")] == 0

        # A rollback returns every cohort to stable at once.
        assert set((await served_by(s, gw.url, USERS)).values()) == {"blue"}


# ---- healthy canary: every step, promotion, CLI rollback -------------------------------------


async def test_healthy_canary_walks_every_step_is_promoted_and_cli_rollback_restores_blue(
    upstreams, gateway
):
    blue = await upstreams("blue", named("blue", lambda r, n: 200))
    green = await upstreams("green", named("green", lambda r, n: 200))
    gw = await gateway([rollout_route(blue.url, green.url, [30, 60, 100])], timeouts=TIMEOUTS)
    async with aiohttp.ClientSession() as s:
        traffic = await Traffic(gw.url, rate=400, users=USERS).start()
        try:
            status, body = await api(
                s, gw.admin_url, "POST", "/routes/shop/rollout", {"canary": "green"}
            )
            assert status == 200, body
            seen_weights: list[dict[str, int]] = []

            def done(st: dict[str, Any]) -> bool:
                if not seen_weights or seen_weights[-1] != st["weights"]:
                    seen_weights.append(st["weights"])
                return st["rollout"]["state"] != "progressing"

            state = await wait_state(s, gw.admin_url, done, 15)
        finally:
            await traffic.stop()

        assert state["rollout"]["state"] == "promoted", state
        assert state["stable"] == "green"
        assert state["standby"] == "blue"
        assert state["weights"] == {"blue": 0, "green": 100}
        assert seen_weights[0] == {"blue": 70, "green": 30}
        assert {"blue": 40, "green": 60} in seen_weights

        ctl = controller_events(await events(s, gw.admin_url))
        judged = [e["action"] for e in ctl if e["action"] != "rollout.hold"]
        assert judged == ["rollout.advance", "rollout.advance", "rollout.promote"], judged
        for e in ctl:
            if e["action"] != "rollout.hold":
                assert e["figures"]["canary_requests"] >= 50, e
                assert e["figures"]["canary_error_rate"] == 0.0, e

        # Stickiness held: users only moved blue -> green, at most once, and all ended on green.
        assert not traffic.failures, traffic.failures[:3]
        assert {h.status for h in traffic.hits} == {200}
        history = flips(traffic.hits)
        assert set(history) == set(USERS)
        bad = {
            u: seq
            for u, seq in history.items()
            if seq not in (["blue"], ["green"], ["blue", "green"])
        }
        assert not bad, bad
        assert set((await served_by(s, gw.url, USERS)).values()) == {"green"}

        # The CLI rollback (the real command against this admin API) swaps back at once.
        rc, out, err = await run_cli("rollback", "shop", "--admin", gw.admin_url)
        assert rc == 0, (out, err)
        assert "stable=blue" in out, out
        state = await route_state(s, gw.admin_url)
        assert state["stable"] == "blue"
        assert state["weights"] == {"blue": 100, "green": 0}
        assert set((await served_by(s, gw.url, USERS)).values()) == {"blue"}
        actions = [e["action"] for e in await events(s, gw.admin_url)]
        assert actions[-1] == "rollback"


# ---- lack of traffic -------------------------------------------------------------------------


async def test_canary_without_traffic_pauses_instead_of_failing(upstreams, gateway):
    blue = await upstreams("blue")
    green = await upstreams("green")
    gw = await gateway(
        [rollout_route(blue.url, green.url, [30, 60, 100], max_inconclusive=3)],
        timeouts=TIMEOUTS,
    )
    async with aiohttp.ClientSession() as s:
        status, body = await api(
            s, gw.admin_url, "POST", "/routes/shop/rollout", {"canary": "green"}
        )
        assert status == 200, body
        started = time.monotonic()
        state = await wait_state(
            s, gw.admin_url, lambda st: st["rollout"]["state"] != "progressing", 3 * INTERVAL + 3
        )
        elapsed = time.monotonic() - started
        assert state["rollout"]["state"] == "paused", state
        assert elapsed >= 3 * INTERVAL - 0.3, f"paused after only {elapsed:.2f}s"
        assert state["weights"] == {"blue": 70, "green": 30}  # held at its step, not rolled back
        assert state["rollout"]["step"] == 0
        assert state["rollout"]["failures"] == 0
        assert state["rollout"]["inconclusive"] == 3
        assert state["rollout"]["last_verdict"]["verdict"] == "need_more_samples"

        ctl = controller_events(await events(s, gw.admin_url))
        assert [e["action"] for e in ctl] == ["rollout.hold", "rollout.hold", "rollout.pause"]
        assert all(e["figures"]["canary_requests"] == 0 for e in ctl)

        metrics = await scrape(s, gw.admin_url)
        assert (
            metrics[("graygate_rollout_verdicts_total", "route=shop", "verdict=need_more_samples")]
            == 3
        )
        assert metrics[("graygate_rollout_verdicts_total", "route=shop", "verdict=fail")] == 0
        assert metrics[("graygate_rollout_state", "route=shop", "state=paused")] == 1

        # Still paused a window later: a paused rollout is not judged.
        await asyncio.sleep(INTERVAL + 0.3)
        assert (await route_state(s, gw.admin_url))["rollout"]["state"] == "paused"


# ---- forced (tester) traffic stays out of the verdict ----------------------------------------


async def test_forced_canary_errors_do_not_move_the_verdict(upstreams, gateway):
    blue = await upstreams("blue", named("blue", lambda r, n: 200))
    green = await upstreams(
        "green", named("green", lambda r, n: 500 if "X-Canary" in r.headers else 200)
    )
    gw = await gateway([rollout_route(blue.url, green.url, [30, 60, 100])], timeouts=TIMEOUTS)
    async with aiohttp.ClientSession() as s:
        users = await Traffic(gw.url, rate=350, users=USERS).start()
        testers = await Traffic(gw.url, rate=150, workers=4, headers={"X-Canary": "always"}).start()
        try:
            status, body = await api(
                s, gw.admin_url, "POST", "/routes/shop/rollout", {"canary": "green"}
            )
            assert status == 200, body
            state = await wait_state(
                s, gw.admin_url, lambda st: st["rollout"]["state"] != "progressing", 15
            )
        finally:
            await testers.stop()
            await users.stop()

        assert state["rollout"]["state"] == "promoted", state
        assert state["stable"] == "green"
        ctl = controller_events(await events(s, gw.admin_url))
        assert not [e for e in ctl if e["action"] in ("rollout.fail", "rollout.rollback")], ctl
        assert all(e["figures"]["canary_errors"] == 0 for e in ctl), ctl

        # The forced requests really did fail on green, many times more than min_samples.
        forced_green_500 = [h for h in testers.hits if h.upstream == "green" and h.status == 500]
        assert len(forced_green_500) >= 100
        metrics = await scrape(s, gw.admin_url)
        key = (
            "graygate_requests_total",
            "code=500",
            "reason=force_header",
            "route=shop",
            "version=green",
        )
        assert metrics[key] >= len(forced_green_500)
        assert metrics[("graygate_rollout_verdicts_total", "route=shop", "verdict=fail")] == 0
        assert {h.status for h in users.hits} == {200}


# ---- manual gates and conflicts --------------------------------------------------------------


async def test_pause_resume_promote_abort_and_conflicts_answer_409_with_state(upstreams, gateway):
    blue = await upstreams("blue")
    green = await upstreams("green")
    gw = await gateway(
        [rollout_route(blue.url, green.url, [30, 60, 100], max_inconclusive=50)],
        timeouts=TIMEOUTS,
    )
    admin = gw.admin_url

    async def conflict(method: str, path: str, body: Any, phase: str) -> None:
        status, got = await api(s, admin, method, path, body)
        assert status == 409, (path, status, got)
        # stale_revision is the answer to an If-Match on an old revision; none is sent here.
        assert got["error"]["code"] == "conflict", got
        assert got["error"]["message"]
        assert got["state"]["rollout"]["state"] == phase, got

    async with aiohttp.ClientSession() as s:
        await conflict("POST", "/routes/shop/rollout/promote", {}, "idle")
        await conflict("POST", "/routes/shop/rollout/pause", {}, "idle")
        await conflict("POST", "/routes/shop/rollout/resume", {}, "idle")
        await conflict("POST", "/routes/shop/rollout/abort", {}, "idle")
        await conflict("POST", "/routes/shop/rollback", {}, "idle")

        status, body = await api(s, admin, "POST", "/routes/shop/rollout", {"canary": "green"})
        assert status == 200, body
        assert body["state"]["rollout"]["state"] == "progressing"
        assert body["state"]["rollout"]["step"] == 0
        await conflict("POST", "/routes/shop/rollout", {"canary": "green"}, "progressing")
        await conflict("PUT", "/routes/shop/weights", {"blue": 50, "green": 50}, "progressing")
        await conflict("POST", "/routes/shop/rollout/resume", {}, "progressing")
        now = await route_state(s, admin)  # refusals change nothing
        assert now["weights"] == {"blue": 70, "green": 30}
        assert now["rollout"]["state"] == "progressing" and now["rollout"]["step"] == 0

        status, body = await api(s, admin, "POST", "/routes/shop/rollout/pause", {})
        assert status == 200, body
        assert body["state"]["rollout"]["state"] == "paused"
        assert body["state"]["weights"] == {"blue": 70, "green": 30}
        await conflict("POST", "/routes/shop/rollout/pause", {}, "paused")
        await conflict("POST", "/routes/shop/rollout", {"canary": "green"}, "paused")

        status, body = await api(s, admin, "POST", "/routes/shop/rollout/resume", {})
        assert status == 200, body
        assert body["state"]["rollout"]["state"] == "progressing"
        assert body["state"]["rollout"]["step"] == 0

        status, body = await api(s, admin, "POST", "/routes/shop/rollout/abort", {})
        assert status == 200, body
        assert body["state"]["rollout"]["state"] == "rolled_back"
        assert body["state"]["weights"] == {"blue": 100, "green": 0}
        assert set((await served_by(s, gw.url, USERS[:40])).values()) == {"blue"}
        await conflict("POST", "/routes/shop/rollout/abort", {}, "rolled_back")
        await conflict("POST", "/routes/shop/rollout/promote", {}, "rolled_back")

        # A fresh rollout after the rollback, promoted by hand from its first step.
        status, body = await api(s, admin, "POST", "/routes/shop/rollout", {"canary": "green"})
        assert status == 200, body
        status, body = await api(s, admin, "POST", "/routes/shop/rollout/promote", {})
        assert status == 200, body
        assert body["state"]["rollout"]["state"] == "promoted"
        assert body["state"]["stable"] == "green"
        assert body["state"]["weights"] == {"blue": 0, "green": 100}
        assert set((await served_by(s, gw.url, USERS[:40])).values()) == {"green"}
        await conflict("POST", "/routes/shop/rollout/promote", {}, "promoted")
        await conflict("POST", "/routes/shop/rollout/pause", {}, "promoted")

        actions = [
            e["action"] for e in await events(s, admin) if e["actor"] != "rollout-controller"
        ]
        assert actions == [
            "rollout.start",
            "rollout.pause",
            "rollout.resume",
            "rollout.abort",
            "rollout.start",
            "rollout.promote",
        ]


# ---- the real command: CLI start, restart mid-rollout ----------------------------------------


async def test_restart_mid_rollout_resumes_at_the_same_step(
    upstreams, graygate_process, tmp_path: Path
):
    blue = await upstreams("blue")
    green = await upstreams("green")
    port, admin_port = free_port(), free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    url = f"http://127.0.0.1:{port}"
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "state": {"path": str(tmp_path / "state.json")},
        "timeouts": TIMEOUTS,
        "grace_period": "1s",
        "routes": [rollout_route(blue.url, green.url, [10, {"pause": True}, 50, 100])],
    }
    path = tmp_path / "graygate.yaml"
    path.write_text(yaml.safe_dump(config))

    async def boot() -> Any:
        proc = graygate_process("serve", "-c", str(path))
        await wait_listening(admin_port, proc)
        await wait_listening(port, proc)
        return proc

    # Users in the 10 % canary cohort and users outside it (the bucket is stable across processes).
    cohort = [u for u in USERS if bucket(b"shop", u) < 1000]
    others = [u for u in USERS if bucket(b"shop", u) >= 1000][:20]
    assert len(cohort) >= 5

    proc = await boot()
    async with aiohttp.ClientSession() as s:
        rc, out, err = await run_cli("rollout", "start", "shop", "--admin", admin)
        assert rc == 0, (out, err)
        assert "progressing" in out, out
        before = await route_state(s, admin)
        assert before["rollout"]["state"] == "progressing" and before["rollout"]["step"] == 0
        assert before["weights"] == {"blue": 90, "green": 10}

        # Restart at a weight step: same step, same weights, same step start.
        assert await stop_process(proc) == 0, proc.output()
        proc = await boot()
        after = await route_state(s, admin)
        assert after["rollout"]["state"] == "progressing"
        assert after["rollout"]["step"] == 0
        assert after["rollout"]["canary"] == "green"
        assert after["weights"] == {"blue": 90, "green": 10}
        assert after["rollout"]["step_started"] == before["rollout"]["step_started"]
        assert after["rollout"]["steps"] == [10, {"pause": True}, 50, 100]

        # Traffic from the canary cohort passes step 0; the rollout stops at the manual gate.
        traffic = await Traffic(url, rate=200, users=cohort, workers=4).start()
        try:
            gate = await wait_state(s, admin, lambda st: st["rollout"]["step"] >= 1, 8)
        finally:
            await traffic.stop()
        assert gate["rollout"]["state"] == "progressing" and gate["rollout"]["step"] == 1, gate
        assert gate["weights"] == {"blue": 90, "green": 10}
        assert {h.upstream for h in traffic.hits} == {"green"}

        # Restart at the manual pause step: still there, and still waiting for a resume.
        assert await stop_process(proc) == 0, proc.output()
        proc = await boot()
        held = await route_state(s, admin)
        assert held["rollout"]["state"] == "progressing", held
        assert held["rollout"]["step"] == 1
        assert held["weights"] == {"blue": 90, "green": 10}
        assert set((await served_by(s, url, cohort)).values()) == {"green"}
        assert set((await served_by(s, url, others)).values()) == {"blue"}
        await asyncio.sleep(INTERVAL + 0.5)
        held = await route_state(s, admin)
        assert held["rollout"]["step"] == 1 and held["rollout"]["state"] == "progressing", held

        rc, out, err = await run_cli("rollout", "resume", "shop", "--admin", admin)
        assert rc == 0, (out, err)
        resumed = await route_state(s, admin)
        assert resumed["rollout"]["step"] == 2
        assert resumed["weights"] == {"blue": 50, "green": 50}

        # The event log survived both restarts, in order and with unique ids.
        evs = await events(s, admin)
        ids = [e["id"] for e in evs]
        assert ids == sorted(set(ids))
        actions = [e["action"] for e in evs if e["actor"] != "rollout-controller"]
        assert actions == ["rollout.start", "rollout.resume"]
        assert any(e["action"] == "rollout.advance" for e in evs)

    # What survived the restarts is on disk: the state file says step 2 at 50 %.
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["routes"]["shop"]["rollout"]["step"] == 2, saved["routes"]
    assert saved["routes"]["shop"]["weights"] == {"blue": 50, "green": 50}
