"""Persistence of runtime route states and the audit log: the bounded in-memory EventLog,
the file backend (one JSON document replaced atomically) and merge_states, which decides
which stored states survive a start against the current config.
Pure: standard library and state only; the caller decides when to save.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.config import Config, RouteConfig
from proxy.state import PolicyError, RouteState, rollout_from_json, validate_state

FORMAT_VERSION = 1
EVENTS_IN_MEMORY = 1000
EVENTS_ON_DISK = 200


class StateFileError(Exception):
    """The state file exists but cannot be read or understood."""


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


def state_from_json(name: str, d: Any) -> RouteState:
    if not isinstance(d, dict):
        raise ValueError(f"route {name!r} must be an object")
    weights = d.get("weights")
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"route {name!r} weights must be a non-empty object")
    for version, w in weights.items():
        if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= 100:
            raise ValueError(f"route {name!r} weights.{version} must be 0..100, got {w!r}")
    stable, standby, revision = d.get("stable"), d.get("standby"), d.get("revision")
    if not isinstance(stable, str):
        raise ValueError(f"route {name!r} stable must be a string, got {stable!r}")
    if standby is not None and not isinstance(standby, str):
        raise ValueError(f"route {name!r} standby must be a string or null, got {standby!r}")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
        raise ValueError(f"route {name!r} revision must be a positive integer, got {revision!r}")
    rollout = d.get("rollout", {})
    if not isinstance(rollout, dict):
        raise ValueError(f"route {name!r} rollout must be an object")
    try:
        status = rollout_from_json(rollout)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"route {name!r} rollout: {exc}") from exc
    return RouteState(
        weights=tuple(weights.items()),
        stable=stable,
        standby=standby,
        rollout=status,
        revision=revision,
    )


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


class FileStateStore:
    """Route states and recent events in one JSON file, replaced atomically on every save."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def _error(self, detail: str) -> StateFileError:
        return StateFileError(
            f"state file {self.path}: {detail}; fix or delete the file, "
            "or start with --reset-state to begin from the config"
        )

    def load(self) -> tuple[dict[str, RouteState], list[Event]] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise self._error(f"cannot read it ({exc})") from exc
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise self._error(f"not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise self._error("expected a JSON object at the top level")
        if data.get("version") != FORMAT_VERSION:
            raise self._error(
                f"unsupported format version {data.get('version')!r}, expected {FORMAT_VERSION}"
            )
        routes, events = data.get("routes", {}), data.get("events", [])
        if not isinstance(routes, dict):
            raise self._error("'routes' must be an object")
        if not isinstance(events, list):
            raise self._error("'events' must be a list")
        try:
            states = {str(k): state_from_json(str(k), v) for k, v in routes.items()}
            loaded = [event_from_json(e) for e in events]
        except ValueError as exc:
            raise self._error(str(exc)) from exc
        return states, loaded

    def save(self, states: Mapping[str, RouteState], events: Sequence[Event]) -> None:
        data = {
            "version": FORMAT_VERSION,
            "routes": {name: s.to_json() for name, s in states.items()},
            "events": [e.to_json() for e in list(events)[-EVENTS_ON_DISK:]],
        }
        text = json.dumps(json_safe(data), indent=1, sort_keys=True, allow_nan=False)
        directory = os.path.dirname(os.path.abspath(self.path))
        # Temp file in the same directory so os.replace is a rename on one filesystem:
        # a crash leaves either the old file or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(prefix=".graygate-state-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # The rename itself is durable only once the directory entry is on disk.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _fits(route: RouteConfig, state: RouteState) -> RouteState | None:
    try:
        # validate_state also puts the weights back in config version order.
        return validate_state(route, state)
    except PolicyError:
        return None


def merge_states(config: Config, loaded: Mapping[str, RouteState]) -> dict[str, RouteState]:
    """The stored states still valid for `config`; routes missing here start from config."""
    merged: dict[str, RouteState] = {}
    for route in config.routes:
        state = loaded.get(route.name)
        if state is None:
            continue
        fitted = _fits(route, state)
        if fitted is not None:
            merged[route.name] = fitted
    return merged
