"""The rollout controller loop: every route's `interval` it reads a window from the route's
metrics source, judges it with core.analysis.verdict, applies core.rollout.decide and writes
the decision through the StateWriter (fenced by the lease when state is shared). A step a
rollout gate must confirm waits for the gate's answer (control/gates.py); the loop never does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from proxy.control.gates import GateAnswer, GateKeeper
from proxy.control.source import MetricsSource, SourceError, Window
from proxy.control.store.events import EventLog
from proxy.control.store.writer import LeaseLost, StateUnavailable, StateWriter
from proxy.core.analysis import Figure, Judgement, mirror_verdict, verdict
from proxy.core.config.model import MirrorStep, RouteConfig, WeightStep
from proxy.core.mirror import Mirrors
from proxy.core.rollout import Decision, decide, gate_for, hold_at_gate
from proxy.core.state import PolicyError, PolicyStore, RouteState
from proxy.core.stats import Stats

logger = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # after a decision the store refused: not every tick
EVIDENCE = 5  # recent mismatches a mirror step's decision carries in its event


@dataclass
class _Mark:
    step_started: float  # the step this window belongs to
    start: float  # where the next window starts (wall clock)
    not_before: float = 0.0  # after a refused write, the next try


class Controller:
    """The loop that applies `decide`. A window opens when a step starts (or when this
    replica first sees the step, e.g. after taking the lease over: then where the last
    stored verdict's window ended) and is judged once it spans `interval`, ending `lag`
    before now so every scrape inside it has landed."""

    def __init__(
        self,
        store: PolicyStore,
        source_for: Callable[[RouteConfig], MetricsSource],
        writer: StateWriter,
        events: EventLog,
        persist: Callable[[], None],
        stats: Stats,
        clock: Callable[[], float] = time.time,
        tick: float = 0.2,
        should_run: Callable[[], bool] | None = None,
        mirrors: Mirrors | None = None,
    ) -> None:
        self.store = store
        self.source_for = source_for
        self.writer = writer
        self.events = events
        self.persist = persist
        self.stats = stats  # verdict counters for /metrics
        self.clock = clock
        self.tick = tick
        # Shared state (redis): only the replica holding the lease may step rollouts.
        self.should_run = should_run
        self._marks: dict[str, _Mark] = {}
        self.mirrors = mirrors  # the evidence a mirror step's events carry
        self.gates = GateKeeper()  # rollout.gates: webhook calls the loop never awaits

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.tick)
                if self.should_run is not None and not self.should_run():
                    self._marks.clear()  # a later lease starts from the stored state
                    continue
                try:
                    await self.step_all()
                except Exception:
                    logger.exception("rollout controller tick failed")
        finally:
            await self.gates.close()

    async def step_all(self) -> None:
        for rp in self.store.policy.routes:
            await self.step(rp.config, rp.state)

    async def step(self, route: RouteConfig, state: RouteState) -> Decision | None:
        ro = state.rollout
        if ro.phase != "progressing" or ro.canary is None:
            self._marks.pop(route.name, None)
            self.gates.forget(route.name)
            return None
        source = self.source_for(route)
        now = self.clock()
        mark = self._marks.get(route.name)
        # Rollout gates: a call in flight holds the route; its answer is applied now.
        if self.gates.busy(route.name):
            return None
        answer = self.gates.take(route.name)
        if answer is not None and mark is not None:
            return await self.answer_gate(route, state, answer, source, mark)
        if mark is None or mark.step_started != ro.step_started:
            start = max(ro.step_started, _judged_until(state))
            mark = _Mark(ro.step_started, source.begin(route, start, now))
            self._marks[route.name] = mark
            return None
        end = now - source.lag(route)
        if end - mark.start < route.rollout.interval or now < mark.not_before:
            return None
        steps = ro.steps or route.rollout.steps
        current = steps[ro.step] if 0 <= ro.step < len(steps) else None
        judgement: Judgement | None = None
        if isinstance(current, WeightStep):
            judgement = await self.judge(route, state, source, mark.start, end)
        elif isinstance(current, MirrorStep):
            judgement = await self.judge_mirror(route, state, current, source, mark.start, end)
        return await self.apply(route, state, judgement, source, mark, end)

    async def judge_mirror(
        self,
        route: RouteConfig,
        state: RouteState,
        step: MirrorStep,
        source: MetricsSource,
        start: float,
        end: float,
    ) -> Judgement:
        """The mirror step's running totals plus this window's shadows, judged whole."""
        ro = state.rollout
        assert ro.canary is not None
        window_figures: dict[str, Figure] = {
            "window_start": round(start, 3),
            "window_end": round(end, 3),
        }
        try:
            window = await source.mirror_window(route, ro.canary, start, end)
        except SourceError as exc:
            logger.warning("rollout %s: mirror window not read: %s", route.name, exc)
            self.stats.count_verdict(route.name, "need_more_samples")
            return Judgement("need_more_samples", (str(exc),), window_figures)
        judged = mirror_verdict(
            ro.mirror_samples + window.samples,
            ro.mirror_mismatches + window.mismatches,
            end - ro.step_started,
            step,
            route.rollout.analysis.confidence,
        )
        window_figures["window_samples"] = window.samples
        window_figures["window_mismatches"] = window.mismatches
        remaining = judged.figures.get("mirror_remaining")
        if judged.verdict != "need_more_samples" or not remaining:
            self.stats.count_verdict(route.name, judged.verdict)  # a running step has none yet
        return replace(judged, figures={**judged.figures, **window_figures})

    def with_evidence(self, route: RouteConfig, state: RouteState, decision: Decision) -> Decision:
        """A mirror step's decision carries the canary's last mismatches of this step."""
        ro = state.rollout
        steps = ro.steps or route.rollout.steps
        if self.mirrors is None or not (0 <= ro.step < len(steps)):
            return decision
        if not isinstance(steps[ro.step], MirrorStep):
            return decision
        rows = [
            m.to_json()
            for m in self.mirrors.recent(route.name)
            if m.version == ro.canary and m.at >= ro.step_started
        ][-EVIDENCE:]
        if not rows:
            return decision
        new_ro = decision.state.rollout
        record = {**(new_ro.last_verdict or {}), "mismatches": rows}
        return replace(
            decision,
            state=replace(decision.state, rollout=replace(new_ro, last_verdict=record)),
            figures={**decision.figures, "mismatches": rows},
        )

    async def judge(
        self, route: RouteConfig, state: RouteState, source: MetricsSource, start: float, end: float
    ) -> Judgement:
        canary = state.rollout.canary
        assert canary is not None
        window_figures: dict[str, Figure] = {
            "window_start": round(start, 3),
            "window_end": round(end, 3),
        }
        try:
            window: Window = await source.window(route, canary, state.stable, start, end)
        except SourceError as exc:
            logger.warning("rollout %s: window not read: %s", route.name, exc)
            judgement = Judgement("need_more_samples", (str(exc),), window_figures)
        else:
            judged = verdict(window.canary, window.stable, route.rollout.analysis)
            judgement = replace(judged, figures={**judged.figures, **window_figures})
        self.stats.count_verdict(route.name, judgement.verdict)
        return judgement

    async def apply(
        self,
        route: RouteConfig,
        state: RouteState,
        judgement: Judgement | None,
        source: MetricsSource,
        mark: _Mark,
        end: float,
    ) -> Decision | None:
        decision = self.with_evidence(route, state, decide(route, state, judgement, self.clock()))
        gate = gate_for(route, decision)
        if gate is not None:  # nothing changes until the gate answers (answer_gate)
            self.gates.ask(route, state, gate, judgement, decision)
            mark.start = end  # this window is judged; the answer decides what it leads to
            return decision
        return await self.write(route, state, decision, source, mark, end)

    async def answer_gate(
        self,
        route: RouteConfig,
        state: RouteState,
        answer: GateAnswer,
        source: MetricsSource,
        mark: _Mark,
    ) -> Decision | None:
        if answer.revision != state.revision:
            return None  # the state moved meanwhile (an operator acted): judge afresh
        now = self.clock()
        if answer.approved:
            decision = self.with_evidence(route, state, decide(route, state, answer.judgement, now))
        else:
            decision = hold_at_gate(
                state, answer.gate, answer.status, answer.error, answer.judgement, now
            )
        figures = {**decision.figures, "gate": answer.to_json()}
        return await self.write(
            route, state, replace(decision, figures=figures), source, mark, mark.start
        )

    async def write(
        self,
        route: RouteConfig,
        state: RouteState,
        decision: Decision,
        source: MetricsSource,
        mark: _Mark,
        end: float,
    ) -> Decision | None:
        def compute(current: RouteState) -> RouteState:
            return decision.state

        try:
            before, after = await self.writer.change(
                route.name, compute, expected=state.revision, fenced=True
            )
        except (PolicyError, LeaseLost, StateUnavailable) as exc:
            # Nothing changed: the next tick looks again at whatever state is current.
            logger.warning("rollout %s: %s not written: %s", route.name, decision.action, exc)
            mark.not_before = self.clock() + RETRY_SECONDS
            return None
        mark.start = end
        if after.rollout.step_started != mark.step_started:
            self._marks.pop(route.name, None)
        figures = {**decision.figures, "source": source.name}
        log = logger.info if decision.action not in ("hold", "none") else logger.debug
        extra: dict[str, Any] = {
            "route": route.name,
            "action": f"rollout.{decision.action}",
            "actor": "rollout-controller",
            "revision": after.revision,
            "state": after.to_json(),
            "figures": figures,
        }
        log("rollout %s: %s (%s)", route.name, decision.action, decision.message, extra=extra)
        self.events.append(
            route.name,
            "rollout-controller",
            f"rollout.{decision.action}",
            before.to_json(),
            after.to_json(),
            decision.message,
            figures,
        )
        self.persist()
        return decision


def _judged_until(state: RouteState) -> float:
    """End of the last window judged at the current step (stored with the verdict), so a
    new leader neither judges a stretch twice nor skips one."""
    last = state.rollout.last_verdict
    if not last or last.get("step") != state.rollout.step:
        return 0.0
    figures = last.get("figures")
    end = figures.get("window_end") if isinstance(figures, dict) else None
    return float(end) if isinstance(end, int | float) else 0.0
