"""The file backend of runtime route states and recent events (one JSON document replaced
atomically), and merge_states, which decides which stored states survive a start against
the current config. Standard library only; the caller decides when to save.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.control.store.events import Event, event_from_json, json_safe
from proxy.core.config.model import Config, RouteConfig
from proxy.core.state import PolicyError, RouteState, rollout_from_json, validate_state

FORMAT_VERSION = 1
EVENTS_ON_DISK = 200


class StateFileError(Exception):
    """The state file exists but cannot be read or understood."""


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

    def check_path(self) -> None:
        """Refuse a path that can never hold the file, naming the part that is wrong: a
        missing directory, a file where a directory should be, or a directory as the file."""
        path = os.path.abspath(self.path)
        if os.path.isdir(path):
            raise StateFileError(f"state.path {self.path}: is a directory, not a file")
        parent = os.path.dirname(path)
        if os.path.isdir(parent):
            return
        ancestor = parent
        while not os.path.lexists(ancestor) and os.path.dirname(ancestor) != ancestor:
            ancestor = os.path.dirname(ancestor)
        if os.path.lexists(ancestor) and not os.path.isdir(ancestor):
            raise StateFileError(f"state.path {self.path}: {ancestor} is a file, not a directory")
        raise StateFileError(f"state.path {self.path}: directory {parent} does not exist")

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
