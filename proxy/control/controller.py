"""The rollout controller loop: every route's `interval` it judges the window of the
local metrics source and applies core.rollout.decide through the policy store. A step that
a rollout gate must confirm waits for the gate's answer (control/gates.py); the loop never
does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from proxy.control.gates import GateAnswer, GateKeeper
from proxy.control.store.events import EventLog
from proxy.core.analysis import Sample, verdict
from proxy.core.config import RouteConfig
from proxy.core.rollout import Decision, decide, gate_for, hold_at_gate
from proxy.core.state import PolicyStore, RouteState
from proxy.core.stats import Stats

logger = logging.getLogger(__name__)


class Controller:
    """The loop that applies `decide`: every route's `interval`, judge its window and
    write the decision through the store. Windows are drained from the local metrics
    source (the same `Stats` that feed /metrics); a new step starts a fresh window.
    """

    def __init__(
        self,
        store: PolicyStore,
        stats: Stats,
        events: EventLog,
        persist: Callable[[], None],
        clock: Callable[[], float] = time.time,
        tick: float = 0.2,
        should_run: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.stats = stats
        self.events = events
        self.persist = persist
        self.clock = clock
        self.tick = tick
        # Shared state (redis): only the replica holding the lease may step rollouts.
        self.should_run = should_run
        self._marks: dict[str, tuple[float, float]] = {}  # route -> (step_started, last judged)
        self.gates = GateKeeper()  # rollout.gates: webhook calls the loop never awaits

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.tick)
                if self.should_run is not None and not self.should_run():
                    continue
                try:
                    self.step_all()
                except Exception:
                    logger.exception("rollout controller tick failed")
        finally:
            await self.gates.close()

    def step_all(self) -> None:
        now = self.clock()
        for rp in self.store.policy.routes:
            ro = rp.state.rollout
            if ro.phase != "progressing" or ro.canary is None:
                self._marks.pop(rp.name, None)
                self.gates.forget(rp.name)
                continue
            # --- rollout gates: a call in flight holds the route; an answer is applied now
            if self.gates.busy(rp.name):
                continue
            answer = self.gates.take(rp.name)
            if answer is not None:
                self.answer_gate(rp.config, rp.state, answer, now)
                continue
            started, judged = self._marks.get(rp.name, (None, 0.0))
            if started != ro.step_started:
                # A new step (or a rollout started elsewhere): its window starts now.
                for v in rp.config.version_names:
                    self.stats.take_window(rp.name, v)
                self._marks[rp.name] = (ro.step_started, now)
                continue
            if now - judged < rp.config.rollout.interval:
                continue
            self.judge(rp.config, rp.state, now)

    def judge(self, route: RouteConfig, state: RouteState, now: float) -> Decision:
        canary = state.rollout.canary
        assert canary is not None
        stable = state.stable
        judgement = verdict(
            Sample(*self.stats.take_window(route.name, canary)),
            Sample(*self.stats.take_window(route.name, stable)),
            route.rollout.analysis,
        )
        self.stats.count_verdict(route.name, judgement.verdict)
        decision = decide(route, state, judgement, now)
        gate = gate_for(route, decision)
        if gate is not None:  # nothing changes until the gate answers (answer_gate)
            self.gates.ask(route, state, gate, judgement, decision)
            self._marks[route.name] = (state.rollout.step_started, now)
            return decision
        self.apply(route, state, decision, now)
        return decision

    def answer_gate(
        self, route: RouteConfig, state: RouteState, answer: GateAnswer, now: float
    ) -> None:
        if answer.revision != state.revision:
            return  # the state moved meanwhile (an operator acted): judge afresh
        if answer.approved:
            decision = decide(route, state, answer.judgement, now)
        else:
            decision = hold_at_gate(
                state, answer.gate, answer.status, answer.error, answer.judgement, now
            )
        figures = {**decision.figures, "gate": answer.to_json()}
        self.apply(route, state, dataclasses.replace(decision, figures=figures), now)

    def apply(self, route: RouteConfig, state: RouteState, decision: Decision, now: float) -> None:
        new = self.store.replace(route.name, decision.state, expected_revision=state.revision)
        self._marks[route.name] = (new.rollout.step_started, now)
        self.persist_event(route.name, state, new, decision)

    def persist_event(
        self, route: str, before: RouteState, after: RouteState, decision: Decision
    ) -> None:
        log = logger.info if decision.action not in ("hold", "none") else logger.debug
        log(
            "rollout %s: %s (%s)",
            route,
            decision.action,
            decision.message,
            extra={
                "route": route,
                "action": f"rollout.{decision.action}",
                "actor": "rollout-controller",
                "revision": after.revision,
                "state": after.to_json(),
                "figures": decision.figures,
            },
        )
        self.events.append(
            route,
            "rollout-controller",
            f"rollout.{decision.action}",
            before.to_json(),
            after.to_json(),
            decision.message,
            decision.figures,
        )
        self.persist()
