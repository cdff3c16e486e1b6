"""Entry points: parse_config (a loaded tree -> Config, with ${ENV}) and load_config
(a YAML file, duplicate keys refused). The one module of the package that reads YAML.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import yaml

from proxy.core.config.model import FORWARDED_FOR, Config, ConfigError, RouteConfig
from proxy.core.config.rollout import _global_source
from proxy.core.config.routes import _route
from proxy.core.config.sections import (
    _admin,
    _limits,
    _listen,
    _notifications,
    _state,
    _timeouts,
    _trusted_proxies,
    _upgrades,
    _version_header,
)
from proxy.core.config.values import (
    _bool,
    _choice,
    _expand,
    _fail,
    _int,
    _list,
    _table,
    _token,
    parse_duration,
)

# --- entry points ------------------------------------------------------------------------------


_TOP_KEYS = (
    "listen",
    "admin",
    "state",
    "timeouts",
    "limits",
    "trusted_proxies",
    "forwarded_for",
    "version_header",
    "via",
    "grace_period",
    "workers",
    "access_log",
    "notifications",
    "upgrades",
    "analysis",
    "routes",
)


def parse_config(
    data: object, env: Mapping[str, str] | None = None, source: str | None = None
) -> Config:
    """Validate a loaded YAML tree into a Config; `env` (default os.environ) feeds ${VAR}."""
    if data is None:
        _fail("", "the config is empty; at least `routes` is required")
    tree = _table(data, "", _TOP_KEYS, ("routes",))
    tree = _table(_expand(tree, os.environ if env is None else env, ""), "", _TOP_KEYS)
    d = Config()
    route_items = _list(tree["routes"], "routes", "routes")
    if not route_items:
        _fail("routes", "must list at least one route")
    routes: list[RouteConfig] = []
    inherited = _global_source(tree.get("analysis"), "analysis")
    for i, item in enumerate(route_items):
        route = _route(item, f"routes[{i}]", inherited)
        for j, other in enumerate(routes):
            if other.name == route.name:
                _fail(
                    f"routes[{i}].name", f"duplicate route name (also routes[{j}].name)", route.name
                )
        routes.append(route)
    via = _token(tree.get("via", d.via), "via", "Via pseudonym")
    listen, listen_tls = _listen(tree["listen"], "listen") if "listen" in tree else (d.listen, None)
    return Config(
        listen=listen,
        listen_tls=listen_tls,
        admin=_admin(tree.get("admin"), "admin"),
        state=_state(tree.get("state"), "state"),
        timeouts=_timeouts(tree.get("timeouts"), "timeouts"),
        limits=_limits(tree.get("limits"), "limits"),
        trusted_proxies=_trusted_proxies(tree.get("trusted_proxies", []), "trusted_proxies"),
        forwarded_for=_choice(
            tree.get("forwarded_for", d.forwarded_for), "forwarded_for", FORWARDED_FOR
        ),
        version_header=_version_header(
            tree.get("version_header", d.version_header), "version_header"
        ),
        via=via,
        grace_period=parse_duration(tree.get("grace_period", d.grace_period), "grace_period"),
        workers=_workers(tree.get("workers", d.workers), "workers"),
        access_log=_bool(tree.get("access_log", d.access_log), "access_log"),
        notifications=_notifications(tree.get("notifications"), "notifications"),
        upgrades=_upgrades(tree.get("upgrades", list(d.upgrades)), "upgrades"),
        routes=tuple(routes),
        source=source,
    )


def _workers(value: object, path: str) -> int:
    """`auto`: one worker per CPU this process may run on (its affinity mask, as nginx's
    `worker_processes auto`), resolved here so `graygate check` shows the number."""
    if value == "auto":
        return max(1, min(256, len(os.sched_getaffinity(0))))
    if isinstance(value, str):
        _fail(path, "must be an integer 1..256 or auto", value)
    return _int(value, path, 1, 256)


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[object, object]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: construct_mapping below reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError("", f"cannot read config file {path}: {reason}") from exc
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = path
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"{path}:{mark.line + 1}:{mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("", f"{where}: invalid YAML: {problem}") from exc
    return parse_config(data, env, source=path)
