"""Tests for proxy/core/config/mirror.py: the route's `mirror:` section, its refusals with
the dotted key, the schema against the loader case by case, the example file, the check
warning; and RoutePolicy.mirror (core/mirror.active_mirror) from config and rollout state."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from typing import Any

import pytest
import yaml

from proxy.core.config.describe import config_warnings, describe
from proxy.core.config.load import load_config, parse_config
from proxy.core.config.mirror import parse_json_path
from proxy.core.config.model import (
    CompareConfig,
    ConfigError,
    MirrorConfig,
    MirrorStep,
    WeightStep,
)
from proxy.core.state import RolloutStatus, compile_route, initial_state
from tests.helpers import ROOT

SCHEMA = ROOT / "proxy" / "core" / "config" / "schema.json"
EXAMPLE = ROOT / "config" / "graygate.example.yaml"


def base(mirror: object) -> dict[str, Any]:
    return {
        "listen": ":8080",
        "routes": [
            {
                "name": "shop",
                "versions": {
                    "blue": {"endpoints": ["http://127.0.0.1:9001"]},
                    "green": {"endpoints": ["http://127.0.0.1:9101"]},
                },
                "stable": "blue",
                "mirror": mirror,
            }
        ],
    }


def parsed(mirror: object) -> MirrorConfig | None:
    return parse_config(base(mirror), {}).routes[0].mirror


def test_defaults_and_absent():
    assert parsed(None) is None
    m = parsed({})
    assert m == MirrorConfig()
    assert (m.to, m.percent, m.methods, m.max_body_bytes, m.max_inflight) == (
        "canary",
        0.0,
        ("GET", "HEAD"),
        0,
        64,
    )
    assert m.compare == CompareConfig()


def test_every_key():
    m = parsed(
        {
            "to": "green",
            "percent": 12.34,
            "methods": ["GET", "POST"],
            "max_body_bytes": "64k",
            "max_inflight": 8,
            "host_suffix": "-shadow",
            "forced": True,
            "timeout": "250ms",
            "noise": "stable",
            "compare": {
                "status": False,
                "headers": ["Content-Type", "ETag"],
                "body": "json",
                "ignore_json_paths": ["$", "$.a.b", "$.items[*].id", "$.x[0]"],
                "ignore_headers": ["Date"],
                "max_json_bytes": "1k",
            },
        }
    )
    assert m == MirrorConfig(
        to="green",
        percent=12.34,
        methods=("GET", "POST"),
        max_body_bytes=65536,
        max_inflight=8,
        host_suffix="-shadow",
        forced=True,
        timeout=0.25,
        noise="stable",
        compare=CompareConfig(
            status=False,
            headers=("content-type", "etag"),
            body="json",
            ignore_json_paths=("$", "$.a.b", "$.items[*].id", "$.x[0]"),
            ignore_headers=("date",),
            max_json_bytes=1024,
        ),
    )


def test_json_paths():
    assert parse_json_path("$") == ()
    assert parse_json_path("$.items[*].id") == ("items", None, "id")
    assert parse_json_path("$.a[12][*]") == ("a", 12, None)
    for bad in ("", "a.b", "$.", "$..a", "$[x]", "$.a[", "$a", "$[-1]"):
        assert parse_json_path(bad) is None, bad


M = ("routes", 0, "mirror")
# (id, mirror section, dotted path, message fragment)
REFUSALS = [
    ("not a mapping", [1], "routes[0].mirror", "must be a mapping"),
    ("unknown key", {"procent": 1}, "routes[0].mirror.procent", "unknown key; allowed: to"),
    ("to unknown", {"to": "red"}, "routes[0].mirror.to", "must be canary or a version"),
    ("to stable role", {"to": "stable"}, "routes[0].mirror.to", "must be canary or a version"),
    ("percent over", {"percent": 101}, "routes[0].mirror.percent", "0..100 in steps of 0.01"),
    ("percent negative", {"percent": -1}, "routes[0].mirror.percent", "0..100"),
    ("percent fine step", {"percent": 0.001}, "routes[0].mirror.percent", "steps of 0.01"),
    ("percent string", {"percent": "5"}, "routes[0].mirror.percent", "must be a number"),
    ("method lowercase", {"methods": ["get"]}, "routes[0].mirror.methods[0]", "uppercase"),
    ("methods not list", {"methods": "GET"}, "routes[0].mirror.methods", "must be a list"),
    ("max_body negative", {"max_body_bytes": -1}, "routes[0].mirror.max_body_bytes", "byte size"),
    ("max_inflight zero", {"max_inflight": 0}, "routes[0].mirror.max_inflight", "must be >= 1"),
    ("host_suffix bad", {"host_suffix": "a b"}, "routes[0].mirror.host_suffix", "host characters"),
    ("forced not bool", {"forced": "yes"}, "routes[0].mirror.forced", "true or false"),
    ("timeout zero", {"timeout": 0}, "routes[0].mirror.timeout", "duration > 0"),
    ("noise unknown", {"noise": "canary"}, "routes[0].mirror.noise", "null or stable"),
    (
        "compare unknown",
        {"compare": {"bodies": "json"}},
        "routes[0].mirror.compare.bodies",
        "unknown key",
    ),
    (
        "compare body",
        {"compare": {"body": "xml"}},
        "routes[0].mirror.compare.body",
        "none, digest, json",
    ),
    (
        "compare header name",
        {"compare": {"headers": ["a b"]}},
        "routes[0].mirror.compare.headers[0]",
        "header name",
    ),
    (
        "json path",
        {"compare": {"ignore_json_paths": ["$.a", "items"]}},
        "routes[0].mirror.compare.ignore_json_paths[1]",
        "JSON path",
    ),
    (
        "ignore header name",
        {"compare": {"ignore_headers": [1]}},
        "routes[0].mirror.compare.ignore_headers[0]",
        "must be a string",
    ),
    (
        "max_json_bytes",
        {"compare": {"max_json_bytes": "lots"}},
        "routes[0].mirror.compare.max_json_bytes",
        "byte size",
    ),
]
# Cross-field or arithmetic: the loader refuses them, the schema cannot say so.
SCHEMA_CANNOT_REFUSE = frozenset({"to unknown", "to stable role", "percent fine step"})


@pytest.mark.parametrize(
    ("mirror", "path", "fragment"), [pytest.param(*r[1:], id=r[0]) for r in REFUSALS]
)
def test_refusal(mirror, path, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(base(mirror), {})
    err = info.value
    assert err.path == path, str(err)
    assert fragment in str(err), str(err)


@pytest.mark.parametrize("case", [pytest.param(r, id=r[0]) for r in REFUSALS])
def test_schema_refuses_what_the_loader_refuses(case):
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    valid = validator.is_valid(base(copy.deepcopy(case[1])))
    if case[0] in SCHEMA_CANNOT_REFUSE:
        assert valid, f"the schema now refuses {case[0]!r}: remove it from SCHEMA_CANNOT_REFUSE"
    else:
        assert not valid, f"the loader refuses {case[0]!r} but the schema accepts it"


def test_schema_accepts_every_key():
    import jsonschema

    example = yaml.safe_load(EXAMPLE.read_text())
    assert "mirror" in example["routes"][0]
    jsonschema.validate(example, json.loads(SCHEMA.read_text()))
    schema_keys = json.loads(SCHEMA.read_text())["$defs"]["mirror"]["anyOf"][1]["properties"]
    assert set(schema_keys) == {f.name for f in dataclasses.fields(MirrorConfig)}
    compare_keys = schema_keys["compare"]["anyOf"][1]["properties"]
    assert set(compare_keys) == {f.name for f in dataclasses.fields(CompareConfig)}


def test_example_file_has_the_mirror_section():
    m = load_config(str(EXAMPLE), env={}).routes[0].mirror
    assert m is not None and m.to == "canary" and m.percent == 0.0
    assert m.compare.ignore_json_paths == ("$.timestamp", "$.request_id")
    assert m.compare.max_json_bytes == 1 << 20


def test_check_warns_on_non_idempotent_methods(tmp_path):
    data = base({"methods": ["GET", "POST", "PATCH", "PUT"], "percent": 5})
    assert config_warnings(parse_config(data, {})) == [
        "routes[0].mirror.methods: mirrors non-idempotent POST, PATCH; the shadow repeats "
        "their side effects unless it honours X-Graygate-Shadow: 1"
    ]
    assert config_warnings(parse_config(base({"percent": 5}), {})) == []
    assert "  mirror: 5% of GET, POST, PATCH, PUT to canary, compare body digest" in describe(
        parse_config(data, {})
    )
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(data))
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "graygate: warning: routes[0].mirror.methods: mirrors non-idempotent" in out.stderr


# --- RoutePolicy.mirror -------------------------------------------------------------------


def route_of(mirror: object, steps: list[object] | None = None):
    data = base(mirror)
    if steps is not None:
        data["routes"][0]["rollout"] = {"steps": steps}
    return parse_config(data, {}).routes[0]


def test_route_mirror_resolves_canary():
    route = route_of({"percent": 10})
    am = compile_route(route, initial_state(route)).mirror
    assert am is not None and (am.to, am.percent, am.step) == ("green", 10.0, False)
    assert compile_route(route_of({"percent": 0}), initial_state(route)).mirror is None
    assert compile_route(route_of(None), initial_state(route)).mirror is None


def test_no_mirror_to_stable():
    route = route_of({"to": "blue", "percent": 10})
    assert compile_route(route, initial_state(route)).mirror is None


def test_mirror_step_overrides_while_progressing():
    route = route_of({"percent": 1, "compare": {"body": "json"}})
    state = initial_state(route)
    steps = (MirrorStep(seconds=600, percent=25), WeightStep(10))
    ro = RolloutStatus(phase="progressing", canary="green", steps=steps, step=0)
    am = compile_route(route, dataclasses.replace(state, rollout=ro)).mirror
    assert am is not None and (am.to, am.percent, am.step) == ("green", 25.0, True)
    assert am.config.compare.body == "json"  # the route's compare rules
    paused = dataclasses.replace(ro, phase="paused")
    am = compile_route(route, dataclasses.replace(state, rollout=paused)).mirror
    assert am is not None and (am.percent, am.step) == (1.0, False)  # the route's own mirror
    later = dataclasses.replace(ro, step=1)
    am = compile_route(route, dataclasses.replace(state, rollout=later)).mirror
    assert am is not None and am.percent == 1.0


def test_mirror_step_without_a_mirror_section_uses_defaults():
    route = route_of(None)
    ro = RolloutStatus(phase="progressing", canary="green", steps=(MirrorStep(60),), step=0)
    am = compile_route(route, dataclasses.replace(initial_state(route), rollout=ro)).mirror
    assert am is not None and am.config == MirrorConfig() and am.percent == 10.0
