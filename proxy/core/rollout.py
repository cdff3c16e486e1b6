"""Rollout decisions: `decide` (pure: route state + verdict + now -> new state and the
action taken), the pure manual gates (start, pause, resume, promote, abort, rollback) and
the webhook gates' part (`gate_for`, `hold_at_gate`). The loop that applies them is
control/controller.py; revisions are the store's job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from proxy.core.analysis import Judgement
from proxy.core.config.model import GateName, MirrorStep, PauseStep, RouteConfig, Step, WeightStep
from proxy.core.state import PolicyError, RolloutStatus, RouteState

Action = Literal[
    "none", "hold", "advance", "pause", "resume", "promote", "rollback", "fail", "gate_hold"
]


@dataclass(frozen=True)
class Decision:
    state: RouteState  # the new state; revision untouched (PolicyStore.replace bumps it)
    action: Action  # "fail": a failed window below failure_limit, held at the step
    message: str
    figures: dict[str, object]


def decide(
    route: RouteConfig, state: RouteState, judgement: Judgement | None, now: float
) -> Decision:
    """One controller tick for one route.

    Acts only while the rollout is progressing. Pause steps ignore the judgement: a timed
    one advances once its time is up, a manual one (``PauseStep(None)``) holds until
    resume or promote. On a weight step: ``pass`` advances (past the last step: promote),
    ``fail`` counts towards ``failure_limit`` and then ``on_failure``,
    ``need_more_samples`` (or no judgement at all) counts towards ``max_inconclusive``
    and then pauses. Failures and inconclusive windows are consecutive counts: a pass
    clears both, a fail clears the inconclusive count, an inconclusive window leaves the
    failure count alone (lack of traffic is no evidence either way).

    >>> from proxy.core.config.model import Match, VersionConfig
    >>> route = RouteConfig("shop", Match(), (VersionConfig("blue", ()),
    ...     VersionConfig("green", ())), "blue", (("blue", 100), ("green", 0)))
    >>> s = start(route, RouteState(route.weights, "blue"), "green", None, now=0.0)
    >>> d = decide(route, s, Judgement("pass", (), {}), now=30.0)
    >>> d.action, dict(d.state.weights)
    ('advance', {'blue': 90, 'green': 10})
    """
    ro = state.rollout
    if ro.phase != "progressing" or ro.canary is None:
        return Decision(state, "none", f"rollout is {ro.phase}", {})
    steps = ro.steps or route.rollout.steps
    policy = route.rollout
    verdict = judgement.verdict if judgement is not None else None

    if ro.step < 0:
        new = _enter(state, steps, 0, now)
        return _decision(new, "advance", "rollout entered its first step", judgement, now)
    if ro.step >= len(steps):
        new = _enter(state, steps, ro.step, now)
        return _decision(new, "promote", "rollout is past its last step", judgement, now)

    step = steps[ro.step]
    if isinstance(step, PauseStep):
        if step.seconds is None:
            return _decision(
                state, "hold", f"step {ro.step} waits for a manual resume", judgement, now
            )
        waited = now - ro.step_started
        if waited < step.seconds:
            left = step.seconds - waited
            msg = f"step {ro.step} pauses for {left:.0f}s more"
            return _decision(state, "hold", msg, judgement, now)
        new = _enter(state, steps, ro.step + 1, now)
        action: Action = "promote" if new.rollout.phase == "promoted" else "advance"
        return _decision(new, action, f"pause of {step.seconds:g}s is over", judgement, now)

    if isinstance(step, MirrorStep):
        return _decide_mirror(route, state, step, judgement, now)

    if verdict == "pass":
        cleared = replace(state, rollout=replace(ro, failures=0, inconclusive=0))
        new = _enter(cleared, steps, ro.step + 1, now)
        if new.rollout.phase == "promoted":
            msg = f"canary {ro.canary} passed the last step and is promoted"
            return _decision(new, "promote", msg, judgement, now)
        msg = f"canary {ro.canary} passed at {step.weight}%, step {ro.step + 1}"
        return _decision(new, "advance", msg, judgement, now)

    if verdict == "fail":
        failures = ro.failures + 1
        counted = replace(state, rollout=replace(ro, failures=failures, inconclusive=0))
        why = "; ".join(judgement.reasons) if judgement is not None else ""
        if failures < policy.failure_limit:
            msg = f"canary {ro.canary} failed ({failures}/{policy.failure_limit}): {why}"
            return _decision(counted, "fail", msg, judgement, now)
        if policy.on_failure == "pause":
            new = replace(
                counted, rollout=replace(counted.rollout, phase="paused", paused_by_gate=None)
            )
            msg = f"canary {ro.canary} failed {failures} windows, rollout paused: {why}"
            return _decision(new, "pause", msg, judgement, now)
        new = _rolled_back(counted)
        msg = f"canary {ro.canary} failed {failures} windows, rolled back: {why}"
        return _decision(new, "rollback", msg, judgement, now)

    # need_more_samples, or no window could be read.
    inconclusive = ro.inconclusive + 1
    counted = replace(state, rollout=replace(ro, inconclusive=inconclusive))
    # A window that could not be read (metrics source down) says why in its reasons.
    reasons = "; ".join(judgement.reasons) if judgement is not None else "no window"
    what = reasons or "too few samples"
    if inconclusive >= policy.max_inconclusive:
        new = replace(
            counted, rollout=replace(counted.rollout, phase="paused", paused_by_gate=None)
        )
        msg = f"{what} for {inconclusive} windows, rollout paused"
        return _decision(new, "pause", msg, judgement, now)
    msg = f"{what} ({inconclusive}/{policy.max_inconclusive}), holding at {step.weight}%"
    return _decision(counted, "hold", msg, judgement, now)


def _decide_mirror(
    route: RouteConfig, state: RouteState, step: MirrorStep, judgement: Judgement | None, now: float
) -> Decision:
    """A mirror step (the canary at weight 0, `step.percent` of requests shadowed to it).
    `judgement` is analysis.mirror_verdict over the step's running totals, which it carries
    in its figures, so deciding twice on one judgement (a gate's answer) counts nothing
    twice. fail / pass / need_more_samples after the duration count like a weight step's
    windows; while the step runs without failing it holds, uncounted."""
    ro = state.rollout
    policy = route.rollout
    canary = ro.canary
    figures = judgement.figures if judgement is not None else {}
    samples, mismatches = figures.get("mirror_samples"), figures.get("mirror_mismatches")
    read = isinstance(samples, int) and isinstance(mismatches, int)
    if read:
        ro = replace(ro, mirror_samples=int(samples or 0), mirror_mismatches=int(mismatches or 0))
    totals = f"{ro.mirror_mismatches} of {ro.mirror_samples} shadow answers differed"
    unseen = f"no user request was served by {canary}"
    # A window that could not be read is inconclusive, as on a weight step.
    verdict = judgement.verdict if judgement is not None and read else None

    if verdict == "fail" and judgement is not None:
        failures = ro.failures + 1
        counted = replace(state, rollout=replace(ro, failures=failures, inconclusive=0))
        why = "; ".join(judgement.reasons)
        if failures < policy.failure_limit:
            msg = (
                f"canary {canary} failed the mirror step ({failures}/{policy.failure_limit}): {why}"
            )
            return _decision(counted, "fail", msg, judgement, now)
        if policy.on_failure == "pause":
            new = replace(
                counted, rollout=replace(counted.rollout, phase="paused", paused_by_gate=None)
            )
            msg = f"canary {canary} failed the mirror step, rollout paused ({unseen}): {why}"
            return _decision(new, "pause", msg, judgement, now)
        msg = f"canary {canary} failed the mirror step, rolled back ({unseen}): {why}"
        return _decision(_rolled_back(counted), "rollback", msg, judgement, now)

    if verdict == "pass":
        cleared = replace(state, rollout=replace(ro, failures=0, inconclusive=0))
        new = _enter(cleared, ro.steps or route.rollout.steps, ro.step + 1, now)
        action: Action = "promote" if new.rollout.phase == "promoted" else "advance"
        msg = f"canary {canary} passed the mirror step ({totals}), step {ro.step + 1}"
        return _decision(new, action, msg, judgement, now)

    remaining = figures.get("mirror_remaining")
    if verdict is not None and isinstance(remaining, int | float) and remaining > 0:
        held = replace(state, rollout=replace(ro, failures=0))
        msg = f"mirror step runs {remaining:.0f}s more ({totals} so far)"
        return _decision(held, "hold", msg, judgement, now)

    inconclusive = ro.inconclusive + 1
    counted = replace(state, rollout=replace(ro, inconclusive=inconclusive))
    reasons = "; ".join(judgement.reasons) if judgement is not None else ""
    if not read:
        what = f"mirror window not read ({reasons})" if reasons else "mirror window not read"
    else:
        what = reasons or f"too few shadow answers ({ro.mirror_samples} of {step.min_samples})"
    if inconclusive >= policy.max_inconclusive:
        new = replace(
            counted, rollout=replace(counted.rollout, phase="paused", paused_by_gate=None)
        )
        msg = f"{what} for {inconclusive} windows, rollout paused ({unseen})"
        return _decision(new, "pause", msg, judgement, now)
    msg = f"{what} ({inconclusive}/{policy.max_inconclusive}), holding the mirror step"
    return _decision(counted, "hold", msg, judgement, now)


def gate_for(route: RouteConfig, decision: Decision) -> GateName | None:
    """The webhook gate that must answer 2xx before `decision` is applied, if any: a step
    forward asks `confirm_step`, a promotion `confirm_promotion`. Manual calls are never
    gated (the operator is the gate)."""
    name: GateName
    if decision.action == "advance":
        name = "confirm_step"
    elif decision.action == "promote":
        name = "confirm_promotion"
    else:
        return None
    return name if route.rollout.gates.get(name) is not None else None


def hold_at_gate(
    state: RouteState,
    gate: GateName,
    status: int | None,
    error: str | None,
    judgement: Judgement | None,
    now: float,
) -> Decision:
    """`gate` refused (`status`, not 2xx) or gave no answer (`error`): stay at the step and
    never fail. The window had passed, so the failure and inconclusive counts clear; the
    next window that passes asks the gate again (a mirror step keeps the totals it judged)."""
    ro = state.rollout
    since = ro.paused_by_gate.get("since", now) if ro.paused_by_gate else now
    figures = judgement.figures if judgement is not None else {}
    samples, mismatches = figures.get("mirror_samples"), figures.get("mirror_mismatches")
    if isinstance(samples, int) and isinstance(mismatches, int):
        ro = replace(ro, mirror_samples=samples, mirror_mismatches=mismatches)
    held = replace(
        state,
        rollout=replace(
            ro,
            failures=0,
            inconclusive=0,
            paused_by_gate={"gate": gate, "status": status, "error": error, "since": since},
        ),
    )
    answer = f"answered {status}" if status is not None else f"gave no answer ({error})"
    msg = f"{gate} gate {answer}; holding at step {ro.step}"
    return _decision(held, "gate_hold", msg, judgement, now)


def start(
    route: RouteConfig,
    state: RouteState,
    canary: str,
    steps: tuple[Step, ...] | None,
    now: float,
) -> RouteState:
    """Begin a rollout of `canary`; allowed from idle, promoted and rolled_back."""
    phase = state.rollout.phase
    if phase in ("progressing", "paused"):
        raise _conflict(f"a rollout is already {phase}")
    if canary not in route.version_names:
        known = ", ".join(route.version_names)
        raise PolicyError(
            "invalid", f"unknown version {canary!r}, expected one of {known}", "canary"
        )
    if canary == state.stable:
        raise _conflict(f"{canary!r} is the stable version; roll out the other one", "canary")
    steps = route.rollout.steps if steps is None else steps
    if not steps:
        raise PolicyError("invalid", "a rollout needs at least one step", "steps")
    for i, s in enumerate(steps):
        if isinstance(s, WeightStep) and not 0 <= s.weight <= 100:
            raise PolicyError("invalid", f"must be 0..100, got {s.weight}", f"steps[{i}]")
    status = RolloutStatus(phase="progressing", canary=canary, steps=steps)
    fresh = replace(state, standby=None, rollout=status)
    return _enter(fresh, steps, 0, now)


def pause(state: RouteState) -> RouteState:
    if state.rollout.phase != "progressing":
        raise _conflict(f"cannot pause: rollout is {state.rollout.phase}")
    return replace(state, rollout=replace(state.rollout, phase="paused", paused_by_gate=None))


def resume(state: RouteState, now: float) -> RouteState:
    """Continue a paused rollout, or release a manual pause step; counters start afresh."""
    ro = state.rollout
    at_gate = _at_manual_pause(ro)
    if ro.phase != "paused" and not (ro.phase == "progressing" and at_gate):
        raise _conflict(f"cannot resume: rollout is {ro.phase}")
    going = replace(
        state,
        rollout=replace(
            ro,
            phase="progressing",
            failures=0,
            inconclusive=0,
            step_started=now,
            mirror_samples=0,
            mirror_mismatches=0,
        ),
    )
    if at_gate:
        return _enter(going, ro.steps, ro.step + 1, now)
    return going


def promote(state: RouteState, now: float) -> RouteState:
    ro = state.rollout
    if ro.phase not in ("progressing", "paused") or ro.canary is None:
        raise _conflict(f"cannot promote: rollout is {ro.phase}")
    return _promoted(state, now)


def abort(state: RouteState) -> RouteState:
    if state.rollout.phase not in ("progressing", "paused"):
        raise _conflict(f"cannot abort: rollout is {state.rollout.phase}")
    return _rolled_back(state)


def rollback(state: RouteState) -> RouteState:
    """Swap back to the stable version that the last promotion replaced, at once."""
    if state.rollout.phase != "promoted" or state.standby is None:
        raise _conflict(f"cannot roll back: rollout is {state.rollout.phase}, no standby")
    previous = state.standby
    return replace(
        state,
        weights=_split(state, previous, 100),
        stable=previous,
        standby=None,
        rollout=replace(state.rollout, phase="rolled_back", canary=state.stable),
    )


def _enter(state: RouteState, steps: tuple[Step, ...], index: int, now: float) -> RouteState:
    """Enter step `index` with its weight (a pause keeps the current one); past the end: promote."""
    if index >= len(steps):
        return _promoted(state, now)
    ro = replace(
        state.rollout,
        steps=steps,
        step=index,
        step_started=now,
        paused_by_gate=None,
        mirror_samples=0,
        mirror_mismatches=0,
    )
    step = steps[index]
    weights = state.weights
    canary = ro.canary
    if canary is not None and isinstance(step, WeightStep):
        weights = _split(state, canary, step.weight)
    elif canary is not None and isinstance(step, MirrorStep):
        weights = _split(state, canary, 0)  # shadows only: no user reaches the canary
    elif canary is not None and index == 0:
        weights = _split(state, canary, 0)  # a rollout that opens with a pause starts dark
    return replace(state, weights=weights, rollout=ro)


def _promoted(state: RouteState, now: float) -> RouteState:
    canary = state.rollout.canary
    if canary is None:
        raise _conflict("no canary to promote")
    # The rollout's canary is cleared: it is now the stable version, and keeping it would
    # make "to: canary" force rules point at stable.
    ro = replace(
        state.rollout,
        phase="promoted",
        canary=None,
        step=len(state.rollout.steps),
        step_started=now,
        paused_by_gate=None,
    )
    return replace(
        state,
        weights=_split(state, canary, 100),
        stable=canary,
        standby=state.stable,
        rollout=ro,
    )


def _rolled_back(state: RouteState) -> RouteState:
    weights = _split(state, state.stable, 100)
    ro = replace(state.rollout, phase="rolled_back", paused_by_gate=None)
    return replace(state, weights=weights, rollout=ro)


def _split(state: RouteState, version: str, weight: int) -> tuple[tuple[str, int], ...]:
    """`version` gets `weight`, the stable version the rest, any other version 0."""
    names = [name for name, _ in state.weights]
    for name in (version, state.stable):
        if name not in names:
            names.append(name)
    if version == state.stable:
        return tuple((name, weight if name == version else 0) for name in names)
    return tuple(
        (name, weight if name == version else 100 - weight if name == state.stable else 0)
        for name in names
    )


def _at_manual_pause(ro: RolloutStatus) -> bool:
    if not 0 <= ro.step < len(ro.steps):
        return False
    step = ro.steps[ro.step]
    return isinstance(step, PauseStep) and step.seconds is None


def _decision(
    state: RouteState, action: Action, message: str, judgement: Judgement | None, now: float
) -> Decision:
    ro = state.rollout
    figures: dict[str, object] = dict(judgement.figures) if judgement is not None else {}
    record: dict[str, object] = {
        "verdict": judgement.verdict if judgement is not None else None,
        "reasons": list(judgement.reasons) if judgement is not None else [],
        "action": action,
        "message": message,
        "at": now,
        "step": ro.step,
        "figures": judgement.to_json()["figures"] if judgement is not None else {},
    }
    new = replace(state, rollout=replace(ro, last_verdict=record))
    return Decision(new, action, message, figures)


def _conflict(message: str, field: str | None = None) -> PolicyError:
    return PolicyError("conflict", message, field, status=409)
