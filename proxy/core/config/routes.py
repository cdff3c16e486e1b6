"""Parsing of one route: match, versions, weights, sticky, force rules, outlier
ejection and health checks. Its rollout section is parsed by rollout.py.
"""

from __future__ import annotations

import re
from typing import Literal

from proxy.core.config.mirror import parse_mirror
from proxy.core.config.model import (
    BALANCES,
    ROLES,
    AnalysisConfig,
    CohortSource,
    CookieConfig,
    Endpoint,
    ForceRule,
    HealthCheckConfig,
    Match,
    OutlierConfig,
    RouteConfig,
    StickyConfig,
    VersionConfig,
)
from proxy.core.config.rollout import _rollout
from proxy.core.config.values import (
    _NAME,
    _NAME_HELP,
    _bool,
    _choice,
    _fail,
    _int,
    _is_hostname,
    _key,
    _list,
    _name,
    _positive_duration,
    _str,
    _str_or_empty,
    _table,
    _token,
    parse_endpoint,
)

# --- routes -----------------------------------------------------------------------------------


_ROUTE_KEYS = (
    "name",
    "match",
    "versions",
    "stable",
    "weights",
    "sticky",
    "force",
    "failover",
    "balance",
    "retries",
    "outlier",
    "health_check",
    "rollout",
    "mirror",
)


def _match(value: object, path: str) -> Match:
    t = _table(value, path, ("host", "path_prefix"))
    host = _str(t.get("host", "*"), _key(path, "host")).lower().rstrip(".")
    bare = host[2:] if host.startswith("*.") else host
    if host != "*" and not _is_hostname(bare):
        _fail(
            _key(path, "host"),
            'must be "*", an exact host name ("shop.example.com") or "*.example.com" (no port)',
            t["host"],
        )
    prefix = _str(t.get("path_prefix", "/"), _key(path, "path_prefix"))
    if not prefix.startswith("/") or any(c in prefix for c in "?# \t"):
        _fail(_key(path, "path_prefix"), 'must start with "/" and have no query or spaces', prefix)
    return Match(host=host, path_prefix=prefix)


def _versions(value: object, path: str) -> tuple[VersionConfig, ...]:
    if not isinstance(value, dict):
        _fail(path, "must be a mapping of version name -> {endpoints: [...]}", value)
    if not 1 <= len(value) <= 2:
        _fail(path, f"must name 1 or 2 versions, got {len(value)}: {', '.join(map(str, value))}")
    versions = []
    for name, body in value.items():
        vpath = _key(path, str(name))
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            _fail(vpath, f"version name {_NAME_HELP}", name)
        if name in ROLES:
            _fail(vpath, "canary and stable are role names; name versions e.g. blue and green")
        t = _table(body, vpath, ("endpoints",), ("endpoints",))
        epath = _key(vpath, "endpoints")
        items = _list(t["endpoints"], epath, 'URLs like "http://127.0.0.1:9001"')
        if not items:
            _fail(epath, "must list at least one endpoint")
        endpoints: list[Endpoint] = []
        for i, item in enumerate(items):
            ep = parse_endpoint(item, f"{epath}[{i}]")
            if any((e.host, e.port) == (ep.host, ep.port) for e in endpoints):
                _fail(f"{epath}[{i}]", "duplicate endpoint", item)
            endpoints.append(ep)
        versions.append(VersionConfig(name=name, endpoints=tuple(endpoints)))
    return tuple(versions)


def _weights(
    value: object, path: str, names: tuple[str, ...], stable: str
) -> tuple[tuple[str, int], ...]:
    if value is None:
        return tuple((n, 100 if n == stable else 0) for n in names)
    return parse_weights(value, path, names)


