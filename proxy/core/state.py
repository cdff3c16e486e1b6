"""Runtime state: per-route RouteState (weights, stable, rollout progress, revision),
the compiled RoutingPolicy snapshot built from config + state, and the PolicyStore
that swaps the snapshot whole. Pure core: standard library only, no I/O here
(persistence lives in store.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from proxy.core.config.model import Config, ConfigError, ForceRule, Reason, RouteConfig, Step
from proxy.core.config.rollout import steps_from_json, steps_to_json
from proxy.core.config.routes import parse_weights
from proxy.core.hosts import compile_pattern
from proxy.core.mirror import ActiveMirror, active_mirror

logger = logging.getLogger(__name__)

RolloutPhase = Literal["idle", "progressing", "paused", "promoted", "rolled_back"]
ROLLOUT_PHASES: tuple[RolloutPhase, ...] = (
    "idle",
    "progressing",
    "paused",
    "promoted",
    "rolled_back",
)


class PolicyError(Exception):
    """A change to the runtime state that cannot be applied (bad value or stale revision)."""

    def __init__(self, code: str, message: str, field: str | None = None, status: int = 422):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.status = status


@dataclass(frozen=True)
class RolloutStatus:
    phase: RolloutPhase = "idle"
    canary: str | None = None
    steps: tuple[Step, ...] = ()  # the steps of this rollout (config's unless overridden)
    step: int = -1  # index into steps; -1 before the first
    step_started: float = 0.0  # wall-clock seconds when the current step began
    failures: int = 0  # consecutive failed windows
    inconclusive: int = 0  # consecutive need_more_samples windows
    last_verdict: dict[str, object] | None = None  # figures of the last decision
    # Set while a rollout gate (rollout.gates) refused or did not answer: {gate, status,
    # error, at}; the step is held, never failed. Cleared when a step is entered.
    paused_by_gate: dict[str, object] | None = None
    # A mirror step's shadow answers compared, and those that differed, since it began.
    mirror_samples: int = 0
    mirror_mismatches: int = 0


@dataclass(frozen=True)
class RouteState:
    weights: tuple[tuple[str, int], ...]  # (version, percent) in config version order
    stable: str
    standby: str | None = None  # previous stable after a promotion, for instant rollback
    rollout: RolloutStatus = field(default_factory=RolloutStatus)
    revision: int = 1

    def weight(self, version: str) -> int:
        for name, w in self.weights:
            if name == version:
                return w
        return 0

    def to_json(self) -> dict[str, object]:
        return {
            "weights": dict(self.weights),
            "stable": self.stable,
            "standby": self.standby,
            "revision": self.revision,
            "rollout": rollout_to_json(self.rollout),
        }


def rollout_to_json(r: RolloutStatus) -> dict[str, object]:
    return {
        "state": r.phase,
        "canary": r.canary,
        "steps": steps_to_json(r.steps),
        "step": r.step,
        "step_started": r.step_started,
        "failures": r.failures,
        "inconclusive": r.inconclusive,
        "last_verdict": r.last_verdict,
        "paused_by_gate": r.paused_by_gate,
        "mirror_samples": r.mirror_samples,
        "mirror_mismatches": r.mirror_mismatches,
    }


def rollout_from_json(d: Mapping[str, object]) -> RolloutStatus:
    steps = steps_from_json(d.get("steps"))
    phase = str(d.get("state", "idle"))
    if phase not in ROLLOUT_PHASES:
        raise ValueError(f"unknown rollout state {phase!r}")
    canary = d.get("canary")
    verdict = d.get("last_verdict")
    gate = d.get("paused_by_gate")
    return RolloutStatus(
        phase=phase,
        canary=str(canary) if canary is not None else None,
        steps=tuple(steps),
        step=_int(d.get("step"), -1),
        step_started=_float(d.get("step_started"), 0.0),
        failures=_int(d.get("failures"), 0),
        inconclusive=_int(d.get("inconclusive"), 0),
        last_verdict=dict(verdict) if isinstance(verdict, dict) else None,
        paused_by_gate=dict(gate) if isinstance(gate, dict) else None,
        mirror_samples=_int(d.get("mirror_samples"), 0),
        mirror_mismatches=_int(d.get("mirror_mismatches"), 0),
    )


def _int(value: object, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, int | float | str):
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def _float(value: object, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, int | float | str):
        return float(value)
    raise ValueError(f"expected a number, got {value!r}")


def initial_state(route: RouteConfig) -> RouteState:
    return RouteState(weights=route.weights, stable=route.stable)


# --- the compiled snapshot the hot path reads ------------------------------------------

ACTIVE_PHASES: tuple[RolloutPhase, ...] = ("progressing", "paused")


@dataclass(frozen=True, slots=True)
class CompiledForce:
    kind: Literal["header", "cookie"]
    name: str
    value: str | None
    pattern: re.Pattern[str] | None
    version: str  # resolved at compile time (roles "canary"/"stable" -> names)
    reason: Reason  # "force_header" | "force_cookie"


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    config: RouteConfig
    state: RouteState
    name: str
    stable: str
    canary: str | None  # rollout's canary, else the route's non-stable version, else None
    canary_weight: int  # state weight of `canary` (0 when canary is None)
    threshold: int  # canary buckets are [0, threshold): canary_weight * 100
    salt: bytes  # sticky.salt or route name, utf-8
    force: tuple[CompiledForce, ...]
    needs_cookies: bool  # cookie force rule, cookie cohort key, or graygate's own cookie
    cumulative: tuple[tuple[str, int], ...]  # weighted draw: (version, upper bound), weight > 0
    host_exact: str | None
    host_suffix: str | None  # "*.example.com" -> ".example.com"; "*" leaves both None
    path_prefix: str
    mirror: ActiveMirror | None = None  # shadow copies in force: route mirror or mirror step


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    config: Config
    routes: tuple[RoutePolicy, ...]  # config order
    by_name: Mapping[str, RoutePolicy]
    generation: int  # bumps on every replace()


def canary_of(route: RouteConfig, state: RouteState) -> str | None:
    """The running rollout's canary, else the route's non-stable version, else None."""
    rollout = state.rollout
    if (
        rollout.canary is not None
        and rollout.phase in ACTIVE_PHASES
        and rollout.canary != state.stable
        and rollout.canary in route.version_names
    ):
        return rollout.canary
    for name in route.version_names:
        if name != state.stable:
            return name
    return None


def _compile_force(rule: ForceRule, stable: str, canary: str | None) -> CompiledForce:
    # Roles are resolved per snapshot, so a weight or rollout change re-targets them.
    if rule.to == "canary":
        version = canary if canary is not None else stable
    elif rule.to == "stable":
        version = stable
    else:
        version = rule.to
    reason: Reason = "force_header" if rule.kind == "header" else "force_cookie"
    pattern = re.compile(rule.regex) if rule.regex is not None else None
    return CompiledForce(rule.kind, rule.name, rule.value, pattern, version, reason)


def compile_route(route: RouteConfig, state: RouteState) -> RoutePolicy:
    stable = state.stable
    canary = canary_of(route, state)
    canary_weight = state.weight(canary) if canary is not None else 0
    force = tuple(_compile_force(rule, stable, canary) for rule in route.force)
    sticky = route.sticky
    needs_cookies = any(f.kind == "cookie" for f in force) or sticky is not None
    cumulative: list[tuple[str, int]] = []
    upper = 0
    for name, weight in state.weights:
        if weight > 0:  # a 0-weight version never gets an interval, so no roll can pick it
            upper += weight
            cumulative.append((name, upper))
    if not cumulative:  # unreachable for a validated state; keep the route servable
        cumulative.append((stable, 100))
    host_exact, host_suffix = compile_pattern(route.match.host)
    salt = (sticky.salt if sticky is not None and sticky.salt else route.name).encode()
    ro = state.rollout
    return RoutePolicy(
        config=route,
        state=state,
        name=route.name,
        stable=stable,
        canary=canary,
        canary_weight=canary_weight,
        threshold=canary_weight * 100,
        salt=salt,
        force=force,
        needs_cookies=needs_cookies,
        cumulative=tuple(cumulative),
        host_exact=host_exact,
        host_suffix=host_suffix,
        path_prefix=route.match.path_prefix,
        mirror=active_mirror(route, stable, canary, ro.phase, ro.steps, ro.step),
    )


def compile_policy(
    config: Config, states: Mapping[str, RouteState], generation: int = 0
) -> RoutingPolicy:
    """Compile config + runtime states; a route missing from `states` uses initial_state."""
    routes = tuple(
        compile_route(rc, states.get(rc.name) or initial_state(rc)) for rc in config.routes
    )
    return RoutingPolicy(config, routes, {r.name: r for r in routes}, generation)


# --- validation and the store ---------------------------------------------------------


def _invalid(field: str, message: str) -> PolicyError:
    return PolicyError("invalid", f"{field}: {message}", field=field, status=422)


def validate_weights(
    route: RouteConfig, weights: Mapping[str, object]
) -> tuple[tuple[str, int], ...]:
    """Weights for every version of the route, by the config file's rule; config order."""
    try:
        return parse_weights(dict(weights), "weights", route.version_names)
    except ConfigError as exc:
        raise PolicyError("invalid", str(exc), field=exc.path, status=422) from exc


