"""Rollout decisions and manual gates, driven with plain values: no loop, no store."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.core.analysis import Judgement, Sample, verdict
from proxy.core.config.model import (
    AnalysisConfig,
    Match,
    PauseStep,
    RolloutConfig,
    RouteConfig,
    Step,
    VersionConfig,
    WeightStep,
)
from proxy.core.rollout import Decision, abort, decide, pause, promote, resume, rollback, start
from proxy.core.state import PolicyError, RouteState

PASS = Judgement("pass", (), {"canary_requests": 500})
FAIL = Judgement("fail", ("canary error rate 9% is above the 1% ceiling",), {"canary_errors": 45})
MORE = Judgement("need_more_samples", (), {"canary_requests": 3})


def make_route(
    steps: tuple[Step, ...] = (WeightStep(10), WeightStep(50)),
    failure_limit: int = 2,
    on_failure: str = "rollback",
    max_inconclusive: int = 3,
) -> RouteConfig:
    return RouteConfig(
        name="shop",
        match=Match(),
        versions=(VersionConfig("blue", ()), VersionConfig("green", ())),
        stable="blue",
        weights=(("blue", 100), ("green", 0)),
        rollout=RolloutConfig(
            steps=steps,
            interval=30.0,
            failure_limit=failure_limit,
            on_failure=on_failure,  # type: ignore[arg-type]
            max_inconclusive=max_inconclusive,
        ),
    )


def idle(route: RouteConfig) -> RouteState:
    return RouteState(weights=route.weights, stable=route.stable, revision=7)


def started(route: RouteConfig, now: float = 100.0) -> RouteState:
    return start(route, idle(route), "green", None, now)


def weights(state: RouteState) -> dict[str, int]:
    return dict(state.weights)


def assert_unchanged_revision(d: Decision) -> None:
    assert d.state.revision == 7  # bumping is the store's job


# --- start --------------------------------------------------------------------------------


def test_start_sets_first_weight_and_progressing() -> None:
    route = make_route()
    s = started(route)
    assert s.rollout.phase == "progressing"
    assert s.rollout.canary == "green"
    assert s.rollout.step == 0 and s.rollout.step_started == 100.0
    assert s.rollout.steps == route.rollout.steps
    assert weights(s) == {"blue": 90, "green": 10}
    assert s.revision == 7


def test_start_with_own_steps_and_opening_pause_starts_dark() -> None:
    route = make_route()
    steps = (PauseStep(None), WeightStep(30))
    s = start(route, idle(route), "green", steps, 5.0)
    assert s.rollout.steps == steps and s.rollout.step == 0
    assert weights(s) == {"blue": 100, "green": 0}


def test_start_refuses_while_running_and_bad_canaries() -> None:
    route = make_route()
    s = started(route)
    for running in (s, pause(s)):
        with pytest.raises(PolicyError) as e:
            start(route, running, "green", None, 1.0)
        assert (e.value.code, e.value.status) == ("conflict", 409)
    with pytest.raises(PolicyError) as e:
        start(route, idle(route), "blue", None, 1.0)
    assert (e.value.code, e.value.status, e.value.field) == ("conflict", 409, "canary")
    with pytest.raises(PolicyError) as e:
        start(route, idle(route), "purple", None, 1.0)
    assert e.value.status == 422 and e.value.field == "canary"
    with pytest.raises(PolicyError):
        start(route, idle(route), "green", (), 1.0)


def test_start_again_after_promotion_and_after_rollback() -> None:
    route = make_route()
    promoted = promote(started(route), 200.0)
    again = start(route, promoted, "blue", None, 300.0)
    assert again.rollout.phase == "progressing" and again.standby is None
    assert weights(again) == {"blue": 10, "green": 90}
    rolled = abort(started(route))
    assert start(route, rolled, "green", None, 300.0).rollout.phase == "progressing"


# --- decide: weight steps -----------------------------------------------------------------


def test_decide_does_nothing_unless_progressing() -> None:
    route = make_route()
    for s in (idle(route), pause(started(route)), abort(started(route))):
        d = decide(route, s, FAIL, 1000.0)
        assert d.action == "none" and d.state is s


def test_pass_advances_then_promotes_after_last_step() -> None:
    route = make_route()
    s = started(route)
    d = decide(route, s, PASS, 130.0)
    assert d.action == "advance"
    assert weights(d.state) == {"blue": 50, "green": 50}
    assert d.state.rollout.step == 1 and d.state.rollout.step_started == 130.0
    assert_unchanged_revision(d)

    d = decide(route, d.state, PASS, 160.0)
    assert d.action == "promote"
    st = d.state
    assert st.rollout.phase == "promoted"
    assert st.stable == "green" and st.standby == "blue"
    assert weights(st) == {"blue": 0, "green": 100}
    assert st.rollout.last_verdict is not None
    assert st.rollout.last_verdict["action"] == "promote"
    assert st.rollout.last_verdict["verdict"] == "pass"


def test_pass_clears_failure_and_inconclusive_counts() -> None:
    route = make_route(failure_limit=3)
    s = decide(route, started(route), FAIL, 130.0).state
    s = decide(route, s, MORE, 160.0).state
    assert (s.rollout.failures, s.rollout.inconclusive) == (1, 1)
    s = decide(route, s, PASS, 190.0).state
    assert (s.rollout.failures, s.rollout.inconclusive) == (0, 0)


def test_failures_below_limit_hold_then_rollback() -> None:
    route = make_route(failure_limit=2, on_failure="rollback")
    s = started(route)
    d = decide(route, s, FAIL, 130.0)
    assert d.action == "fail"
    assert d.state.rollout.failures == 1
    assert weights(d.state) == {"blue": 90, "green": 10}
    assert d.state.rollout.phase == "progressing"
    assert "ceiling" in d.message
    assert d.figures["canary_errors"] == 45

    d = decide(route, d.state, FAIL, 160.0)
    assert d.action == "rollback"
    assert d.state.rollout.phase == "rolled_back"
    assert weights(d.state) == {"blue": 100, "green": 0}
    assert d.state.stable == "blue"
    assert d.state.rollout.last_verdict is not None
    assert d.state.rollout.last_verdict["reasons"] == list(FAIL.reasons)
    assert d.state.rollout.last_verdict["figures"] == FAIL.figures


def test_failure_limit_with_on_failure_pause() -> None:
    route = make_route(failure_limit=1, on_failure="pause")
    d = decide(route, started(route), FAIL, 130.0)
    assert d.action == "pause"
    assert d.state.rollout.phase == "paused"
    assert weights(d.state) == {"blue": 90, "green": 10}  # kept as is for the operator


def test_failures_must_be_consecutive_passes_reset() -> None:
    route = make_route(steps=(WeightStep(10), WeightStep(20), WeightStep(30)), failure_limit=2)
    s = started(route)
    s = decide(route, s, FAIL, 1.0).state
    s = decide(route, s, PASS, 2.0).state
    d = decide(route, s, FAIL, 3.0)
    assert d.action == "fail" and d.state.rollout.phase == "progressing"


def test_need_more_samples_holds_then_pauses_after_max_inconclusive() -> None:
    route = make_route(max_inconclusive=3)
    s = started(route)
    for i in (1, 2):
        d = decide(route, s, MORE, 100.0 + 30 * i)
        assert d.action == "hold"
        assert d.state.rollout.inconclusive == i
        assert weights(d.state) == {"blue": 90, "green": 10}
        s = d.state
    d = decide(route, s, MORE, 190.0)
    assert d.action == "pause"
    assert d.state.rollout.phase == "paused"
    assert d.state.rollout.last_verdict is not None
    assert d.state.rollout.last_verdict["verdict"] == "need_more_samples"


def test_missing_window_counts_as_inconclusive_not_failure() -> None:
    route = make_route(max_inconclusive=2)
    d = decide(route, started(route), None, 130.0)
    assert d.action == "hold" and d.state.rollout.inconclusive == 1
    assert d.state.rollout.failures == 0
    assert decide(route, d.state, None, 160.0).action == "pause"


def test_decide_with_a_real_judgement() -> None:
    route = make_route()
    cfg = AnalysisConfig(min_samples=200, max_p99_latency=None, max_latency_ratio=None)
    good = verdict(Sample(1000, 1), Sample(9000, 9), cfg)
    bad = verdict(Sample(1000, 80), Sample(9000, 9), cfg)
    assert decide(route, started(route), good, 1.0).action == "advance"
    d = decide(route, started(route), bad, 1.0)
    assert d.action == "fail"
    assert d.figures["canary_errors"] == 80
    assert d.state.rollout.last_verdict is not None
    assert d.state.rollout.last_verdict["figures"] == bad.to_json()["figures"]


# --- decide: pause steps ------------------------------------------------------------------


def test_timed_pause_step_waits_then_advances_ignoring_judgement() -> None:
    route = make_route(steps=(WeightStep(10), PauseStep(60.0), WeightStep(40)))
    s = decide(route, started(route, 0.0), PASS, 30.0).state
    assert s.rollout.step == 1 and s.rollout.step_started == 30.0
    assert weights(s) == {"blue": 90, "green": 10}  # a pause keeps the weight

    d = decide(route, s, FAIL, 89.0)
    assert d.action == "hold" and d.state.rollout.failures == 0
    d = decide(route, d.state, FAIL, 90.0)
    assert d.action == "advance"
    assert d.state.rollout.step == 2
    assert weights(d.state) == {"blue": 60, "green": 40}


def test_timed_pause_as_last_step_promotes() -> None:
    route = make_route(steps=(WeightStep(50), PauseStep(10.0)))
    s = decide(route, started(route, 0.0), PASS, 1.0).state
    d = decide(route, s, None, 11.0)
    assert d.action == "promote" and d.state.stable == "green"


def test_manual_pause_step_holds_forever_until_resume() -> None:
    route = make_route(steps=(WeightStep(10), PauseStep(None), WeightStep(40)))
    s = decide(route, started(route, 0.0), PASS, 30.0).state
    for now in (60.0, 1e6, 1e9):
        d = decide(route, s, PASS, now)
        assert d.action == "hold" and d.state.rollout.step == 1
        s = d.state
    s = resume(s, 2e9)
    assert s.rollout.phase == "progressing" and s.rollout.step == 2
    assert weights(s) == {"blue": 60, "green": 40}


def test_manual_pause_step_released_by_promote() -> None:
    route = make_route(steps=(WeightStep(10), PauseStep(None), WeightStep(40)))
    s = decide(route, started(route, 0.0), PASS, 30.0).state
    p = promote(s, 40.0)
    assert p.rollout.phase == "promoted" and p.stable == "green"


# --- manual gates -------------------------------------------------------------------------


def test_pause_and_resume() -> None:
    route = make_route()
    s = decide(route, started(route), FAIL, 130.0).state
    p = pause(s)
    assert p.rollout.phase == "paused" and weights(p) == weights(s)
    with pytest.raises(PolicyError) as e:
        pause(p)
    assert e.value.status == 409
    r = resume(p, 500.0)
    assert r.rollout.phase == "progressing"
    assert r.rollout.step == s.rollout.step and r.rollout.failures == 0
    assert r.rollout.step_started == 500.0
    with pytest.raises(PolicyError) as e:
        resume(r, 501.0)  # progressing on a weight step: nothing to resume
    assert e.value.code == "conflict"


def test_resume_after_max_inconclusive_pause_gets_fresh_count() -> None:
    route = make_route(max_inconclusive=1)
    d = decide(route, started(route), MORE, 130.0)
    assert d.state.rollout.phase == "paused"
    r = resume(d.state, 140.0)
    assert decide(route, r, MORE, 170.0).action == "pause"  # one more allowed, not zero
    assert r.rollout.inconclusive == 0


def test_promote_from_progressing_and_paused() -> None:
    route = make_route()
    for s in (started(route), pause(started(route))):
        p = promote(s, 150.0)
        assert p.rollout.phase == "promoted"
        assert p.stable == "green" and p.standby == "blue"
        assert weights(p) == {"blue": 0, "green": 100}
    for s in (idle(route), promote(started(route), 1.0), abort(started(route))):
        with pytest.raises(PolicyError) as e:
            promote(s, 1.0)
        assert (e.value.code, e.value.status) == ("conflict", 409)


def test_abort_rolls_back_canary_to_zero() -> None:
    route = make_route()
    s = decide(route, started(route), PASS, 130.0).state
    for running in (s, pause(s)):
        a = abort(running)
        assert a.rollout.phase == "rolled_back"
        assert weights(a) == {"blue": 100, "green": 0} and a.stable == "blue"
    for s2 in (idle(route), abort(s), promote(s, 1.0)):
        with pytest.raises(PolicyError) as e:
            abort(s2)
        assert e.value.status == 409


def test_rollback_after_promotion_swaps_back_at_once() -> None:
    route = make_route()
    p = promote(started(route), 150.0)
    r = rollback(p)
    assert r.stable == "blue" and r.standby is None
    assert weights(r) == {"blue": 100, "green": 0}
    assert r.rollout.phase == "rolled_back"
    for s in (idle(route), started(route), pause(started(route)), r):
        with pytest.raises(PolicyError) as e:
            rollback(s)
        assert (e.value.code, e.value.status) == ("conflict", 409)
    with pytest.raises(PolicyError):
        rollback(replace(p, standby=None))


def test_full_rollout_with_default_steps() -> None:
    route = replace(make_route(), rollout=RolloutConfig())
    s = started(route, 0.0)
    seen = [weights(s)["green"]]
    now = 0.0
    while s.rollout.phase == "progressing":
        now += 30.0
        s = decide(route, s, PASS, now).state
        seen.append(weights(s)["green"])
    assert seen == [5, 10, 25, 50, 100, 100]
    assert s.rollout.phase == "promoted" and s.stable == "green"
    assert s.revision == 7