def parse_weights(value: object, path: str, names: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """Weights for every version (integers 0..100 summing to 100), in `names` order. The one
    rule for the config file, the admin API and stored states; errors name `path.version`."""
    if not isinstance(value, dict):
        _fail(path, f"must be a mapping of version -> percent for {', '.join(names)}", value)
    for k in value:
        if k not in names:
            _fail(_key(path, str(k)), f"unknown version; versions: {', '.join(names)}")
    weights = []
    for n in names:
        if n not in value:
            _fail(_key(path, n), f"missing weight for version {n}; give every version a weight")
        weights.append((n, _int(value[n], _key(path, n), 0, 100)))
    total = sum(w for _, w in weights)
    if total != 100:
        _fail(path, "weights must sum to 100", total)
    return tuple(weights)


def _cohort_source(value: object, path: str) -> CohortSource:
    text = _str(value, path)
    kind, sep, name = text.partition(":")
    if not sep or kind not in ("header", "cookie") or not name:
        _fail(path, 'must be "header:<Name>" or "cookie:<name>"', value)
    if kind == "header":
        return CohortSource("header", _token(name, path, "header name").lower())
    return CohortSource("cookie", _token(name, path, "cookie name"))


def _sticky(value: object, path: str) -> StickyConfig | None:
    if value is None or value is False:
        return None
    if value is True:
        return StickyConfig()
    t = _table(value, path, ("keys", "cookie", "salt"))
    kpath = _key(path, "keys")
    keys = tuple(
        _cohort_source(item, f"{kpath}[{i}]")
        for i, item in enumerate(_list(t.get("keys", []), kpath, '"header:X" / "cookie:y" keys'))
    )
    cpath = _key(path, "cookie")
    c = _table(t.get("cookie"), cpath, ("name", "max_age", "secure", "path"))
    d = CookieConfig()
    cookie_path = _str(c.get("path", d.path), _key(cpath, "path"))
    if not cookie_path.startswith("/") or ";" in cookie_path:
        _fail(_key(cpath, "path"), 'must start with "/" and contain no ";"', cookie_path)
    cookie = CookieConfig(
        name=_token(c.get("name", d.name), _key(cpath, "name"), "cookie name"),
        max_age=_positive_duration(c.get("max_age", d.max_age), _key(cpath, "max_age")),
        secure=_bool(c.get("secure", d.secure), _key(cpath, "secure")),
        path=cookie_path,
    )
    salt = _str_or_empty(t.get("salt", ""), _key(path, "salt"))
    return StickyConfig(keys=keys, cookie=cookie, salt=salt)


def _force(value: object, path: str, names: tuple[str, ...]) -> tuple[ForceRule, ...]:
    rules = []
    allowed_to = (*names, *ROLES)
    for i, item in enumerate(_list(value, path, "rules {header|cookie, value|regex, to}")):
        p = f"{path}[{i}]"
        t = _table(item, p, ("header", "cookie", "value", "regex", "to"), ("to",))
        if ("header" in t) == ("cookie" in t):
            _fail(p, "set exactly one of header or cookie")
        if ("value" in t) == ("regex" in t):
            _fail(p, "set exactly one of value or regex")
        kind: Literal["header", "cookie"] = "header" if "header" in t else "cookie"
        name = _token(t[kind], _key(p, kind), f"{kind} name")
        value_: str | None = None
        regex: str | None = None
        if "value" in t:
            value_ = _str(t["value"], _key(p, "value"))
        else:
            regex = _str(t["regex"], _key(p, "regex"))
            try:
                re.compile(regex)
            except re.error as exc:
                _fail(_key(p, "regex"), f"invalid regular expression: {exc}", regex)
        to = t["to"]
        if not isinstance(to, str) or to not in allowed_to:
            _fail(_key(p, "to"), f"must be one of {', '.join(allowed_to)}", to)
        rules.append(
            ForceRule(
                kind=kind,
                name=name.lower() if kind == "header" else name,
                value=value_,
                regex=regex,
                to=to,
            )
        )
    return tuple(rules)


def _outlier(value: object, path: str) -> OutlierConfig:
    t = _table(value, path, ("consecutive_failures", "base_ejection", "max_ejection"))
    d = OutlierConfig()
    base = _positive_duration(t.get("base_ejection", d.base_ejection), _key(path, "base_ejection"))
    top = _positive_duration(t.get("max_ejection", d.max_ejection), _key(path, "max_ejection"))
    if top < base:
        _fail(
            _key(path, "max_ejection"), f"must be >= base_ejection ({base:g}s)", t["max_ejection"]
        )
    return OutlierConfig(
        consecutive_failures=_int(
            t.get("consecutive_failures", d.consecutive_failures),
            _key(path, "consecutive_failures"),
            1,
        ),
        base_ejection=base,
        max_ejection=top,
    )


def _health_check(value: object, path: str) -> HealthCheckConfig | None:
    if value is None:
        return None
    t = _table(value, path, ("path", "interval", "timeout"), ("path",))
    probe = _str(t["path"], _key(path, "path"))
    if not probe.startswith("/") or any(c.isspace() for c in probe):
        _fail(_key(path, "path"), 'must start with "/" and contain no spaces', probe)
    return HealthCheckConfig(
        path=probe,
        interval=_positive_duration(t.get("interval", 10.0), _key(path, "interval")),
        timeout=_positive_duration(t.get("timeout", 2.0), _key(path, "timeout")),
    )


def _route(value: object, path: str, inherited: AnalysisConfig | None = None) -> RouteConfig:
    t = _table(value, path, _ROUTE_KEYS, ("name", "versions"))
    name = _name(t["name"], _key(path, "name"))
    versions = _versions(t["versions"], _key(path, "versions"))
    names = tuple(v.name for v in versions)
    if "stable" in t:
        stable = t["stable"]
        if not isinstance(stable, str) or stable not in names:
            _fail(_key(path, "stable"), f"must be one of the versions: {', '.join(names)}", stable)
    elif len(names) == 1:
        stable = names[0]
    else:
        _fail(_key(path, "stable"), f"is required with two versions; one of {', '.join(names)}")
    return RouteConfig(
        name=name,
        match=_match(t.get("match"), _key(path, "match")),
        versions=versions,
        stable=stable,
        weights=_weights(t.get("weights"), _key(path, "weights"), names, stable),
        sticky=_sticky(t.get("sticky"), _key(path, "sticky")),
        force=_force(t.get("force", []), _key(path, "force"), names),
        failover=_bool(t.get("failover", False), _key(path, "failover")),
        balance=_choice(
            t.get("balance", "least_request"),
            _key(path, "balance"),
            BALANCES,
        ),
        retries=_int(t.get("retries", 1), _key(path, "retries"), 0),
        outlier=_outlier(t.get("outlier"), _key(path, "outlier")),
        health_check=_health_check(t.get("health_check"), _key(path, "health_check")),
        rollout=_rollout(t.get("rollout"), _key(path, "rollout"), inherited),
        mirror=parse_mirror(t.get("mirror"), _key(path, "mirror"), names),
    )
