"""Rollout gates (`rollout.gates`): before a step or a promotion the controller asks a
webhook, with the rollout's figures, in a task of its own bounded by the gate's timeout.
The controller never awaits the call: it sees `busy` while it runs and picks the answer up
with `take` on a later tick. What to do with the answer is core.rollout's (pure) part.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.control.notify import USER_AGENT, post_json
from proxy.control.store.events import json_safe
from proxy.core.analysis import Judgement
from proxy.core.config.model import GateName, RouteConfig
from proxy.core.rollout import Decision
from proxy.core.state import RouteState, rollout_to_json


@dataclass(frozen=True)
class GateAnswer:
    gate: GateName
    revision: int  # the route state's revision when the gate was asked
    judgement: Judgement | None  # the window that passed and led to the question
    status: int | None  # None: no answer (see error)
    error: str | None

    @property
    def approved(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def to_json(self) -> dict[str, Any]:
        return {"gate": self.gate, "status": self.status, "error": self.error}


@dataclass
class _Call:
    gate: GateName
    revision: int
    judgement: Judgement | None
    task: asyncio.Task[tuple[int | None, str | None]]


def question(
    route: RouteConfig, state: RouteState, gate: GateName, decision: Decision
) -> dict[str, Any]:
    """The body a gate receives: which rollout, where it stands and what would happen."""
    ro = state.rollout
    body: dict[str, Any] = json_safe(
        {
            "source": "graygate",
            "gate": gate,
            "route": route.name,
            "canary": ro.canary,
            "stable": state.stable,
            "revision": state.revision,
            "weights": dict(state.weights),
            "rollout": rollout_to_json(ro),
            "next": {
                "action": decision.action,
                "step": decision.state.rollout.step,
                "weights": dict(decision.state.weights),
                "message": decision.message,
            },
            "analysis": decision.state.rollout.last_verdict,
        }
    )
    return body


class GateKeeper:
    """One gate call at most per route; owned by the controller, closed when it stops."""

    def __init__(self) -> None:
        self._calls: dict[str, _Call] = {}
        self._session: aiohttp.ClientSession | None = None

    def ask(
        self,
        route: RouteConfig,
        state: RouteState,
        gate: GateName,
        judgement: Judgement | None,
        decision: Decision,
    ) -> None:
        config = route.rollout.gates.get(gate)
        assert config is not None, "ask only for a configured gate (rollout.gate_for)"
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
        body = question(route, state, gate, decision)
        task = asyncio.get_running_loop().create_task(
            post_json(self._session, config.url, body, config.timeout)
        )
        self.forget(route.name)
        self._calls[route.name] = _Call(gate, state.revision, judgement, task)

    def busy(self, route: str) -> bool:
        call = self._calls.get(route)
        return call is not None and not call.task.done()

    def take(self, route: str) -> GateAnswer | None:
        """The answer of a finished call (once), or None."""
        call = self._calls.get(route)
        if call is None or not call.task.done():
            return None
        del self._calls[route]
        if call.task.cancelled():
            return None
        status, error = call.task.result()  # post_json returns every failure as `error`
        return GateAnswer(call.gate, call.revision, call.judgement, status, error)

    def forget(self, route: str) -> None:
        call = self._calls.pop(route, None)
        if call is not None:
            call.task.cancel()

    async def close(self) -> None:
        calls = list(self._calls.values())
        self._calls.clear()
        for call in calls:
            call.task.cancel()
        for call in calls:
            with contextlib.suppress(asyncio.CancelledError):
                await call.task
        if self._session is not None:
            await self._session.close()
            self._session = None
