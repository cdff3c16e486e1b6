"""The admin HTTP contract (docs/admin-api.md) on aiohttp: health, metrics, dashboard and
the /api/v1 routes, weights, rollout, events and reload calls; only for a Host naming it.
Changes state only through PolicyStore.replace(); every change is persisted and becomes an
event. Never touches the data plane directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.registry import CollectorRegistry

from proxy.control import openapi
from proxy.control.series import Series, bucket_p99
from proxy.control.store.events import EventLog, json_safe
from proxy.control.store.writer import LocalWriter, StateUnavailable, StateWriter
from proxy.core import rollout
from proxy.core.config.model import ConfigError, RouteConfig, Step
from proxy.core.config.rollout import parse_steps
from proxy.core.config.routes import parse_weights
from proxy.core.state import PolicyError, PolicyStore, RolloutStatus, RouteState, rollout_to_json
from proxy.core.stats import Stats, is_error

logger = logging.getLogger(__name__)

API = "/api/v1"
REASON_HEADER = "X-Graygate-Reason"
MAX_REASON = 500
ROLLOUT_ACTIONS = ("pause", "resume", "promote", "abort")


@dataclass
class AdminContext:
    store: PolicyStore
    persist: Callable[[], None]  # saves states + events; called after each change
    events: EventLog
    registry: CollectorRegistry | None
    reload: Callable[[], Awaitable[None]]  # raises ConfigError on a bad file, keeps the old one
    token: str | None
    ready: Callable[[], bool]
    now: Callable[[], float] = time.time
    stats: Stats | None = None
    listen_host: str = ""  # admin.listen's host: a Host naming it is ours
    allowed_hosts: tuple[str, ...] = ()  # admin.allowed_hosts, normalised by the config
    # Where a change becomes durable before it is answered; None: this process (LocalWriter).
    writer: StateWriter | None = None


CTX = web.AppKey("graygate_admin_ctx", AdminContext)
SERIES = web.AppKey("graygate_admin_series", Series)  # only when ctx.stats is set


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        state: RouteState | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.state = state


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(json_safe(data), allow_nan=False),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def _etag(state: RouteState) -> dict[str, str]:
    return {"ETag": f'"{state.revision}"'}


def check_admin_exposure(listen_host: str, token: str | None) -> None:
    """Refuse an admin API reachable beyond this machine without a token."""
    if token:
        return
    host = listen_host.strip("[]")
    if host == "localhost":
        return
    with contextlib.suppress(ValueError):  # a name, not an address: not loopback
        if ipaddress.ip_address(host).is_loopback:
            return
    raise ValueError(
        f"admin.listen: the admin API would listen on {listen_host!r}, beyond loopback, "
        "without a token; set admin.token (e.g. token: ${GRAYGATE_ADMIN_TOKEN}) or listen "
        "on 127.0.0.1"
    )


# ---- Host and Origin -----------------------------------------------------------------------
# DNS rebinding: a page the operator visits points its own name at 127.0.0.1; the browser
# then sends that name as Host. Cross-site requests: a page posts to http://127.0.0.1:9901
# with its own Origin. Both are refused before auth and before any handler. Probes are
# exempt: kubelet sends the pod IP (or whatever `host:` says) and a probe changes nothing.

UNCHECKED_PATHS = frozenset({"/healthz", "/readyz"})
SAFE_METHODS = frozenset({"GET", "HEAD"})  # OPTIONS is checked: a CORS preflight is not safe
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})  # none: typed URL, bookmark, curl


def _host_name(value: str) -> str | None:
    """The name part of a Host value, as compared: lowercase, no port, no trailing dot,
    IP addresses in compressed form and IPv6 in brackets; None when malformed."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        port = text[end + 1 :]
        if end < 0 or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
        try:
            ip6 = ipaddress.IPv6Address(text[1:end])
        except ValueError:
            return None
        v4 = ip6.ipv4_mapped
        return v4.compressed if v4 is not None else f"[{ip6.compressed}]"
    name, sep, port = text.rpartition(":")
    if not sep:
        name = text
    elif not port.isdigit():
        return None
    name = name.rstrip(".")
    if not name or any(c in name for c in ":[]/@ "):
        return None
    with contextlib.suppress(ValueError):  # a name, not an address: compared as it is
        return ipaddress.IPv4Address(name).compressed
    return name


