"""Parsing of a route's `mirror:` section (shadow copies and their comparison) and the
JSON path syntax of `compare.ignore_json_paths`: `$`, `.key`, `[N]`, `[*]`.
"""

from __future__ import annotations

import math
import re

from proxy.core.config.model import COMPARE_BODIES, CompareConfig, MirrorConfig
from proxy.core.config.values import (
    _bool,
    _choice,
    _fail,
    _int,
    _key,
    _list,
    _number,
    _positive_duration,
    _str,
    _table,
    _token,
    parse_size,
)

_MIRROR_KEYS = (
    "to",
    "percent",
    "methods",
    "max_body_bytes",
    "max_inflight",
    "host_suffix",
    "forced",
    "timeout",
    "noise",
    "compare",
)
_COMPARE_KEYS = (
    "status",
    "headers",
    "body",
    "ignore_json_paths",
    "ignore_headers",
    "max_json_bytes",
)
# RFC 9110 9.2.2: the methods a shadow may repeat without a side effect of its own.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]{0,31}")
_HOST_SUFFIX = re.compile(r"[A-Za-z0-9_.-]{1,63}")
_JSON_STEP = re.compile(r"\.([^.\[\]]+)|\[(\*|\d+)\]")
_JSON_PATH_HELP = 'must be a JSON path like "$", "$.a.b", "$.items[0]" or "$.items[*].id"'

JsonStep = str | int | None  # a key, an index, or None for [*]


def parse_json_path(text: str) -> tuple[JsonStep, ...] | None:
    """The steps of a path ("$.items[*].id" -> ("items", None, "id")), or None when the
    text is not one.

    >>> parse_json_path("$.a[2][*]")
    ('a', 2, None)
    """
    if not text.startswith("$"):
        return None
    steps: list[JsonStep] = []
    at = 1
    while at < len(text):
        m = _JSON_STEP.match(text, at)
        if m is None:
            return None
        key, index = m.groups()
        steps.append(key if key is not None else None if index == "*" else int(index))
        at = m.end()
    return tuple(steps)


def _percent(value: object, path: str) -> float:
    p = _number(value, path, "0..100 in steps of 0.01")
    if not 0.0 <= p <= 100.0 or not math.isclose(p * 100, round(p * 100), abs_tol=1e-6):
        _fail(path, "must be 0..100 in steps of 0.01", value)
    return round(p, 2)


def _names(value: object, path: str, what: str) -> tuple[str, ...]:
    items = _list(value, path, what)
    return tuple(_token(v, f"{path}[{i}]", "header name").lower() for i, v in enumerate(items))


def _compare(value: object, path: str) -> CompareConfig:
    t = _table(value, path, _COMPARE_KEYS)
    d = CompareConfig()
    jpath = _key(path, "ignore_json_paths")
    ignore: list[str] = []
    for i, item in enumerate(_list(t.get("ignore_json_paths", []), jpath, "JSON paths")):
        text = _str(item, f"{jpath}[{i}]")
        if parse_json_path(text) is None:
            _fail(f"{jpath}[{i}]", _JSON_PATH_HELP, item)
        ignore.append(text)
    return CompareConfig(
        status=_bool(t.get("status", d.status), _key(path, "status")),
        headers=_names(t.get("headers", list(d.headers)), _key(path, "headers"), "header names"),
        body=_choice(t.get("body", d.body), _key(path, "body"), COMPARE_BODIES),
        ignore_json_paths=tuple(ignore),
        ignore_headers=_names(t.get("ignore_headers", []), _key(path, "ignore_headers"), "names"),
        max_json_bytes=parse_size(
            t.get("max_json_bytes", d.max_json_bytes), _key(path, "max_json_bytes")
        ),
    )


def parse_mirror(value: object, path: str, versions: tuple[str, ...]) -> MirrorConfig | None:
    """A route's `mirror:` section; null (or absent) is no mirroring."""
    if value is None:
        return None
    t = _table(value, path, _MIRROR_KEYS)
    d = MirrorConfig()
    to = t.get("to", d.to)
    if not isinstance(to, str) or (to != "canary" and to not in versions):
        _fail(_key(path, "to"), f"must be canary or a version: {', '.join(versions)}", to)
    mpath = _key(path, "methods")
    methods: list[str] = []
    for i, item in enumerate(_list(t.get("methods", list(d.methods)), mpath, "HTTP methods")):
        if not isinstance(item, str) or not _METHOD.fullmatch(item):
            _fail(f"{mpath}[{i}]", "must be an uppercase HTTP method (GET, HEAD, POST...)", item)
        methods.append(item)
    suffix = t.get("host_suffix")
    if suffix is not None and (not isinstance(suffix, str) or not _HOST_SUFFIX.fullmatch(suffix)):
        _fail(_key(path, "host_suffix"), 'must be null or host characters like "-shadow"', suffix)
    noise = t.get("noise")
    if noise is not None and noise != "stable":
        _fail(_key(path, "noise"), "must be null or stable", noise)
    return MirrorConfig(
        to=to,
        percent=_percent(t.get("percent", d.percent), _key(path, "percent")),
        methods=tuple(methods),
        max_body_bytes=parse_size(
            t.get("max_body_bytes", d.max_body_bytes), _key(path, "max_body_bytes")
        ),
        max_inflight=_int(t.get("max_inflight", d.max_inflight), _key(path, "max_inflight"), 1),
        host_suffix=suffix,
        forced=_bool(t.get("forced", d.forced), _key(path, "forced")),
        timeout=_positive_duration(t.get("timeout", d.timeout), _key(path, "timeout")),
        noise="stable" if noise == "stable" else None,
        compare=_compare(t.get("compare"), _key(path, "compare")),
    )


def mirror_warnings(mirror: MirrorConfig | None, path: str) -> list[str]:
    """What `graygate check` warns about (the config stays valid)."""
    if mirror is None:
        return []
    risky = [m for m in mirror.methods if m not in IDEMPOTENT_METHODS]
    if not risky:
        return []
    return [
        f"{path}.methods: mirrors non-idempotent {', '.join(risky)}; the shadow repeats their "
        "side effects unless it honours X-Graygate-Shadow: 1"
    ]
