"""The rollout controller loop: every route's `interval` it judges the window of the
local metrics source and applies core.rollout.decide through the policy store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from proxy.control.store.events import EventLog
from proxy.core.analysis import Sample, verdict
from proxy.core.config import RouteConfig
from proxy.core.rollout import Decision, decide
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

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            if self.should_run is not None and not self.should_run():
                continue
            try:
                self.step_all()
            except Exception:
                logger.exception("rollout controller tick failed")

    def step_all(self) -> None:
        now = self.clock()
        for rp in self.store.policy.routes:
            ro = rp.state.rollout
            if ro.phase != "progressing" or ro.canary is None:
                self._marks.pop(rp.name, None)
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
        new = self.store.replace(route.name, decision.state, expected_revision=state.revision)
        self._marks[route.name] = (new.rollout.step_started, now)
        self.persist_event(route.name, state, new, decision)
        return decision

    def persist_event(
        self, route: str, before: RouteState, after: RouteState, decision: Decision
    ) -> None:
        log = logger.info if decision.action not in ("hold", "none") else logger.debug
        log("rollout %s: %s (%s)", route, decision.action, decision.message)
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
