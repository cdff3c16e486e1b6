"""What every admin module shares: AdminContext and its app keys, ApiError (the answer a
handler raises) and the JSON answers. No routes, no handlers, no middleware.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client.registry import CollectorRegistry

from proxy.control.series import Series
from proxy.control.store.events import EventLog, json_safe
from proxy.control.store.writer import StateWriter
from proxy.core.mirror import Mirrors
from proxy.core.state import PolicyStore, RouteState
from proxy.core.stats import Stats

API = "/api/v1"


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
    mirrors: Mirrors | None = None  # shadow counters and mismatches (GET .../mirror)


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


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=json.dumps(json_safe(data), allow_nan=False),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def etag(state: RouteState) -> dict[str, str]:
    return {"ETag": f'"{state.revision}"'}
