"""state.py: compiling config + runtime state into the snapshot, and the PolicyStore."""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.config.model import (
    CohortSource,
    Config,
    ForceRule,
    PauseStep,
    RouteConfig,
    StickyConfig,
    WeightStep,
)
from proxy.core.state import (
    PolicyError,
    PolicyStore,
    RolloutStatus,
    RouteState,
    compile_policy,
    initial_state,
    rollout_from_json,
    rollout_to_json,
)
from tests.helpers import route_model


def route_config(name: str = "shop", **kw: Any) -> RouteConfig:
    """route_model with this file's default weights: 90/10."""
    return route_model(name, **{"weights": (90, 10), **kw})


def config(*routes: RouteConfig) -> Config:
    return Config(routes=routes or (route_config(),))


def state(blue: int, green: int, **kw) -> RouteState:
    return RouteState(weights=(("blue", blue), ("green", green)), **{"stable": "blue", **kw})


# --- compile_policy -----------------------------------------------------------------------


def test_compile_uses_initial_state_for_missing_routes():
    cfg = config(route_config("a"), route_config("b", weights=(30, 70)))
    policy = compile_policy(cfg, {"a": state(60, 40, revision=7)})
    assert [r.name for r in policy.routes] == ["a", "b"]
    assert policy.by_name["a"].state.revision == 7
    assert policy.by_name["b"].state == initial_state(cfg.routes[1])
    assert policy.by_name["b"].canary_weight == 70
    assert policy.by_name["b"].threshold == 7000
    assert policy.generation == 0


def test_compile_canary_role():
    rc = route_config()
    p = compile_policy(config(rc), {"shop": state(75, 25)}).routes[0]
    assert (p.stable, p.canary, p.canary_weight, p.threshold) == ("blue", "green", 25, 2500)

    # green is stable after a promotion: blue is the other version
    p = compile_policy(config(rc), {"shop": state(0, 100, stable="green")}).routes[0]
    assert (p.stable, p.canary, p.canary_weight, p.threshold) == ("green", "blue", 0, 0)

    # a running or paused rollout names its canary
    for phase in ("progressing", "paused"):
        s = state(40, 60, stable="green", rollout=RolloutStatus(phase=phase, canary="blue"))
        p = compile_policy(config(rc), {"shop": s}).routes[0]
        assert (p.canary, p.canary_weight) == ("blue", 40)

    # a finished rollout does not: the non-stable version is the canary role
    s = state(100, 0, stable="blue", rollout=RolloutStatus(phase="promoted", canary="blue"))
    p = compile_policy(config(rc), {"shop": s}).routes[0]
    assert (p.canary, p.canary_weight) == ("green", 0)

    single = route_config(versions=("blue",), weights=(100,))
    p = compile_policy(config(single), {}).routes[0]
    assert (p.canary, p.canary_weight, p.threshold) == (None, 0, 0)


def test_compile_cumulative_skips_zero_weights():
    rc = route_config()
    p = compile_policy(config(rc), {"shop": state(70, 30)}).routes[0]
    assert p.cumulative == (("blue", 70), ("green", 100))
    p = compile_policy(config(rc), {"shop": state(0, 100)}).routes[0]
    assert p.cumulative == (("green", 100),)
    p = compile_policy(config(rc), {"shop": state(100, 0)}).routes[0]
    assert p.cumulative == (("blue", 100),)


@pytest.mark.parametrize(
    ("host", "exact", "suffix"),
    [
        ("*", None, None),
        ("shop.example.com", "shop.example.com", None),
        ("Shop.Example.com", "shop.example.com", None),
        ("*.example.com", None, ".example.com"),
        ("[::1]", "::1", None),
    ],
)
def test_compile_host_match(host, exact, suffix):
    p = compile_policy(config(route_config(host=host, prefix="/api")), {}).routes[0]
    assert (p.host_exact, p.host_suffix, p.path_prefix) == (exact, suffix, "/api")


def test_compile_salt_and_needs_cookies():
    p = compile_policy(config(route_config("r1")), {}).routes[0]
    assert p.salt == b"r1"
    assert not p.needs_cookies
    sticky = StickyConfig(keys=(CohortSource("header", "x-user-id"),), salt="pepper")
    p = compile_policy(config(route_config("r1", sticky=sticky)), {}).routes[0]
    assert p.salt == b"pepper"
    assert p.needs_cookies  # graygate's own cookie may carry the cohort key
    force = (ForceRule("cookie", "canary", "always", None, "canary"),)
    p = compile_policy(config(route_config("r1", force=force)), {}).routes[0]
    assert p.needs_cookies
    force = (ForceRule("header", "x-canary", "always", None, "canary"),)
    p = compile_policy(config(route_config("r1", force=force)), {}).routes[0]
    assert not p.needs_cookies


