"""Shadow traffic in the admin API: GET /api/v1/routes/{route}/mirror, the mirror in force,
the route's `mirror:` config, the counters per shadow version and the last mismatches with
their compact diff. Reads core.mirror.Mirrors; changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from proxy.control.api import CTX, ApiError, json_response
from proxy.core.mirror import Mirrors
from proxy.core.state import RoutePolicy


def mirror_view(rp: RoutePolicy, mirrors: Mirrors | None) -> dict[str, Any]:
    active = rp.mirror
    counts: dict[str, dict[str, int]] = {}
    dropped: dict[str, dict[str, int]] = {}
    recent: list[dict[str, object]] = []
    if mirrors is not None:
        for version in rp.config.version_names:
            ms = mirrors.get(rp.name, version)
            counts[version] = {str(k): n for k, n in ms.results.items()}
            dropped[version] = {str(k): n for k, n in ms.dropped.items()}
        recent = [m.to_json() for m in mirrors.recent(rp.name)]
    config = rp.config.mirror
    return {
        "route": rp.name,
        "active": (
            None
            if active is None
            else {"to": active.to, "percent": active.percent, "step": active.step}
        ),
        "config": None if config is None else dataclasses.asdict(config),
        "counts": counts,
        "dropped": dropped,
        "recent": recent,
    }


async def get_mirror(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    name = request.match_info["route"]
    rp = ctx.store.policy.by_name.get(name)
    if rp is None:
        raise ApiError(404, "not_found", f"no route named {name!r}", "route")
    return json_response(mirror_view(rp, ctx.mirrors))