def _address_name(host: str) -> str | None:
    """A listen or socket host ("::1", "10.0.0.5", "admin.local") as _host_name gives it."""
    return _host_name(f"[{host}]" if ":" in host else host)


def host_allowed(host: str, local_ip: str, listen_host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header value names this admin listener: localhost or a loopback
    address, the listen host, the address the connection arrived on (so a pod IP works on
    a wildcard listener), or an `allowed` name; "*" allows any. The port is not compared:
    rebinding controls only the name, and port-forwards change the port.

    >>> host_allowed("localhost:8000", "127.0.0.1", "127.0.0.1", ())
    True
    >>> host_allowed("evil.example:9901", "127.0.0.1", "127.0.0.1", ())
    False
    """
    name = _host_name(host) if host else None
    if name is None:
        return False
    if "*" in allowed or name == "localhost" or name in allowed:
        return True
    if listen_host not in ("0.0.0.0", "::", "") and name == _address_name(listen_host):
        return True
    if local_ip and name == _address_name(local_ip):
        return True
    with contextlib.suppress(ValueError):  # a name, and none of ours
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    return False


def _cross_origin(request: web.Request) -> tuple[str, str] | None:
    """(field, message) when a request comes from a page of another origin than ours."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in SAME_ORIGIN_FETCH:
        return "Sec-Fetch-Site", f"Sec-Fetch-Site: {site}: only same-origin pages may change state"
    origin = request.headers.get("Origin")
    if origin is not None:
        own = "http://" + request.headers.get("Host", "").strip().lower()
        if origin.strip().lower() != own:
            return "Origin", f"Origin {origin!r} is not this admin's own origin {own!r}"
    return None


def _forbidden(code: str, message: str, field: str) -> web.Response:
    return _json(_error_body(code, message, field), 403)


# ---- middlewares ---------------------------------------------------------------------------

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "invalid",
}


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        body = _error_body(exc.code, exc.message, exc.field)
        if exc.state is not None:
            body["state"] = exc.state.to_json()
        return _json(body, exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "error")
        if exc.status == 404:
            message = f"no such path: {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        else:
            message = exc.reason
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return _json(_error_body(code, message), exc.status, headers)
    except Exception:
        logger.exception("admin %s %s failed", request.method, request.path)
        return _json(_error_body("internal", "internal error; see the graygate log"), 500)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in UNCHECKED_PATHS:
        return await handler(request)
    ctx = request.app[CTX]
    host = request.headers.get("Host", "")
    transport = request.transport
    sock = transport.get_extra_info("sockname") if transport is not None else None
    local_ip = sock[0] if isinstance(sock, tuple) else ""
    if not host_allowed(host, local_ip, ctx.listen_host, ctx.allowed_hosts):
        return _forbidden(
            "forbidden_host",
            f"Host {host!r} does not name this admin listener; "
            "use localhost or its address, or list the name in admin.allowed_hosts",
            "Host",
        )
    if request.method not in SAFE_METHODS:
        refused = _cross_origin(request)
        if refused is not None:
            return _forbidden("cross_origin", refused[1], refused[0])
    return await handler(request)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[CTX].token
    path = request.path
    # Checked before any handler runs, so a 401 never reveals whether a route exists.
    if token and (path == API or path.startswith(API + "/")):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return _json(
                _error_body("unauthorized", "missing or wrong bearer token"),
                401,
                {"WWW-Authenticate": 'Bearer realm="graygate"'},
            )
    return await handler(request)


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
    return _json({"route": route, "state": stored.to_json()}, headers=_etag(stored))


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


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[CTX].ready():
        return _json({"status": "ready"})
    return _json({"status": "not_ready"}, 503)


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[CTX].registry
    if registry is None:
        raise ApiError(404, "not_found", "metrics are not enabled")
    from proxy.control.metrics import CONTENT_TYPE, render

    return web.Response(body=render(registry), headers={"Content-Type": CONTENT_TYPE})


