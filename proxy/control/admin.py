"""The admin HTTP contract (docs/admin-api.md) on aiohttp: the app factory, its route table,
the probes, metrics, dashboard and OpenAPI pages, and the one middleware that turns errors
into JSON. The /api/v1 handlers live in handlers.py, the access checks in guard.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.control import handlers, openapi, shadows
from proxy.control.api import API, CTX, SERIES, AdminContext, ApiError, error_body, json_response
from proxy.control.guard import bearer_auth, host_guard
from proxy.control.series import Series

logger = logging.getLogger(__name__)

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
        body = error_body(exc.code, exc.message, exc.field)
        if exc.state is not None:
            body["state"] = exc.state.to_json()
        return json_response(body, exc.status)
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
        return json_response(error_body(code, message), exc.status, headers)
    except Exception:
        logger.exception("admin %s %s failed", request.method, request.path)
        return json_response(error_body("internal", "internal error; see the graygate log"), 500)


# ---- probes and pages ----------------------------------------------------------------------------


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[CTX].ready():
        return json_response({"status": "ready"})
    return json_response({"status": "not_ready"}, 503)


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
    app = web.Application(
        middlewares=[_errors, host_guard, bearer_auth], client_max_size=1024 * 1024
    )
    app[CTX] = ctx
    if ctx.stats is not None:
        app[SERIES] = Series(ctx.stats)
        app.cleanup_ctx.append(_sampling)
    r = app.router
    r.add_get("/", _dashboard)
    r.add_get("/healthz", _healthz)
    r.add_get("/readyz", _readyz)
    r.add_get("/metrics", _metrics)
    r.add_get(API + "/routes", handlers.list_routes)
    r.add_get(API + "/routes/{route}", handlers.get_route)
    r.add_put(API + "/routes/{route}/weights", handlers.put_weights)
    r.add_post(API + "/routes/{route}/rollout", handlers.start_rollout)
    r.add_post(API + "/routes/{route}/rollout/{action}", handlers.rollout_action)
    r.add_post(API + "/routes/{route}/rollback", handlers.rollback)
    r.add_get(API + "/events", handlers.list_events)
    r.add_get(API + "/stats", handlers.get_stats)
    r.add_post(API + "/reload", handlers.reload)
    r.add_get(API + "/routes/{route}/series", handlers.get_series)
    r.add_get(API + "/routes/{route}/mirror", shadows.get_mirror)
    r.add_get(API + "/openapi.json", _openapi)
    return app