def test_compile_force_rules():
    force = (
        ForceRule("header", "x-canary", "always", None, "canary"),
        ForceRule("header", "x-canary", "never", None, "stable"),
        ForceRule("cookie", "v", None, r"g.*", "green"),
    )
    rc = route_config(force=force)
    p = compile_policy(config(rc), {"shop": state(100, 0)}).routes[0]
    f = p.force
    assert [(x.kind, x.name, x.version, x.reason) for x in f] == [
        ("header", "x-canary", "green", "force_header"),
        ("header", "x-canary", "blue", "force_header"),
        ("cookie", "v", "green", "force_cookie"),
    ]
    assert f[0].pattern is None and f[0].value == "always"
    assert isinstance(f[2].pattern, re.Pattern) and f[2].pattern.pattern == "g.*"
    # roles are re-resolved when the stable version changes
    p = compile_policy(config(rc), {"shop": state(0, 100, stable="green")}).routes[0]
    assert [x.version for x in p.force] == ["blue", "green", "green"]
    # a single-version route sends `to: canary` to stable
    single = route_config(versions=("blue",), weights=(100,), force=force[:2])
    p = compile_policy(config(single), {}).routes[0]
    assert [x.version for x in p.force] == ["blue", "blue"]


# --- PolicyStore.replace ---------------------------------------------------------------------


def test_replace_bumps_revision_and_swaps_the_snapshot():
    store = PolicyStore(config())
    before = store.policy
    assert store.state("shop").revision == 1
    new = store.replace("shop", state(50, 50, revision=999))
    assert new.revision == 2  # the store owns revisions; the caller's is ignored
    assert store.state("shop") == new
    assert store.policy is not before
    assert store.policy.generation == before.generation + 1
    assert store.policy.by_name["shop"].canary_weight == 50
    assert before.by_name["shop"].canary_weight == 10  # an old snapshot never changes
    assert store.replace("shop", state(40, 60), expected_revision=2).revision == 3


def test_replace_with_stale_revision_is_refused():
    store = PolicyStore(config())
    store.replace("shop", state(50, 50))
    policy = store.policy
    with pytest.raises(PolicyError) as err:
        store.replace("shop", state(0, 100), expected_revision=1)
    assert (err.value.code, err.value.status) == ("stale_revision", 409)
    assert store.state("shop").weight("green") == 50
    assert store.policy is policy


def test_replace_orders_weights_like_the_config():
    store = PolicyStore(config())
    new = store.replace("shop", RouteState(weights=(("green", 20), ("blue", 80)), stable="blue"))
    assert new.weights == (("blue", 80), ("green", 20))


