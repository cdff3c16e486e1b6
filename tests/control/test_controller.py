"""The rollout controller loop with a fake clock, a scripted metrics source and the local or
a refusing writer: when windows open and are judged, the scrape lag, the window stated in
every event, a source that fails (need_more_samples with its cause, never fail), a new
leader continuing where the stored verdict ended, and writes refused (fencing)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from proxy.control.controller import Controller
from proxy.control.source import SourceError, Window
from proxy.control.store.events import EventLog
from proxy.control.store.writer import LeaseLost, LocalWriter, StateUnavailable
from proxy.core import rollout
from proxy.core.analysis import Sample
from proxy.core.config.load import parse_config
from proxy.core.config.model import PauseStep, RouteConfig, SourceName, WeightStep
from proxy.core.state import PolicyStore
from proxy.core.stats import Stats
from tests.helpers import route_config

INTERVAL = 3.0
LAG = 1.0


@dataclass
class ScriptedSource:
    """Answers each window with the next scripted item: (canary, stable) or an exception."""

    script: list[Any] = field(default_factory=list)
    asked: list[tuple[float, float]] = field(default_factory=list)
    name: SourceName = "prometheus"

    def lag(self, route: RouteConfig) -> float:
        return LAG

    def begin(self, route: RouteConfig, start: float, now: float) -> float:
        return start

    async def window(
        self, route: RouteConfig, canary: str, stable: str, start: float, end: float
    ) -> Window:
        self.asked.append((start, end))
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return Window(item[0], item[1], start, end)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


GOOD = (Sample(300, 0), Sample(3000, 3))
BAD = (Sample(300, 60), Sample(3000, 3))


def setup(source: ScriptedSource, writer: Any = None, steps: list[int] | None = None) -> Any:
    rollout_ = {
        "steps": steps or [10, 50],
        "interval": INTERVAL,
        "failure_limit": 2,
        "analysis": {"min_samples": 100, "max_p99_latency": None, "max_latency_ratio": None},
    }
    route = route_config("http://127.0.0.1:9", "http://127.0.0.1:10", rollout=rollout_)
    config = parse_config({"routes": [route]}, env={})
    store = PolicyStore(config)
    clock = Clock(1000.0)
    started = rollout.start(config.routes[0], store.state("shop"), "green", None, clock.now)
    store.replace("shop", started)
    events = EventLog(clock=clock)
    saves: list[int] = []
    controller = Controller(
        store,
        lambda r: source,
        writer if writer is not None else LocalWriter(store),
        events,
        lambda: saves.append(1),
        Stats.from_config(config),
        clock=clock,
    )
    return controller, store, events, clock


async def test_window_opens_at_the_step_and_is_judged_once_it_spans_interval_plus_lag():
    source = ScriptedSource([GOOD])
    controller, store, events, clock = setup(source)
    await controller.step_all()  # opens the window at step_started (1000)
    clock.now = 1000 + INTERVAL + LAG - 0.1
    await controller.step_all()
    assert source.asked == []
    clock.now = 1000 + INTERVAL + LAG
    await controller.step_all()
    assert source.asked == [(1000.0, 1000.0 + INTERVAL)]
    (event,) = events.since(0)
    assert event.action == "rollout.advance"
    assert event.figures is not None
    assert event.figures["window_start"] == 1000.0
    assert event.figures["window_end"] == 1003.0
    assert event.figures["source"] == "prometheus"
    assert store.state("shop").rollout.step == 1
    assert store.state("shop").rollout.last_verdict["figures"]["window_end"] == 1003.0  # type: ignore[index]


async def test_an_unreadable_window_holds_with_its_cause_and_the_next_one_follows_it():
    cause = SourceError("prometheus http://127.0.0.1:1 unreachable: connection refused")
    source = ScriptedSource([cause, GOOD])
    controller, store, events, clock = setup(source)
    await controller.step_all()
    clock.now = 1004.0
    await controller.step_all()
    (hold,) = events.since(0)
    assert hold.action == "rollout.hold"
    assert hold.reason is not None and "unreachable: connection refused" in hold.reason
    assert hold.figures is not None and hold.figures["window_end"] == 1003.0
    state = store.state("shop")
    assert state.rollout.inconclusive == 1 and state.rollout.failures == 0
    assert state.rollout.last_verdict["verdict"] == "need_more_samples"  # type: ignore[index]
    assert state.rollout.last_verdict["reasons"] == [str(cause)]  # type: ignore[index]
    clock.now = 1007.0
    await controller.step_all()
    assert source.asked == [(1000.0, 1003.0), (1003.0, 1006.0)]
    assert events.since(0)[-1].action == "rollout.advance"


async def test_source_failures_never_fail_the_canary_only_pause_it():
    source = ScriptedSource([SourceError("no data")] * 10)
    controller, store, events, clock = setup(source)
    await controller.step_all()
    for i in range(10):
        clock.now = 1004.0 + i * INTERVAL
        await controller.step_all()
    actions = [e.action for e in events.since(0)]
    assert actions == ["rollout.hold"] * 9 + ["rollout.pause"]
    assert store.state("shop").rollout.phase == "paused"
    assert store.state("shop").rollout.failures == 0


async def test_a_new_leader_continues_where_the_stored_verdict_ended():
    source = ScriptedSource([BAD, GOOD])
    controller, store, events, clock = setup(source)
    await controller.step_all()
    clock.now = 1004.0
    await controller.step_all()
    assert store.state("shop").rollout.failures == 1  # held at step 0, window ended at 1003
    # Another replica takes over later: same store, fresh controller (no marks).
    clock.now = 1010.0
    other = Controller(
        store,
        lambda r: source,
        LocalWriter(store),
        events,
        lambda: None,
        controller.stats,
        clock=clock,
    )
    await other.step_all()  # opens at 1003: nothing skipped, nothing judged twice
    await other.step_all()
    assert source.asked == [(1000.0, 1003.0), (1003.0, 1009.0)]
    assert store.state("shop").rollout.step == 1


class RefusingWriter:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def change(self, *args: Any, **kwargs: Any) -> Any:
        assert kwargs.get("fenced") is True  # the controller always writes fenced
        raise self.error


@pytest.mark.parametrize(
    "error", [LeaseLost("lease moved"), StateUnavailable("redis down")], ids=["fenced", "down"]
)
async def test_a_refused_write_changes_nothing_and_the_window_is_retried(error):
    source = ScriptedSource([GOOD, GOOD])
    controller, store, events, clock = setup(source, RefusingWriter(error))
    before = store.state("shop")
    await controller.step_all()
    clock.now = 1004.0
    await controller.step_all()
    assert store.state("shop") == before
    assert events.since(0) == []
    clock.now = 1004.5  # not at every tick
    await controller.step_all()
    assert len(source.asked) == 1
    clock.now = 1005.0
    await controller.step_all()
    assert source.asked == [(1000.0, 1003.0), (1000.0, 1004.0)]


async def test_pause_steps_read_no_window():
    source = ScriptedSource([])
    controller, store, events, clock = setup(source)
    state = store.state("shop")
    paused = replace(state, rollout=replace(state.rollout, steps=(PauseStep(5.0), WeightStep(50))))
    store.replace("shop", paused)
    await controller.step_all()
    clock.now = 1006.0
    await controller.step_all()
    assert source.asked == []
    assert events.since(0)[-1].action == "rollout.advance"