def validate_state(route: RouteConfig, state: RouteState) -> RouteState:
    """The state checked against its route, weights put in config version order."""
    names = route.version_names
    seen: dict[str, object] = {}
    for name, w in state.weights:
        if name in seen:
            raise _invalid(f"weights.{name}", "given twice")
        seen[name] = w
    weights = validate_weights(route, seen)
    if state.stable not in names:
        raise _invalid("stable", f"must be one of {', '.join(names)}, got {state.stable!r}")
    if state.standby is not None and state.standby not in names:
        raise _invalid("standby", f"must be one of {', '.join(names)}, got {state.standby!r}")
    rollout = state.rollout
    if rollout.phase not in ROLLOUT_PHASES:
        raise _invalid("rollout.state", f"must be one of {', '.join(ROLLOUT_PHASES)}")
    if rollout.canary is not None and rollout.canary not in names:
        raise _invalid("rollout.canary", f"must be one of {', '.join(names)}")
    if rollout.phase in ACTIVE_PHASES and rollout.canary == state.stable:
        raise _invalid("rollout.canary", "must differ from the stable version")
    return state if weights == state.weights else replace(state, weights=weights)


def _compatible(route: RouteConfig, state: RouteState) -> bool:
    # Runtime state survives a restart or reload only while its version names still fit.
    names = route.version_names
    return sorted(n for n, _ in state.weights) == sorted(names) and state.stable in names


