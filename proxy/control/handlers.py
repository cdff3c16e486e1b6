"""The /api/v1 handlers: routes, stats and series, weights, rollouts, events and reload.
A change goes through the state writer (compare-and-set, If-Match), then is persisted and
becomes an event; nothing here touches the data plane.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web

from proxy.control.api import CTX, SERIES, AdminContext, ApiError, etag, json_response
from proxy.control.series import bucket_p99
from proxy.control.store.writer import LocalWriter, StateUnavailable
from proxy.core import rollout
from proxy.core.config.model import ConfigError, RouteConfig, Step
from proxy.core.config.rollout import parse_steps
from proxy.core.config.routes import parse_weights
from proxy.core.state import PolicyError, RolloutStatus, RouteState, rollout_to_json
from proxy.core.stats import is_error

logger = logging.getLogger(__name__)

REASON_HEADER = "X-Graygate-Reason"
MAX_REASON = 500
ROLLOUT_ACTIONS = ("pause", "resume", "promote", "abort")


# ---- request helpers -----------------------------------------------------------------------


def _actor(request: web.Request) -> str:
    return "token" if request.app[CTX].token else (request.remote or "unknown")


def _reason(request: web.Request) -> str | None:
    reason = request.query.get("reason") or request.headers.get(REASON_HEADER)
    return reason[:MAX_REASON] if reason else None


def _if_match(request: web.Request) -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    value = raw.strip()
    if value == "*":
        return None
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"')
    try:
        return int(value)
    except ValueError:
        raise ApiError(
            400, "bad_request", f"If-Match must be a revision number, got {raw!r}", "If-Match"
        ) from None


async def _json_body(request: web.Request, optional: bool = False) -> Any:
    if optional and not request.body_exists:
        return {}
    if request.content_type != "application/json":
        raise ApiError(
            400,
            "bad_request",
            f"Content-Type must be application/json, got {request.content_type!r}",
        )
    try:
        return json.loads(await request.text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_request", f"body is not valid JSON: {exc}") from None


def _route(request: web.Request) -> RouteConfig:
    name = request.match_info["route"]
    policy = request.app[CTX].store.policy.by_name.get(name)
    if policy is None:
        raise ApiError(404, "not_found", f"no route named {name!r}", "route")
    return policy.config


async def _commit(
    request: web.Request,
    route: str,
    action: str,
    compute: Callable[[RouteState], RouteState],
    figures: dict[str, Any] | None = None,
) -> web.Response:
    """Compare-and-set one route's state through the writer: answered only once the state
    store holds it (redis: accepted there, then swapped in here); on any error nothing
    changed."""
    ctx = request.app[CTX]
    expected = _if_match(request)
    writer = ctx.writer if ctx.writer is not None else LocalWriter(ctx.store)
    try:
        current, stored = await writer.change(route, compute, expected)
    except PolicyError as exc:
        raise ApiError(
            exc.status, exc.code, exc.message, exc.field, ctx.store.state(route)
        ) from exc
    except StateUnavailable as exc:
        raise ApiError(503, "state_unavailable", str(exc)) from exc
    actor, reason = _actor(request), _reason(request)
    ctx.events.append(route, actor, action, current.to_json(), stored.to_json(), reason, figures)
    ctx.persist()
    logger.info(
        "route %s: %s by %s, revision %d -> %d (reason: %s)",
        route,
        action,
        actor,
        current.revision,
        stored.revision,
        reason,
        extra={
            "route": route,
            "action": action,
            "actor": actor,
            "reason": reason,
            "revision": stored.revision,
            "state": stored.to_json(),
        },
    )
    return json_response({"route": route, "state": stored.to_json()}, headers=etag(stored))


# ---- views ---------------------------------------------------------------------------------


def _steps_json(steps: tuple[Step, ...]) -> list[object]:
    out = rollout_to_json(RolloutStatus(steps=steps))["steps"]
    return out if isinstance(out, list) else []


def _version_stats(ctx: AdminContext, route: str, version: str) -> dict[str, Any] | None:
    if ctx.stats is None:
        return None
    try:
        vs = ctx.stats.get(route, version)
    except KeyError:
        return None
    counts = dict(vs.counts)
    requests = sum(counts.values())
    errors = sum(n for (status, _), n in counts.items() if is_error(status))
    by_reason: dict[str, int] = {}
    for (_, reason), n in counts.items():
        by_reason[reason] = by_reason.get(reason, 0) + n
    return {
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else None,
        "inflight": vs.inflight,
        "p99_seconds": bucket_p99(list(vs.bucket_counts)),
        "by_reason": by_reason,
        "window": {"requests": vs.window.requests, "errors": vs.window.errors},
    }


def _summary(ctx: AdminContext, route: RouteConfig) -> dict[str, Any]:
    state = ctx.store.state(route.name)
    return {
        "name": route.name,
        "match": {"host": route.match.host, "path_prefix": route.match.path_prefix},
        "stable": state.stable,
        "weights": dict(state.weights),
        "rollout": {
            "state": state.rollout.phase,
            "canary": state.rollout.canary,
            "step": state.rollout.step,
        },
        "revision": state.revision,
    }


def _detail(ctx: AdminContext, route: RouteConfig) -> dict[str, Any]:
    state = ctx.store.state(route.name)
    rollout = route.rollout
    return {
        "name": route.name,
        "match": {"host": route.match.host, "path_prefix": route.match.path_prefix},
        "versions": {v.name: {"endpoints": [e.url for e in v.endpoints]} for v in route.versions},
        "config": {
            "stable": route.stable,
            "weights": dict(route.weights),
            "sticky": route.sticky is not None,
            "force_rules": len(route.force),
            "failover": route.failover,
            "rollout": {
                "steps": _steps_json(rollout.steps),
                "interval": rollout.interval,
                "analysis": asdict(rollout.analysis),
                "failure_limit": rollout.failure_limit,
                "on_failure": rollout.on_failure,
                "max_inconclusive": rollout.max_inconclusive,
            },
        },
        "state": state.to_json(),
        "revision": state.revision,
        "stats": {v: _version_stats(ctx, route.name, v) for v in route.version_names},
    }


# ---- handlers ------------------------------------------------------------------------------


async def list_routes(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    policy = ctx.store.policy
    return json_response({"routes": [_summary(ctx, r.config) for r in policy.routes]})


async def get_route(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    route = _route(request)
    return json_response(_detail(ctx, route), headers=etag(ctx.store.state(route.name)))


async def get_stats(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    out: dict[str, dict[str, Any]] = {}
    for r in ctx.store.policy.routes:
        out[r.name] = {v: _version_stats(ctx, r.name, v) for v in r.config.version_names}
    return json_response({"routes": out})


def _validate_weights(route: RouteConfig, body: Any) -> tuple[tuple[str, int], ...]:
    # The config file's rule and message; fields name the version ("green"), or "weights".
    try:
        return parse_weights(body, "", route.version_names)
    except ConfigError as exc:
        raise ApiError(422, "invalid", str(exc), exc.path or "weights") from exc


async def put_weights(request: web.Request) -> web.Response:
    route = _route(request)
    weights = _validate_weights(route, await _json_body(request))

    def compute(current: RouteState) -> RouteState:
        if current.rollout.phase in ("progressing", "paused"):
            # The controller owns the weights while a rollout runs; a manual value would be
            # overwritten at its next step, so refuse instead of pretending.
            raise ApiError(
                409,
                "conflict",
                f"route {route.name!r} has a rollout {current.rollout.phase}; "
                "promote or abort it before setting weights",
                None,
                current,
            )
        return RouteState(
            weights=weights,
            stable=current.stable,
            standby=current.standby,
            rollout=current.rollout,
            revision=current.revision,
        )

    return await _commit(request, route.name, "weights", compute)


def _parse_steps(raw: Any) -> tuple[Step, ...]:
    # The config file's rule and message, so `graygate check` and the API agree.
    try:
        return parse_steps(raw, "steps")
    except ConfigError as exc:
        raise ApiError(422, "invalid", str(exc), exc.path) from exc


async def start_rollout(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    route = _route(request)
    body = await _json_body(request, optional=True)
    if not isinstance(body, dict):
        raise ApiError(422, "invalid", "body must be a JSON object like {'canary': 'green'}")
    unknown = set(body) - {"canary", "steps"}
    if unknown:
        key = sorted(unknown)[0]
        raise ApiError(422, "invalid", f"unknown key {key!r}; allowed: canary, steps", key)
    stable = ctx.store.state(route.name).stable
    canary = body.get("canary")
    if canary is None:
        others = [n for n in route.version_names if n != stable]
        if len(others) != 1:
            raise ApiError(422, "invalid", "canary is required", "canary")
        canary = others[0]
    if not isinstance(canary, str) or canary not in route.version_names:
        raise ApiError(
            422,
            "invalid",
            f"canary must be one of {', '.join(route.version_names)}, got {canary!r}",
            "canary",
        )
    if canary == stable:
        raise ApiError(422, "invalid", f"{canary!r} is already the stable version", "canary")
    steps = _parse_steps(body["steps"]) if "steps" in body else None
    now = ctx.now()
    return await _commit(
        request,
        route.name,
        "rollout.start",
        lambda current: rollout.start(route, current, canary, steps, now),
    )


async def rollout_action(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    route = _route(request)
    action = request.match_info["action"]
    now = ctx.now()
    compute: Callable[[RouteState], RouteState]
    if action == "pause":
        compute = rollout.pause
    elif action == "resume":
        compute = lambda current: rollout.resume(current, now)  # noqa: E731
    elif action == "promote":
        compute = lambda current: rollout.promote(current, now)  # noqa: E731
    elif action == "abort":
        compute = rollout.abort
    else:
        raise ApiError(404, "not_found", f"no rollout action {action!r}")
    return await _commit(request, route.name, f"rollout.{action}", compute)


async def rollback(request: web.Request) -> web.Response:
    route = _route(request)
    return await _commit(request, route.name, "rollback", rollout.rollback)


async def list_events(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    raw = request.query.get("since", "0") or "0"
    try:
        since = int(raw)
    except ValueError:
        raise ApiError(
            400, "bad_request", f"since must be an integer, got {raw!r}", "since"
        ) from None
    route = request.query.get("route") or None
    return json_response({"events": [e.to_json() for e in ctx.events.since(since, route)]})


async def reload(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    before = {name: s.to_json() for name, s in ctx.store.states().items()}
    try:
        await ctx.reload()
    except ConfigError as exc:
        logger.warning("reload refused, keeping the running config: %s", exc)
        raise ApiError(422, "invalid_config", str(exc), exc.path) from exc
    except StateUnavailable as exc:
        raise ApiError(503, "state_unavailable", str(exc)) from exc
    after = {name: s.to_json() for name, s in ctx.store.states().items()}
    actor, reason = _actor(request), _reason(request)
    ctx.events.append(None, actor, "reload", {"routes": before}, {"routes": after}, reason)
    ctx.persist()
    logger.info(
        "config reloaded by %s: routes %s",
        actor,
        ", ".join(after) or "(none)",
        extra={"action": "reload", "actor": actor, "reason": reason, "routes": after},
    )
    return json_response({"status": "reloaded", "routes": list(after)})


async def get_series(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    route = _route(request)
    series = request.app.get(SERIES)
    if series is None:
        raise ApiError(404, "not_found", "series are not enabled (no statistics)")
    now = ctx.now()
    oldest = now - series.span
    versions = {
        v: [p.to_json() for p in series.points(route.name, v) if p.time > oldest]
        for v in route.version_names
    }
    return json_response(
        {
            "route": route.name,
            "interval": series.interval,
            "span": series.span,
            "now": now,
            "versions": versions,
        }
    )