BAD_STATES = [
    (state(90, 20), "weights"),
    (state(101, -1), "weights.blue"),
    (state(100, -0), None),  # valid: control case
    (RouteState(weights=(("blue", 100),), stable="blue"), "weights.green"),
    (RouteState(weights=(("blue", 50), ("green", 50), ("red", 0)), stable="blue"), "weights.red"),
    (RouteState(weights=(("blue", 50), ("blue", 50)), stable="blue"), "weights.blue"),
    (RouteState(weights=(("blue", 50.0), ("green", 50)), stable="blue"), "weights.blue"),  # type: ignore[arg-type]
    (RouteState(weights=(("blue", True), ("green", 99)), stable="blue"), "weights.blue"),
    (state(50, 50, stable="red"), "stable"),
    (state(50, 50, standby="red"), "standby"),
    (state(50, 50, rollout=RolloutStatus(phase="progressing", canary="red")), "rollout.canary"),
    (state(50, 50, rollout=RolloutStatus(phase="progressing", canary="blue")), "rollout.canary"),
    (state(50, 50, rollout=RolloutStatus(phase="bogus")), "rollout.state"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("bad", "field"), BAD_STATES)
def test_replace_validates(bad, field):
    store = PolicyStore(config())
    policy = store.policy
    if field is None:
        store.replace("shop", bad)
        return
    with pytest.raises(PolicyError) as err:
        store.replace("shop", bad)
    assert (err.value.code, err.value.status, err.value.field) == ("invalid", 422, field)
    assert field in err.value.message
    assert store.policy is policy
    assert store.state("shop").revision == 1


@given(st.integers(-300, 300), st.integers(-300, 300))
def test_replace_accepts_exactly_the_valid_weights(blue, green):
    store = PolicyStore(config())
    valid = 0 <= blue <= 100 and 0 <= green <= 100 and blue + green == 100
    try:
        store.replace("shop", state(blue, green))
    except PolicyError as exc:
        assert not valid
        assert exc.field in ("weights", "weights.blue", "weights.green")
    else:
        assert valid
        assert store.policy.by_name["shop"].threshold == green * 100


def test_replace_unknown_route():
    store = PolicyStore(config())
    with pytest.raises(PolicyError) as err:
        store.replace("nope", state(50, 50))
    assert (err.value.code, err.value.status) == ("not_found", 404)
    with pytest.raises(KeyError):
        store.state("nope")


# --- set_weights ----------------------------------------------------------------------------


def test_set_weights():
    store = PolicyStore(config())
    s = store.set_weights("shop", {"green": 30, "blue": 70})
    assert s.weights == (("blue", 70), ("green", 30))
    assert s.revision == 2
    assert store.policy.by_name["shop"].threshold == 3000
    with pytest.raises(PolicyError) as err:
        store.set_weights("shop", {"blue": 0, "green": 100}, expected_revision=1)
    assert err.value.status == 409


@pytest.mark.parametrize(
    ("weights", "field"),
    [
        ({"blue": 100}, "weights.green"),
        ({"blue": 50, "green": 50, "red": 0}, "weights.red"),
        ({"blue": 50.0, "green": 50}, "weights.blue"),
        ({"blue": "50", "green": 50}, "weights.blue"),
        ({"blue": False, "green": 100}, "weights.blue"),
        ({"blue": 120, "green": -20}, "weights.blue"),
        ({"blue": 50, "green": 60}, "weights"),
        ({}, "weights.blue"),
    ],
)
def test_set_weights_validates(weights, field):
    store = PolicyStore(config())
    with pytest.raises(PolicyError) as err:
        store.set_weights("shop", weights)
    assert (err.value.code, err.value.status, err.value.field) == ("invalid", 422, field)
    assert store.state("shop").revision == 1


# --- listeners ----------------------------------------------------------------------------


def test_listeners_get_every_new_snapshot(caplog):
    store = PolicyStore(config())
    seen: list = []
    store.subscribe(seen.append)

    def broken(policy):
        raise RuntimeError("listener bug")

    store.subscribe(broken)
    late: list = []
    store.subscribe(late.append)
    with caplog.at_level(logging.ERROR, logger="proxy.state"):
        store.set_weights("shop", {"blue": 0, "green": 100})
    assert seen == [store.policy] and late == [store.policy]
    assert "listener" in caplog.text
    store.reconfigure(config(route_config(weights=(50, 50))))
    assert seen[-1] is store.policy
    assert [p.generation for p in seen] == [1, 2]
    with pytest.raises(PolicyError):
        store.set_weights("shop", {"blue": 1})
    assert len(seen) == 2  # a refused change publishes nothing


# --- construction and reconfigure ---------------------------------------------------------


def test_init_keeps_fitting_states_and_resets_the_rest():
    cfg = config(route_config("a"), route_config("b"), route_config("c"))
    given_states = {
        "a": state(20, 80, revision=5),
        "b": RouteState(weights=(("blue", 50), ("red", 50)), stable="blue", revision=9),
        "c": state(20, 90, revision=3),  # fits by name but invalid
        "gone": state(50, 50),
    }
    store = PolicyStore(cfg, given_states)
    assert store.state("a") == given_states["a"]
    assert store.state("b") == dataclasses.replace(initial_state(cfg.routes[1]), revision=10)
    assert store.state("c").weights == cfg.routes[2].weights
    assert store.state("c").revision == 4
    assert set(store.states()) == {"a", "b", "c"}


def test_reconfigure_keeps_changes_and_removes_routes():
    store = PolicyStore(config(route_config("a"), route_config("b"), route_config("c")))
    store.set_weights("a", {"blue": 40, "green": 60})  # a: revision 2
    store.set_weights("b", {"blue": 40, "green": 60})  # b: revision 2
    new_cfg = config(
        route_config("a"),  # unchanged: keeps state and revision
        route_config("b", prefix="/b"),  # changed config, same versions: keeps state, new revision
        route_config("c", versions=("blue", "red"), weights=(100, 0)),  # versions changed
        route_config("d"),  # new
    )
    store.reconfigure(new_cfg)
    s = store.states()
    assert set(s) == {"a", "b", "c", "d"}
    assert (s["a"].weight("green"), s["a"].revision) == (60, 2)
    assert (s["b"].weight("green"), s["b"].revision) == (60, 3)
    assert s["c"].weights == (("blue", 100), ("red", 0))
    assert s["c"].revision == 2
    assert s["d"] == initial_state(new_cfg.routes[3])
    assert store.config is new_cfg
    assert store.policy.config is new_cfg
    assert store.policy.by_name["b"].path_prefix == "/b"

    store.reconfigure(config(route_config("a")))
    assert set(store.states()) == {"a"}
    assert [r.name for r in store.policy.routes] == ["a"]
    with pytest.raises(PolicyError):
        store.set_weights("b", {"blue": 100, "green": 0})


def test_reconfigure_resets_a_route_whose_stable_disappeared():
    store = PolicyStore(config(route_config("a")))
    store.replace("a", state(0, 100, stable="green"))
    store.reconfigure(config(route_config("a", versions=("blue", "green2"), weights=(100, 0))))
    assert store.state("a").stable == "blue"
    assert store.state("a").revision == 3


# --- json helpers (kept from the original module) ------------------------------------------


def test_rollout_json_round_trip():
    r = RolloutStatus(
        phase="paused",
        canary="green",
        steps=(WeightStep(5), PauseStep(None), PauseStep(60.0), WeightStep(100)),
        step=2,
        step_started=12.5,
        failures=1,
        inconclusive=3,
        last_verdict={"verdict": "pass"},
    )
    assert rollout_from_json(rollout_to_json(r)) == r
    assert rollout_from_json({}) == RolloutStatus()
    with pytest.raises(ValueError):
        rollout_from_json({"state": "exploded"})
