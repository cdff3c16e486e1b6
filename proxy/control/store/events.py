"""The audit log: every change as an Event (who, what, before/after, why, figures), kept
in a bounded in-memory EventLog that the stores persist; json_safe for strict JSON.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

EVENTS_IN_MEMORY = 1000


@dataclass(frozen=True)
class Event:
    id: int
    time: float
    route: str | None
    actor: str
    action: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str | None
    figures: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "route": self.route,
            "actor": self.actor,
            "action": self.action,
            "before": self.before,
            "after": self.after,
            "reason": self.reason,
            "figures": self.figures,
        }


def event_from_json(d: Any) -> Event:
    if not isinstance(d, dict):
        raise ValueError(f"event must be an object, got {type(d).__name__}")
    eid, when = d.get("id"), d.get("time")
    if not isinstance(eid, int) or isinstance(eid, bool) or eid < 1:
        raise ValueError(f"event id must be a positive integer, got {eid!r}")
    if not isinstance(when, int | float) or isinstance(when, bool):
        raise ValueError(f"event {eid} time must be a number, got {when!r}")
    for key in ("route", "reason"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise ValueError(f"event {eid} {key} must be a string or null")
    for key in ("actor", "action"):
        if not isinstance(d.get(key), str):
            raise ValueError(f"event {eid} {key} must be a string")
    for key in ("before", "after", "figures"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f"event {eid} {key} must be an object or null")
    return Event(
        id=eid,
        time=float(when),
        route=d.get("route"),
        actor=d["actor"],
        action=d["action"],
        before=d.get("before"),
        after=d.get("after"),
        reason=d.get("reason"),
        figures=d.get("figures"),
    )


class EventLog:
    """The last `limit` events in memory; ids keep counting across restarts."""

    def __init__(
        self,
        events: Sequence[Event] = (),
        limit: int = EVENTS_IN_MEMORY,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._events: deque[Event] = deque(events, maxlen=limit)
        self._next_id = max((e.id for e in events), default=0) + 1
        self._clock = clock if clock is not None else time.time
        self._listeners: list[Callable[[Event], None]] = []

    def append(
        self,
        route: str | None,
        actor: str,
        action: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        reason: str | None = None,
        figures: dict[str, Any] | None = None,
    ) -> Event:
        event = Event(
            self._next_id, self._clock(), route, actor, action, before, after, reason, figures
        )
        self._next_id += 1
        self._events.append(event)
        for listener in self._listeners:
            listener(event)
        return event

    def since(self, id: int = 0, route: str | None = None) -> list[Event]:
        return [e for e in self._events if e.id > id and (route is None or e.route == route)]

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def __len__(self) -> int:
        return len(self._events)


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None: verdict figures may hold them (a ratio over
    a zero p99), and strict JSON, which the file and the admin API write, has no such token."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
