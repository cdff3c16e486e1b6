"""Route and config builders: route_config is the dict graygate's YAML holds (before
parse_config), route_model the parsed RouteConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from proxy.core.config.model import (
    Endpoint,
    ForceRule,
    Match,
    RouteConfig,
    StickyConfig,
    VersionConfig,
)
from tests.helpers.net import free_port


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


class ConfigFile:
    """A config file for `graygate serve` on free loopback ports, as graygate.yaml in
    `directory` (state in state.json beside it); `top` adds or replaces top-level keys."""

    def __init__(self, directory: Path, routes: list[dict[str, Any]], **top: Any) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.path = directory / "graygate.yaml"
        self.state_path = directory / "state.json"
        self.data: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "state": {"path": str(self.state_path)},
            "grace_period": "5s",
            "routes": routes,
            **top,
        }
        self.write()

    def write(self, data: dict[str, Any] | None = None) -> None:
        self.path.write_text(yaml.safe_dump(data if data is not None else self.data))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


ENDPOINT = Endpoint("http://127.0.0.1:9", "127.0.0.1", 9)


def route_model(
    name: str = "shop",
    *,
    host: str = "*",
    prefix: str = "/",
    versions: tuple[str, ...] = ("blue", "green"),
    weights: tuple[int, ...] = (100, 0),
    stable: str = "blue",
    sticky: StickyConfig | None = None,
    force: tuple[ForceRule, ...] = (),
) -> RouteConfig:
    """A parsed route (RouteConfig) without the loader, every version on one endpoint."""
    return RouteConfig(
        name=name,
        match=Match(host=host, path_prefix=prefix),
        versions=tuple(VersionConfig(v, (ENDPOINT,)) for v in versions),
        stable=stable,
        weights=tuple(zip(versions, weights, strict=True)),
        sticky=sticky,
        force=force,
    )
