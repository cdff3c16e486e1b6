"""Rollout gates (rollout.gates; core/rollout.py gate_for and hold_at_gate, control/gates.py,
the hook in control/controller.py): the config keys, the pure part, and real gate servers
judging real rollouts in the real App: 403 holds the promotion (state and event say so)
and 200 lets it through; a hanging gate holds only its own route and times out into a hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.control.ctl import _rollout as rollout_text
from proxy.core.analysis import Judgement
from proxy.core.config.load import parse_config
from proxy.core.config.model import (
    ConfigError,
    GateConfig,
    GatesConfig,
    Match,
    RolloutConfig,
    RouteConfig,
    VersionConfig,
    WeightStep,
)
from proxy.core.rollout import decide, gate_for, hold_at_gate, pause, start
from proxy.core.state import RouteState, rollout_from_json, rollout_to_json
from tests.helpers import route_config, serve_app, wait_until

PASS = Judgement("pass", (), {"canary_requests": 300})


# ---- config and the pure part ---------------------------------------------------------------


def config_with(gates: object) -> dict[str, Any]:
    return {
        "routes": [
            route_config("http://127.0.0.1:1", "http://127.0.0.1:2", rollout={"gates": gates})
        ]
    }


def test_gates_config():
    cfg = parse_config(
        config_with(
            {
                "confirm_step": {"url": "https://cm.example.com/step", "timeout": "250ms"},
                "confirm_promotion": {"url": "http://127.0.0.1:9/promote"},
            }
        ),
        env={},
    )
    gates = cfg.routes[0].rollout.gates
    assert gates.confirm_step == GateConfig("https://cm.example.com/step", 0.25)
    assert gates.confirm_promotion == GateConfig("http://127.0.0.1:9/promote", 5.0)
    assert parse_config(config_with(None), env={}).routes[0].rollout.gates == GatesConfig()


@pytest.mark.parametrize(
    ("gates", "path", "words"),
    [
        (
            {"confirm_rollout": {"url": "http://x"}},
            "routes[0].rollout.gates.confirm_rollout",
            "unknown",
        ),
        ({"confirm_step": {}}, "routes[0].rollout.gates.confirm_step.url", "is required"),
        ({"confirm_step": {"url": "x"}}, "routes[0].rollout.gates.confirm_step.url", "http://"),
        (
            {"confirm_promotion": {"url": "http://x", "timeout": "soon"}},
            "routes[0].rollout.gates.confirm_promotion.timeout",
            "duration",
        ),
    ],
)
def test_gates_refusals_name_the_key(gates: object, path: str, words: str):
    with pytest.raises(ConfigError) as err:
        parse_config(config_with(gates), env={})
    assert err.value.path == path and words in str(err.value)


def gated_route(**gates: GateConfig) -> RouteConfig:
    return RouteConfig(
        "shop",
        Match(),
        (VersionConfig("blue", ()), VersionConfig("green", ())),
        "blue",
        (("blue", 100), ("green", 0)),
        rollout=RolloutConfig(steps=(WeightStep(10), WeightStep(50)), gates=GatesConfig(**gates)),
    )


def test_gate_for_names_the_gate_of_each_step():
    gate = GateConfig("http://gate")
    route = gated_route(confirm_step=gate)
    state = start(route, RouteState(route.weights, "blue"), "green", None, now=0.0)
    advance = decide(route, state, PASS, now=30.0)
    assert advance.action == "advance" and gate_for(route, advance) == "confirm_step"
    last = decide(route, advance.state, PASS, now=60.0)
    assert last.action == "promote" and gate_for(route, last) is None  # not configured
    both = gated_route(confirm_step=gate, confirm_promotion=gate)
    assert gate_for(both, last) == "confirm_promotion"
    held = decide(route, state, Judgement("need_more_samples", (), {}), now=30.0)
    assert gate_for(both, held) is None
    assert gate_for(gated_route(), advance) is None


def test_hold_at_gate_holds_without_failing_and_a_step_clears_it():
    route = gated_route(confirm_promotion=GateConfig("http://gate"))
    state = start(route, RouteState(route.weights, "blue"), "green", None, now=0.0)
    state = replace(state, rollout=replace(state.rollout, failures=1, inconclusive=3))
    d = hold_at_gate(state, "confirm_promotion", 403, None, PASS, now=5.0)
    assert d.action == "gate_hold" and "answered 403" in d.message
    ro = d.state.rollout
    assert (ro.phase, ro.step, d.state.weights) == ("progressing", 0, state.weights)
    assert (ro.failures, ro.inconclusive) == (0, 0)
    assert ro.paused_by_gate == {
        "gate": "confirm_promotion",
        "status": 403,
        "error": None,
        "since": 5.0,
    }
    again = hold_at_gate(d.state, "confirm_promotion", None, "no answer within 1s", PASS, now=9.0)
    assert again.state.rollout.paused_by_gate is not None
    assert again.state.rollout.paused_by_gate["since"] == 5.0  # held since the first refusal
    assert "gave no answer" in again.message
    # Stored and read back (file and redis stores use these).
    assert rollout_from_json(rollout_to_json(again.state.rollout)) == again.state.rollout
    # Entering a step or a manual pause clears it.
    assert decide(route, again.state, PASS, now=12.0).state.rollout.paused_by_gate is None
    assert pause(again.state).rollout.paused_by_gate is None


# ---- real gates, real rollouts ---------------------------------------------------------------


@dataclass
class Gate:
    url: str
    status: int = 403
    hang: asyncio.Event | None = None  # set: answer; unset: hold the request open
    asked: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def gate_server() -> AsyncIterator[Callable[[], Any]]:
    runners: list[tuple[web.AppRunner, Gate]] = []

    async def start_gate() -> Gate:
        gate = Gate("")  # its url once it listens

        async def answer(request: web.Request) -> web.Response:
            body = json.loads(await request.read())
            gate.asked.append({"path": request.path, "at": time.time(), **body})
            if gate.hang is not None:
                await gate.hang.wait()
            return web.Response(status=gate.status, text="decided by the test")

        app = web.Application()
        app.router.add_post("/{tail:.*}", answer)
        runner, port = await serve_app(app, shutdown_timeout=1.0)
        gate.url = f"http://127.0.0.1:{port}"
        runners.append((runner, gate))
        return gate

    yield start_gate
    for runner, gate in runners:
        if gate.hang is not None:
            gate.hang.set()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def traffic(url: str, paths: list[str]) -> AsyncIterator[None]:
    """About 150 req/s spread over `paths`, until the block ends."""

    async def worker(path: str) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + path) as resp:
                    await resp.read()
            await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(worker(p)) for p in paths for _ in range(1)]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def rollout(steps: list[int], gates: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "steps": steps,
        "interval": "300ms",
        "analysis": {"min_samples": 5, "max_p99_latency": None, "max_latency_ratio": None},
        **({"gates": gates} if gates else {}),
    }


async def route_state(s: aiohttp.ClientSession, admin: str, route: str) -> dict[str, Any]:
    async with s.get(f"{admin}/api/v1/routes/{route}") as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def events(s: aiohttp.ClientSession, admin: str, route: str) -> list[dict[str, Any]]:
    async with s.get(f"{admin}/api/v1/events", params={"route": route}) as resp:
        body = await resp.json()
        return list(body["events"])


async def test_a_403_gate_holds_promotion_and_a_200_lets_it_through(
    gateway, upstreams, gate_server
):
    gate = await gate_server()
    blue, green = await upstreams("blue"), await upstreams("green")
    gw = await gateway(
        [
            route_config(
                blue.url,
                green.url,
                rollout=rollout([50], {"confirm_promotion": {"url": gate.url + "/promote"}}),
            )
        ]
    )
    admin = gw.admin_url
    async with aiohttp.ClientSession() as s, traffic(gw.url, ["/"]):
        async with s.post(f"{admin}/api/v1/routes/shop/rollout", json={"canary": "green"}) as r:
            assert r.status == 200

        async def held() -> Any:
            found = [
                e for e in await events(s, admin, "shop") if e["action"] == "rollout.gate_hold"
            ]
            return found[0] if found else None

        hold = await wait_until(held, 15.0, 0.05)
        assert hold["figures"]["gate"] == {
            "gate": "confirm_promotion",
            "status": 403,
            "error": None,
        }
        assert "confirm_promotion gate answered 403" in hold["reason"]
        state = (await route_state(s, admin, "shop"))["state"]
        ro = state["rollout"]
        assert ro["state"] == "progressing" and ro["step"] == 0  # held, not failed
        assert ro["paused_by_gate"]["gate"] == "confirm_promotion"
        assert ro["paused_by_gate"]["status"] == 403
        assert state["weights"] == {"blue": 50, "green": 50} and state["stable"] == "blue"
        assert rollout_text(ro) == "progressing green step 1, held by gate confirm_promotion (403)"

        asked = gate.asked[0]
        assert (asked["path"], asked["gate"], asked["route"]) == (
            "/promote",
            "confirm_promotion",
            "shop",
        )
        assert (asked["canary"], asked["stable"], asked["next"]["action"]) == (
            "green",
            "blue",
            "promote",
        )
        assert asked["analysis"]["verdict"] == "pass"
        assert asked["analysis"]["figures"]["canary_requests"] >= 5

        gate.status = 200

        async def promoted() -> Any:
            state = (await route_state(s, admin, "shop"))["state"]
            return state if state["rollout"]["state"] == "promoted" else None

        state = await wait_until(promoted, 15.0, 0.05)
        assert state["stable"] == "green" and state["rollout"]["paused_by_gate"] is None
        promote = [e for e in await events(s, admin, "shop") if e["action"] == "rollout.promote"]
        assert promote[-1]["figures"]["gate"]["status"] == 200
        assert not [e for e in await events(s, admin, "shop") if "rollback" in e["action"]]


async def test_a_hanging_gate_holds_only_its_route_then_times_out(gateway, upstreams, gate_server):
    gate = await gate_server()
    gate.hang = asyncio.Event()
    blue, green = await upstreams("blue"), await upstreams("green")
    step_gate = {"confirm_step": {"url": gate.url + "/step", "timeout": "2s"}}
    gw = await gateway(
        [
            {
                **route_config(blue.url, green.url, rollout=rollout([50, 80], step_gate)),
                "match": {"host": "*", "path_prefix": "/shop"},
            },
            {
                # Several steps: it is still stepping while shop's gate call hangs.
                **route_config(blue.url, green.url, rollout=rollout([50, 60, 70, 80, 90])),
                "name": "other",
                "match": {"host": "*", "path_prefix": "/other"},
            },
        ]
    )
    admin = gw.admin_url
    async with aiohttp.ClientSession() as s, traffic(gw.url, ["/shop", "/other/x"]):
        for name in ("shop", "other"):
            async with s.post(
                f"{admin}/api/v1/routes/{name}/rollout", json={"canary": "green"}
            ) as r:
                assert r.status == 200

        await wait_until(
            lambda: asyncio.sleep(0, bool(gate.asked)), 15.0, 0.05
        )  # shop's call is open
        asked_at = gate.asked[0]["at"]
        assert gate.asked[0]["gate"] == "confirm_step"

        async def timed_out() -> Any:
            found = [
                e for e in await events(s, admin, "shop") if e["action"] == "rollout.gate_hold"
            ]
            return found[0] if found else None

        hold = await wait_until(timed_out, 15.0, 0.05)
        assert hold["figures"]["gate"]["status"] is None
        assert hold["figures"]["gate"]["error"] == "no answer within 2s"
        state = (await route_state(s, admin, "shop"))["state"]
        assert state["rollout"]["paused_by_gate"]["error"] == "no answer within 2s"
        assert state["rollout"]["step"] == 0 and state["weights"]["green"] == 50
        # While shop's gate call hung, the controller kept stepping the other route.
        moved = [
            e["time"]
            for e in await events(s, admin, "other")
            if e["action"] in ("rollout.advance", "rollout.promote")
        ]
        assert [t for t in moved if asked_at < t < hold["time"]], (asked_at, hold["time"], moved)

        gate.status = 200
        gate.hang.set()

        async def stepped() -> Any:
            return (await route_state(s, admin, "shop"))["state"]["rollout"]["step"] == 1

        await wait_until(stepped, 15.0, 0.05)
        state = (await route_state(s, admin, "shop"))["state"]
        assert state["weights"]["green"] == 80 and state["rollout"]["paused_by_gate"] is None
