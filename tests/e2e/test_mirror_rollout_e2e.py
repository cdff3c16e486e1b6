"""Mirror steps end to end: the real `graygate` command, real aiohttp upstreams on loopback,
the rollout started with `graygate rollout start --steps`, user traffic from real clients.
A mirror step shadows every request to green while green serves no user: identical answers
pass it, a JSON field differing on 5 % of answers fails it (rollback), an ignored path and
a difference stable shows too (noise: stable) are not held against green."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.helpers import free_port, route_config
from tests.helpers.rollout import (
    Traffic,
    events,
    run_cli,
    scrape,
    stop_process,
    wait_listening,
    wait_state,
)

MIN_SAMPLES = 100
TIMEOUTS = {"connect": "500ms", "read": "2s", "request": "3s"}
MIRROR_STEP = {"mirror": "3s", "percent": 100, "max_mismatch_ratio": 0.01, "min_samples": 100}
STEPS = yaml.safe_dump([MIRROR_STEP, 50, 100], default_flow_style=True).strip()


def answering(version: str, make: Any) -> Any:
    """An upstream handler answering JSON `make(request, n)` for its n-th request, saying
    which upstream it is in X-Upstream (the users' side of "who served me")."""
    counter = itertools.count(1)

    async def serve(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response(make(request, next(counter)), headers={"X-Upstream": version})

    return serve


def shadowed(request: dict[str, Any]) -> bool:
    return any(k.lower() == b"x-graygate-shadow" for k, _ in request["headers"])


async def scenario(
    upstreams: Any,
    graygate_process: Any,
    tmp_path: Path,
    blue: Any,
    green: Any,
    mirror: dict[str, Any] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Boot graygate, start the rollout with a mirror step from the CLI, send user traffic
    until the step is decided; returns what the test asserts on."""
    b = await upstreams("blue", blue)
    g = await upstreams("green", green)
    port, admin_port = free_port(), free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    route = route_config(
        b.url,
        g.url,
        mirror={"compare": {"body": "json"}, **(mirror or {})},
        rollout={
            "steps": [50, 100],
            "interval": "1s",
            "failure_limit": 1,
            "analysis": {"min_samples": 50, "max_latency_ratio": None, "confidence": 0.99},
        },
    )
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "state": {"path": str(tmp_path / "state.json")},
        "timeouts": TIMEOUTS,
        "grace_period": "1s",
        "workers": workers,
        "routes": [route],
    }
    path = tmp_path / "graygate.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = graygate_process("serve", "-c", str(path))
    await wait_listening(admin_port, proc)
    await wait_listening(port, proc)
    out: dict[str, Any] = {"blue": b, "green": g, "admin": admin}
    async with aiohttp.ClientSession() as s:
        rc, stdout, stderr = await run_cli(
            "rollout", "start", "shop", "--steps", STEPS, "--admin", admin
        )
        assert rc == 0, (stdout, stderr, proc.output())
        traffic = await Traffic(f"http://127.0.0.1:{port}", rate=120, workers=4).start()

        def decided(st: dict[str, Any]) -> bool:
            if st["rollout"]["step"] >= 1 or st["rollout"]["state"] != "progressing":
                return True
            # Green's own counter, read while the mirror step still runs.
            out["green_users"] = [r for r in g.requests if not shadowed(r)]
            out["green_shadows"] = [r for r in g.requests if shadowed(r)]
            return False

        try:
            out["state"] = await wait_state(s, admin, decided, 25)
            if out["state"]["rollout"]["state"] == "rolled_back":  # green never had a user
                out["green_users"] = [r for r in g.requests if not shadowed(r)]
        finally:
            await traffic.stop()
        out["hits"] = traffic.hits
        out["failures"] = traffic.failures
        out["events"] = await events(s, admin)
        out["metrics"] = await scrape(s, admin)
        async with s.get(admin + "/api/v1/routes/shop/mirror") as resp:
            assert resp.status == 200
            out["mirror"] = await resp.json()
    rc, stdout, stderr = await run_cli("mirror", "shop", "--admin", admin)
    assert rc == 0, (stdout, stderr)
    out["cli"] = stdout
    assert await stop_process(proc) == 0, proc.output()
    return out


def metric(out: dict[str, Any], name: str, **labels: str) -> float:
    want = {f"{k}={v}" for k, v in labels.items()}
    return sum(v for key, v in out["metrics"].items() if key[0] == name and want <= set(key[1:]))


def assert_no_user_saw_green(out: dict[str, Any]) -> None:
    assert out["failures"] == []
    assert out["hits"], "no user traffic"
    assert {h.upstream for h in out["hits"]} == {"blue"}
    assert out["green_users"] == []
    assert metric(out, "graygate_requests_total", route="shop", version="green") == 0


def same(request: web.Request, n: int) -> dict[str, Any]:
    return {"path": request.path, "price": 10, "items": [1, 2, 3]}


async def test_identical_green_passes_the_mirror_step_and_goes_on_to_weights(
    upstreams, graygate_process, tmp_path
):
    out = await scenario(
        upstreams, graygate_process, tmp_path, answering("blue", same), answering("green", same)
    )
    state = out["state"]
    assert state["rollout"]["state"] == "progressing", state
    assert state["rollout"]["step"] == 1
    assert state["weights"] == {"blue": 50, "green": 50}
    advance = next(e for e in out["events"] if e["action"] == "rollout.advance")
    assert advance["reason"].startswith("canary green passed the mirror step (0 of ")
    figures = advance["figures"]
    assert figures["mirror_samples"] >= MIN_SAMPLES
    assert figures["mirror_mismatches"] == 0
    assert figures["mirror_remaining"] == 0
    # Until the step passed, green saw shadow copies and no user.
    assert out["green_users"] == []
    assert len(out["green_shadows"]) >= MIN_SAMPLES
    assert metric(out, "graygate_mirror_requests_total", version="green", result="match") >= 100
    assert (
        metric(out, "graygate_mirror_requests_total", version="green", result="body_mismatch") == 0
    )
    assert out["mirror"]["recent"] == []


def price_every_20th(request: web.Request, n: int) -> dict[str, Any]:
    return {"path": request.path, "price": 11 if n % 20 == 0 else 10, "items": [1, 2, 3]}


async def test_green_differing_on_5_percent_fails_the_step_and_rolls_back_unseen(
    upstreams, graygate_process, tmp_path
):
    out = await scenario(
        upstreams,
        graygate_process,
        tmp_path,
        answering("blue", same),
        answering("green", price_every_20th),
    )
    state = out["state"]
    assert state["rollout"]["state"] == "rolled_back", state
    assert state["weights"] == {"blue": 100, "green": 0}
    rollback = next(e for e in out["events"] if e["action"] == "rollout.rollback")
    assert (
        "failed the mirror step, rolled back (no user request was served by green)"
        in (rollback["reason"])
    )
    figures = rollback["figures"]
    assert figures["mirror_samples"] >= MIN_SAMPLES
    assert figures["mirror_mismatches"] >= 5
    assert figures["mismatch_lower_bound"] > 0.01
    sample = figures["mismatches"]
    assert 1 <= len(sample) <= 5
    assert {m["result"] for m in sample} == {"body_mismatch"}
    assert sample[0]["json_paths"] == [{"path": "$.price", "primary": "10", "shadow": "11"}]
    # The mismatch list of the API and the CLI name the JSON path with both values.
    recent = out["mirror"]["recent"]
    assert recent and all(
        m["json_paths"] == [{"path": "$.price", "primary": "10", "shadow": "11"}] for m in recent
    )
    assert all(m["status"] == [200, 200] and m["version"] == "green" for m in recent)
    assert "$.price: 10 vs 11" in out["cli"]
    assert "body_mismatch" in out["cli"]
    assert_no_user_saw_green(out)
    assert (
        metric(out, "graygate_mirror_requests_total", version="green", result="body_mismatch") >= 5
    )


def stamped(request: web.Request, n: int) -> dict[str, Any]:
    return {"path": request.path, "price": 10, "items": [1, 2, 3], "served_at": f"green-{n}"}


async def test_a_difference_at_an_ignored_json_path_passes(upstreams, graygate_process, tmp_path):
    out = await scenario(
        upstreams,
        graygate_process,
        tmp_path,
        answering("blue", same),
        answering("green", stamped),
        mirror={"compare": {"body": "json", "ignore_json_paths": ["$.served_at"]}},
    )
    assert out["state"]["rollout"]["step"] == 1, out["state"]
    assert out["state"]["weights"] == {"blue": 50, "green": 50}
    assert (
        metric(out, "graygate_mirror_requests_total", version="green", result="body_mismatch") == 0
    )
    assert out["green_users"] == []


def nonce(request: web.Request, n: int) -> dict[str, Any]:
    return {"path": request.path, "price": 10, "nonce": random.random()}


async def test_noise_stable_does_not_count_what_stable_differs_in_too(
    upstreams, graygate_process, tmp_path
):
    out = await scenario(
        upstreams,
        graygate_process,
        tmp_path,
        answering("blue", nonce),
        answering("green", nonce),
        mirror={"noise": "stable"},
    )
    assert out["state"]["rollout"]["state"] == "progressing", out["state"]
    assert out["state"]["rollout"]["step"] == 1
    advance = next(e for e in out["events"] if e["action"] == "rollout.advance")
    assert advance["figures"]["mirror_mismatches"] == 0, advance["figures"]
    # Stable got its own copies (the noise floor), on top of the users' requests.
    shadows_to_blue = [r for r in out["blue"].requests if shadowed(r)]
    assert len(shadows_to_blue) >= MIN_SAMPLES
    assert out["green_users"] == []


async def test_without_the_noise_floor_the_same_nonce_fails_green(
    upstreams, graygate_process, tmp_path
):
    # The control of the test above: the difference is real, only stable's copies excuse it.
    out = await scenario(
        upstreams, graygate_process, tmp_path, answering("blue", nonce), answering("green", nonce)
    )
    assert out["state"]["rollout"]["state"] == "rolled_back", out["state"]
    assert "$.nonce" in out["cli"]
    assert_no_user_saw_green(out)


async def test_with_two_workers_the_gate_sees_every_workers_shadows(
    upstreams, graygate_process, tmp_path
):
    # The shadows run in the worker processes; their counts and mismatches reach the
    # supervisor's Mirrors in the figure batches, where the controller and the API read them.
    out = await scenario(
        upstreams,
        graygate_process,
        tmp_path,
        answering("blue", same),
        answering("green", price_every_20th),
        workers=2,
    )
    assert out["state"]["rollout"]["state"] == "rolled_back", out["state"]
    rollback = next(e for e in out["events"] if e["action"] == "rollout.rollback")
    assert rollback["figures"]["mismatches"][0]["json_paths"][0]["path"] == "$.price"
    assert "$.price: 10 vs 11" in out["cli"]
    assert metric(out, "graygate_mirror_requests_total", version="green", result="match") >= 90
    assert_no_user_saw_green(out)