class PolicyStore:
    """Holds the current RoutingPolicy and swaps it whole; every method is synchronous.

    The admin API and the rollout loop change state only through `replace` (or
    `set_weights`); no await happens between validation and the swap, so no request
    sees half a change.
    """

    def __init__(self, config: Config, states: Mapping[str, RouteState] | None = None) -> None:
        given = states or {}
        self._config = config
        self._states: dict[str, RouteState] = {}
        for rc in config.routes:
            old = given.get(rc.name)
            self._states[rc.name] = self._adopt(rc, old)
        self._listeners: list[Callable[[RoutingPolicy], None]] = []
        self._generation = 0
        self.policy: RoutingPolicy = compile_policy(config, self._states, 0)

    @property
    def config(self) -> Config:
        return self._config

    def state(self, route: str) -> RouteState:
        return self._states[route]

    def states(self) -> dict[str, RouteState]:
        return dict(self._states)

    def replace(
        self, route: str, new: RouteState, expected_revision: int | None = None
    ) -> RouteState:
        rc = self._route_config(route)
        current = self._states[route]
        if expected_revision is not None and expected_revision != current.revision:
            raise PolicyError(
                "stale_revision",
                f"route {route!r} is at revision {current.revision}, not {expected_revision}",
                status=409,
            )
        stored = replace(validate_state(rc, new), revision=current.revision + 1)
        self._states[route] = stored
        self._publish()
        return stored

    def prepare(
        self, route: str, new: RouteState, expected_revision: int | None = None
    ) -> RouteState:
        """What `replace` would store (validated, next revision), without storing it: a
        shared store writes it first and `adopt`s it once the write is accepted."""
        rc = self._route_config(route)
        current = self._states[route]
        if expected_revision is not None and expected_revision != current.revision:
            raise PolicyError(
                "stale_revision",
                f"route {route!r} is at revision {current.revision}, not {expected_revision}",
                "If-Match",
                status=409,
            )
        return replace(validate_state(rc, new), revision=current.revision + 1)

    def adopt(self, route: str, state: RouteState) -> RouteState:
        """Take a state another replica stored, with its revision: validated like
        `replace`, but the revision is the writer's, so it is not bumped a second time."""
        rc = self._route_config(route)
        stored = validate_state(rc, state)
        self._states[route] = stored
        self._publish()
        return stored

    def set_weights(
        self, route: str, weights: Mapping[str, int], expected_revision: int | None = None
    ) -> RouteState:
        rc = self._route_config(route)
        checked = validate_weights(rc, weights)
        return self.replace(route, replace(self._states[route], weights=checked), expected_revision)

    def reconfigure(self, config: Config) -> None:
        """Reload: kept routes keep their state while their versions still fit."""
        old_routes = {rc.name: rc for rc in self._config.routes}
        states: dict[str, RouteState] = {}
        for rc in config.routes:
            old_state = self._states.get(rc.name)
            before = old_routes.get(rc.name)
            if old_state is None or before is None:
                states[rc.name] = initial_state(rc)
                continue
            adopted = self._adopt(rc, old_state)
            if before != rc and adopted.revision == old_state.revision:
                adopted = replace(adopted, revision=old_state.revision + 1)
            states[rc.name] = adopted
        self._config = config
        self._states = states
        self._publish()

    def subscribe(self, listener: Callable[[RoutingPolicy], None]) -> None:
        self._listeners.append(listener)

    def _route_config(self, route: str) -> RouteConfig:
        for rc in self._config.routes:
            if rc.name == route:
                return rc
        raise PolicyError("not_found", f"no route named {route!r}", status=404)

    @staticmethod
    def _adopt(rc: RouteConfig, old: RouteState | None) -> RouteState:
        # A state that no longer fits its route restarts from the config, one revision
        # past the old one so a client holding the old revision gets 409, not a match.
        if old is None:
            return initial_state(rc)
        if _compatible(rc, old):
            with contextlib.suppress(PolicyError):  # no longer fits: start from the config
                return validate_state(rc, old)
        return replace(initial_state(rc), revision=old.revision + 1)

    def _publish(self) -> None:
        self._generation += 1
        policy = compile_policy(self._config, self._states, self._generation)
        self.policy = policy
        for listener in list(self._listeners):
            try:
                listener(policy)
            except Exception:
                # The swap already happened; one faulty listener must not hide it from others.
                logger.exception("policy listener %r failed", listener)
