"""Mirror steps of a rollout: the one parsing rule (config, API, CLI), the pure judgement
(analysis.mirror_verdict) and decide() on them, and the state round-trip of their running
totals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from proxy.core.analysis import mirror_verdict
from proxy.core.config.describe import describe
from proxy.core.config.load import parse_config
from proxy.core.config.model import ConfigError, MirrorStep, PauseStep, WeightStep
from proxy.core.config.rollout import parse_steps, steps_from_json, steps_to_json
from proxy.core.rollout import decide, start
from proxy.core.state import RolloutStatus, RouteState, rollout_from_json, rollout_to_json
from tests.helpers import ROOT

SCHEMA = ROOT / "proxy" / "core" / "config" / "schema.json"
MIRROR = {"mirror": "10m", "percent": 20, "max_mismatch_ratio": 0.01, "min_samples": 200}


def config(steps: list[object], **rollout: object) -> dict[str, object]:
    return {
        "listen": "127.0.0.1:0",
        "routes": [
            {
                "name": "shop",
                "versions": {
                    "blue": {"endpoints": ["http://127.0.0.1:9001"]},
                    "green": {"endpoints": ["http://127.0.0.1:9002"]},
                },
                "stable": "blue",
                "weights": {"blue": 100, "green": 0},
                "rollout": {"steps": steps, "interval": "1s", **rollout},
            }
        ],
    }


def refusal(steps: list[object]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_steps(steps, "steps")
    return info.value


# ---- parse_steps -----------------------------------------------------------------------------


def test_parse_mirror_step_with_every_key():
    steps = parse_steps([MIRROR, {"pause": True}, 5, 50], "steps")
    assert steps == (
        MirrorStep(600.0, 20.0, 0.01, 200),
        PauseStep(None),
        WeightStep(5),
        WeightStep(50),
    )


def test_parse_mirror_step_defaults():
    assert parse_steps([{"mirror": 30}], "steps") == (MirrorStep(30.0, 10.0, 0.01, 200),)


def test_two_mirror_steps_and_a_pause_before_the_weights():
    steps = parse_steps(
        [{"mirror": "1m"}, {"pause": "30s"}, {"mirror": "2m", "percent": 50}, 100], "s"
    )
    assert [type(s).__name__ for s in steps] == [
        "MirrorStep",
        "PauseStep",
        "MirrorStep",
        "WeightStep",
    ]


def test_mirror_step_after_a_weight_step_is_refused_naming_the_key():
    err = refusal([5, {"mirror": "10m"}])
    assert err.path == "steps[1].mirror"
    assert str(err) == (
        "steps[1].mirror: mirror steps must come before the first weight step "
        "(an earlier step already sends 5% of users to the canary)"
    )


@pytest.mark.parametrize(
    ("entry", "path", "fragment"),
    [
        ({"mirror": 0}, "steps[0].mirror", "must be a duration > 0, got 0"),
        ({"mirror": "soon"}, "steps[0].mirror", "soon"),
        ({"mirror": "1m", "percent": 0}, "steps[0].percent", "must be 0.01..100 in steps of 0.01"),
        ({"mirror": "1m", "percent": 101}, "steps[0].percent", "0.01..100"),
        ({"mirror": "1m", "percent": 1.234}, "steps[0].percent", "steps of 0.01"),
        ({"mirror": "1m", "max_mismatch_ratio": 2}, "steps[0].max_mismatch_ratio", "0..1"),
        ({"mirror": "1m", "min_samples": 0}, "steps[0].min_samples", ">= 1"),
        ({"mirror": "1m", "weight": 5}, "steps[0].weight", "unknown key; allowed: mirror, percent"),
    ],
)
def test_mirror_step_refusals(entry, path, fragment):
    err = refusal([entry])
    assert err.path == path
    assert fragment in str(err)


def test_config_file_uses_the_same_rule_with_the_dotted_key():
    with pytest.raises(ConfigError) as info:
        parse_config(config([10, MIRROR]))
    assert info.value.path == "routes[0].rollout.steps[1].mirror"
    assert "must come before the first weight step" in str(info.value)


def test_schema_accepts_mirror_steps_and_refuses_bad_ones():
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    assert validator.is_valid(config([MIRROR, 5, 100]))
    assert not validator.is_valid(config([{"mirror": "1m", "weight": 5}]))
    assert not validator.is_valid(config([{"mirror": "1m", "percent": 0}]))
    # Order across items is the loader's alone (like increasing weights).
    assert validator.is_valid(config([5, MIRROR]))


def test_describe_shows_mirror_steps():
    text = describe(parse_config(config([MIRROR, 5, 100])))
    assert "steps mirror 20% for 10m (max mismatch 0.01, min 200 samples), 5%, 100%" in text


def test_steps_json_round_trip_and_refusal_of_a_broken_stored_mirror_step():
    steps = parse_steps([MIRROR, {"pause": 30}, 5], "steps")
    assert steps_to_json(steps) == [
        {"mirror": 600.0, "percent": 20.0, "max_mismatch_ratio": 0.01, "min_samples": 200},
        {"pause": 30.0},
        5,
    ]
    assert steps_from_json(steps_to_json(steps)) == steps
    with pytest.raises(ValueError, match=r"steps\.percent"):
        steps_from_json([{"mirror": 60, "percent": -1}])


def test_rollout_status_round_trips_the_running_totals():
    ro = RolloutStatus(
        phase="progressing",
        canary="green",
        steps=parse_steps([MIRROR, 50], "steps"),
        step=0,
        step_started=12.5,
        mirror_samples=321,
        mirror_mismatches=4,
    )
    raw = rollout_to_json(ro)
    assert raw["mirror_samples"] == 321
    assert raw["mirror_mismatches"] == 4
    assert rollout_from_json(json.loads(json.dumps(raw))) == ro
    # A state stored before mirror steps existed still loads.
    old = {k: v for k, v in raw.items() if not k.startswith("mirror_")}
    assert rollout_from_json(old) == replace(ro, mirror_samples=0, mirror_mismatches=0)


# ---- the judgement ---------------------------------------------------------------------------

STEP = MirrorStep(600.0, 20.0, 0.01, 200)


def test_verdict_holds_below_min_samples_even_when_everything_differs():
    j = mirror_verdict(199, 199, 10.0, STEP, 0.99)
    assert j.verdict == "need_more_samples"
    assert j.figures["mismatch_lower_bound"] is None
    assert j.figures["mirror_remaining"] == 590.0


def test_verdict_fails_before_the_duration_when_the_lower_bound_is_above_the_limit():
    j = mirror_verdict(200, 10, 60.0, STEP, 0.99)
    assert j.verdict == "fail"
    assert j.figures["mismatch_ratio"] == 0.05
    assert j.figures["mismatch_lower_bound"] == pytest.approx(0.02449, abs=1e-4)
    assert j.reasons == (
        "10 of 200 shadow answers differed (5.00%), above the 1.00% limit (lower bound 2.45%)",
    )


def test_verdict_does_not_fail_on_a_ratio_above_the_limit_that_noise_explains():
    # 3 of 200 = 1.5 % observed, but the lower bound (0.4 %) is under 1 %.
    j = mirror_verdict(200, 3, 600.0, STEP, 0.99)
    assert j.verdict == "pass"
    assert j.figures["mismatch_lower_bound"] < 0.01


def test_verdict_passes_only_once_the_duration_is_over():
    assert mirror_verdict(5000, 0, 599.0, STEP, 0.99).verdict == "need_more_samples"
    assert mirror_verdict(5000, 0, 600.0, STEP, 0.99).verdict == "pass"
    assert mirror_verdict(5000, 0, 600.0, STEP, 0.99).figures["mirror_remaining"] == 0.0


def test_verdict_refuses_impossible_counts():
    with pytest.raises(ValueError):
        mirror_verdict(3, 4, 0.0, STEP, 0.99)


# ---- decide ----------------------------------------------------------------------------------


def rollout(steps: list[object], **policy: object):
    route = parse_config(config(steps, **policy)).routes[0]
    state = start(route, RouteState(route.weights, "blue"), "green", None, now=100.0)
    return route, state


def test_entering_a_mirror_step_keeps_the_canary_dark():
    _route, state = rollout([MIRROR, 10, 100])
    assert state.rollout.step == 0
    assert dict(state.weights) == {"blue": 100, "green": 0}
    assert (state.rollout.mirror_samples, state.rollout.mirror_mismatches) == (0, 0)


def test_running_mirror_step_holds_and_keeps_the_totals():
    route, state = rollout([MIRROR, 10, 100])
    d = decide(route, state, mirror_verdict(120, 1, 30.0, STEP, 0.99), now=130.0)
    assert d.action == "hold"
    assert d.message == "mirror step runs 570s more (1 of 120 shadow answers differed so far)"
    assert (d.state.rollout.mirror_samples, d.state.rollout.mirror_mismatches) == (120, 1)
    assert d.state.rollout.inconclusive == 0
    assert dict(d.state.weights)["green"] == 0
    # Deciding again on the same judgement (a gate's answer) counts nothing twice.
    again = decide(route, d.state, mirror_verdict(120, 1, 30.0, STEP, 0.99), now=131.0)
    assert again.state.rollout.mirror_samples == 120


def test_passed_mirror_step_advances_to_the_first_weight_step_with_fresh_totals():
    route, state = rollout([MIRROR, 10, 100])
    d = decide(route, state, mirror_verdict(900, 2, 600.0, STEP, 0.99), now=700.0)
    assert d.action == "advance"
    assert (
        d.message
        == "canary green passed the mirror step (2 of 900 shadow answers differed), step 1"
    )
    assert d.state.rollout.step == 1
    assert dict(d.state.weights) == {"blue": 90, "green": 10}
    assert d.state.rollout.mirror_samples == 0
    assert d.state.rollout.last_verdict["figures"]["mirror_samples"] == 900


def test_failed_mirror_step_rolls_back_and_says_no_user_saw_the_canary():
    route, state = rollout([MIRROR, 10, 100], failure_limit=1)
    d = decide(route, state, mirror_verdict(200, 10, 60.0, STEP, 0.99), now=160.0)
    assert d.action == "rollback"
    assert d.state.rollout.phase == "rolled_back"
    assert dict(d.state.weights) == {"blue": 100, "green": 0}
    assert d.message == (
        "canary green failed the mirror step, rolled back (no user request was served by "
        "green): 10 of 200 shadow answers differed (5.00%), above the 1.00% limit "
        "(lower bound 2.45%)"
    )
    assert d.figures["mismatch_lower_bound"] == pytest.approx(0.02449, abs=1e-4)


def test_failure_limit_counts_consecutive_failing_ticks_and_on_failure_pause():
    route, state = rollout([MIRROR, 100], failure_limit=2, on_failure="pause")
    first = decide(route, state, mirror_verdict(200, 10, 60.0, STEP, 0.99), now=160.0)
    assert first.action == "fail"
    assert first.state.rollout.failures == 1
    assert first.message.startswith("canary green failed the mirror step (1/2): 10 of 200")
    # A tick under the limit in between clears the count (consecutive, as on weight steps).
    ok = decide(route, first.state, mirror_verdict(2000, 10, 90.0, STEP, 0.99), now=190.0)
    assert (ok.action, ok.state.rollout.failures) == ("hold", 0)
    again = decide(route, ok.state, mirror_verdict(2200, 60, 120.0, STEP, 0.99), now=220.0)
    assert again.action == "fail"
    final = decide(route, again.state, mirror_verdict(2400, 90, 150.0, STEP, 0.99), now=250.0)
    assert final.action == "pause"
    assert final.state.rollout.phase == "paused"
    assert "rollout paused (no user request was served by green)" in final.message


def test_too_few_samples_after_the_duration_is_inconclusive_then_pauses():
    route, state = rollout([MIRROR, 100], max_inconclusive=2)
    d = decide(route, state, mirror_verdict(50, 0, 600.0, STEP, 0.99), now=700.0)
    assert d.action == "hold"
    assert d.state.rollout.inconclusive == 1
    assert d.message == "too few shadow answers (50 of 200) (1/2), holding the mirror step"
    d2 = decide(route, d.state, mirror_verdict(60, 0, 630.0, STEP, 0.99), now=730.0)
    assert d2.action == "pause"
    assert d2.message == (
        "too few shadow answers (60 of 200) for 2 windows, rollout paused "
        "(no user request was served by green)"
    )


def test_unread_window_on_a_mirror_step_is_inconclusive_and_keeps_the_totals():
    route, state = rollout([MIRROR, 100])
    state = replace(state, rollout=replace(state.rollout, mirror_samples=40, mirror_mismatches=1))
    d = decide(route, state, None, now=130.0)
    assert d.action == "hold"
    assert d.state.rollout.inconclusive == 1
    assert d.state.rollout.mirror_samples == 40
    assert d.message.startswith("mirror window not read (1/")


def test_resume_restarts_a_mirror_step_from_zero():
    from proxy.core.rollout import pause, resume

    _route, state = rollout([MIRROR, 100])
    state = replace(state, rollout=replace(state.rollout, mirror_samples=40, mirror_mismatches=1))
    resumed = resume(pause(state), now=500.0)
    assert resumed.rollout.step_started == 500.0
    assert (resumed.rollout.mirror_samples, resumed.rollout.mirror_mismatches) == (0, 0)


# ---- the stores: a mirror step and its totals survive a restart -------------------------------


def mirror_state() -> RouteState:
    _route, state = rollout([MIRROR, 10, 100])
    ro = replace(state.rollout, mirror_samples=321, mirror_mismatches=4)
    return replace(state, rollout=ro, revision=7)


def test_file_store_round_trip(tmp_path):
    from proxy.control.store.file import FileStateStore

    store = FileStateStore(tmp_path / "state.json")
    state = mirror_state()
    store.save({"shop": state}, [])
    loaded = FileStateStore(tmp_path / "state.json").load()
    assert loaded is not None
    assert loaded[0]["shop"] == state
    assert loaded[0]["shop"].rollout.steps[0] == MirrorStep(600.0, 20.0, 0.01, 200)


async def test_redis_store_round_trip(redis_server):
    from proxy.control.store.redis import RedisStateStore

    store = RedisStateStore(redis_server.url, "gg-mirror-test")
    assert await store.open() is None
    try:
        state = mirror_state()
        assert await store.save({"shop": state}, []) == []
        assert (await store.load_routes(["shop"]))["shop"] == state
    finally:
        await store.close()


# ---- the controller: windows of a real Mirrors, accumulated over the step ---------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def controller_setup(steps: list[object]):
    from proxy.control.controller import Controller
    from proxy.control.source import LocalSource
    from proxy.control.store.events import EventLog
    from proxy.control.store.writer import LocalWriter
    from proxy.core.mirror import Mirrors
    from proxy.core.state import PolicyStore
    from proxy.core.stats import Stats

    cfg = parse_config(config(steps, failure_limit=1))
    store = PolicyStore(cfg)
    clock = Clock(1000.0)
    store.replace("shop", start(cfg.routes[0], store.state("shop"), "green", None, 1000.0))
    mirrors = Mirrors.from_config(cfg)
    stats = Stats.from_config(cfg)
    events = EventLog(clock=clock)
    source = LocalSource(stats, mirrors)
    controller = Controller(
        store, lambda r: source, LocalWriter(store), events, lambda: None, stats,
        clock=clock, mirrors=mirrors,
    )  # fmt: skip
    return controller, store, events, clock, mirrors, stats


def shadows(mirrors, n: int, differing: int, at: float) -> None:
    from proxy.core.mirror import JsonDiff, Mismatch

    ms = mirrors.get("shop", "green")
    for i in range(n):
        if i < differing:
            m = Mismatch(
                at + i / 1000, "shop", "green", "GET", f"/p/{i}", "body_mismatch",
                (200, 200), (), (JsonDiff("$.price", "10", "11"),), ("a", "b"),
            )  # fmt: skip
            ms.record("body_mismatch", 0.01, m)
        else:
            ms.record("match", 0.01, None)


async def test_controller_accumulates_the_step_and_advances_after_its_duration():
    step = {"mirror": "3s", "percent": 50, "max_mismatch_ratio": 0.05, "min_samples": 100}
    controller, store, events, clock, mirrors, stats = controller_setup([step, 50, 100])
    shadows(mirrors, 500, 0, 999.0)  # before the step's window opened: not counted
    await controller.step_all()  # opens the window
    for t in (1001.0, 1002.0):
        shadows(mirrors, 60, 1, t - 0.5)
        clock.now = t
        await controller.step_all()
    assert [e.action for e in events.since(0)] == ["rollout.hold", "rollout.hold"]
    ro = store.state("shop").rollout
    assert (ro.step, ro.mirror_samples, ro.mirror_mismatches) == (0, 120, 2)
    assert dict(store.state("shop").weights)["green"] == 0
    assert stats.verdicts() == [] or all(not sum(c.values()) for _, c in stats.verdicts())
    shadows(mirrors, 30, 0, 1002.5)
    clock.now = 1003.0
    await controller.step_all()
    last = events.since(0)[-1]
    assert last.action == "rollout.advance"
    assert last.figures is not None
    assert last.figures["mirror_samples"] == 150 and last.figures["mirror_mismatches"] == 2
    assert [m["path"] for m in last.figures["mismatches"]] == ["/p/0", "/p/0"]
    assert dict(store.state("shop").weights) == {"blue": 50, "green": 50}
    assert dict(stats.verdicts())["shop"]["pass"] == 1


async def test_controller_fails_the_step_early_with_the_evidence():
    step = {"mirror": "10m", "percent": 50, "max_mismatch_ratio": 0.01, "min_samples": 100}
    controller, store, events, clock, mirrors, stats = controller_setup([step, 100])
    await controller.step_all()
    shadows(mirrors, 200, 20, 1000.5)
    clock.now = 1001.0
    await controller.step_all()
    (event,) = events.since(0)
    assert event.action == "rollout.rollback"
    assert event.reason is not None
    assert "no user request was served by green" in event.reason
    assert event.figures is not None
    assert len(event.figures["mismatches"]) == 5
    assert event.figures["mismatches"][-1]["path"] == "/p/19"
    state = store.state("shop")
    assert state.rollout.phase == "rolled_back"
    assert state.rollout.last_verdict is not None
    assert state.rollout.last_verdict["mismatches"] == event.figures["mismatches"]
    assert dict(stats.verdicts())["shop"]["fail"] == 1


def test_a_refusing_gate_holds_a_passed_mirror_step_with_the_totals_it_judged():
    from proxy.core.rollout import hold_at_gate

    route, state = rollout([MIRROR, 10, 100])
    judged = mirror_verdict(900, 2, 600.0, STEP, 0.99)
    held = hold_at_gate(state, "confirm_step", 503, None, judged, now=700.0)
    assert held.action == "gate_hold"
    assert held.state.rollout.step == 0
    assert (held.state.rollout.mirror_samples, held.state.rollout.mirror_mismatches) == (900, 2)
    assert dict(held.state.weights)["green"] == 0
    # The next window adds to those totals and passes again: the gate is asked again.
    again = decide(route, held.state, mirror_verdict(960, 2, 630.0, STEP, 0.99), now=730.0)
    assert again.action == "advance"
