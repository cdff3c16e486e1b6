"""Route and config builders: the dicts graygate's YAML holds, before parse_config."""

from __future__ import annotations

from typing import Any


def route_config(
    blue: str | list[str], green: str | list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    versions: dict[str, Any] = {"blue": {"endpoints": [blue] if isinstance(blue, str) else blue}}
    weights = {"blue": 100}
    if green is not None:
        versions["green"] = {"endpoints": [green] if isinstance(green, str) else green}
        weights["green"] = 0
    route: dict[str, Any] = {
        "name": "shop",
        "match": {"host": "*", "path_prefix": "/"},
        "versions": versions,
        "stable": "blue",
        "weights": weights,
    }
    route.update(extra)
    return route