async def _dashboard(request: web.Request) -> web.Response:
    return web.Response(text=DASHBOARD_HTML, content_type="text/html")


# One self-contained page (no external assets), shipped as package data.
DASHBOARD_HTML = (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")


async def _list_routes(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    policy = ctx.store.policy
    return _json({"routes": [_summary(ctx, r.config) for r in policy.routes]})


async def _get_route(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    route = _route(request)
    return _json(_detail(ctx, route), headers=_etag(ctx.store.state(route.name)))


async def _stats(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    out: dict[str, dict[str, Any]] = {}
    for r in ctx.store.policy.routes:
        out[r.name] = {v: _version_stats(ctx, r.name, v) for v in r.config.version_names}
    return _json({"routes": out})


def _validate_weights(route: RouteConfig, body: Any) -> tuple[tuple[str, int], ...]:
    # The config file's rule and message; fields name the version ("green"), or "weights".
    try:
        return parse_weights(body, "", route.version_names)
    except ConfigError as exc:
        raise ApiError(422, "invalid", str(exc), exc.path or "weights") from exc


async def _put_weights(request: web.Request) -> web.Response:
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


async def _start_rollout(request: web.Request) -> web.Response:
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


async def _rollout_action(request: web.Request) -> web.Response:
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


async def _rollback(request: web.Request) -> web.Response:
    route = _route(request)
    return await _commit(request, route.name, "rollback", rollout.rollback)


async def _events(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    raw = request.query.get("since", "0") or "0"
    try:
        since = int(raw)
    except ValueError:
        raise ApiError(
            400, "bad_request", f"since must be an integer, got {raw!r}", "since"
        ) from None
    route = request.query.get("route") or None
    return _json({"events": [e.to_json() for e in ctx.events.since(since, route)]})


async def _reload(request: web.Request) -> web.Response:
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
    return _json({"status": "reloaded", "routes": list(after)})


# ---- dashboard series and the API's own description (issue 14) -----------------------------


async def _series(request: web.Request) -> web.Response:
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
    return _json(
        {
            "route": route.name,
            "interval": series.interval,
            "span": series.span,
            "now": now,
            "versions": versions,
        }
    )


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(text=openapi.text(), content_type="application/json")


async def _sampling(app: web.Application) -> AsyncIterator[None]:
    """The series' sampling task lives exactly as long as the admin app."""
    task = asyncio.get_running_loop().create_task(app[SERIES].run(app[CTX].now))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_admin_app(ctx: AdminContext) -> web.Application:
    app = web.Application(middlewares=[_errors, _guard, _auth], client_max_size=1024 * 1024)
    app[CTX] = ctx
    if ctx.stats is not None:
        app[SERIES] = Series(ctx.stats)
        app.cleanup_ctx.append(_sampling)
    r = app.router
    r.add_get("/", _dashboard)
    r.add_get("/healthz", _healthz)
    r.add_get("/readyz", _readyz)
    r.add_get("/metrics", _metrics)
    r.add_get(API + "/routes", _list_routes)
    r.add_get(API + "/routes/{route}", _get_route)
    r.add_put(API + "/routes/{route}/weights", _put_weights)
    r.add_post(API + "/routes/{route}/rollout", _start_rollout)
    r.add_post(API + "/routes/{route}/rollout/{action}", _rollout_action)
    r.add_post(API + "/routes/{route}/rollback", _rollback)
    r.add_get(API + "/events", _events)
    r.add_get(API + "/stats", _stats)
    r.add_post(API + "/reload", _reload)
    r.add_get(API + "/routes/{route}/series", _series)
    r.add_get(API + "/openapi.json", _openapi)
    return app
