"""Tests for proxy/core/config/: the example files, every refusal with its dotted path,
${ENV} expansion, durations and sizes, load_config errors and describe()."""

from __future__ import annotations

import copy
import ipaddress
import json
from typing import Any

import pytest

from proxy.core.config.describe import describe
from proxy.core.config.load import load_config, parse_config
from proxy.core.config.model import (
    Address,
    CohortSource,
    ConfigError,
    CookieConfig,
    PauseStep,
    PrometheusConfig,
    StickyConfig,
    WeightStep,
)
from proxy.core.config.values import parse_duration, parse_size
from tests.helpers import ROOT

EXAMPLE = ROOT / "config" / "graygate.example.yaml"
DEMO = ROOT / "config" / "demo.yaml"
SCHEMA = ROOT / "proxy" / "core" / "config" / "schema.json"


def base() -> dict[str, Any]:
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
                "weights": {"blue": 90, "green": 10},
            }
        ],
    }


def refused(data: object, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env or {})
    return info.value


def route(data: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return data["routes"][i]


# --- the shipped files ----------------------------------------------------------------------


def test_example_file_parses_every_key():
    cfg = load_config(str(EXAMPLE), env={})
    assert cfg.source == str(EXAMPLE)
    assert cfg.listen == Address("0.0.0.0", 8080)
    assert cfg.admin.listen == Address("127.0.0.1", 9901)
    assert cfg.admin.token is None  # ${GRAYGATE_ADMIN_TOKEN:-} with the variable unset
    assert cfg.limits.max_header_bytes == 65536
    assert cfg.timeouts.client_write == 60.0
    assert cfg.upgrades == ("websocket",)
    assert cfg.trusted_proxies == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
    assert cfg.forwarded_for == "append"
    assert cfg.admin.allowed_hosts == ("graygate.internal",)
    r = cfg.routes[0]
    assert r.version_names == ("blue", "green")
    assert r.weights == (("blue", 100), ("green", 0))
    assert r.sticky is not None
    assert r.sticky.keys == (CohortSource("header", "x-user-id"), CohortSource("cookie", "session"))
    assert r.force[0].name == "x-canary"
    assert r.force[3].regex == "qa-.*"
    assert r.health_check is not None and r.health_check.path == "/healthz"
    assert r.outlier.max_ejection == 300.0
    assert PauseStep(None) in r.rollout.steps and PauseStep(600.0) in r.rollout.steps
    assert r.rollout.analysis.max_p99_latency == 0.5


def test_example_file_token_from_env():
    cfg = load_config(str(EXAMPLE), env={"GRAYGATE_ADMIN_TOKEN": "s3cret"})
    assert cfg.admin.token == "s3cret"


def test_demo_file():
    cfg = load_config(str(DEMO), env={})
    assert str(cfg.listen) == "127.0.0.1:8080"
    assert str(cfg.admin.listen) == "127.0.0.1:9901"
    assert cfg.state.path == "./graygate-state.json"
    (r,) = cfg.routes
    assert r.name == "demo" and r.match.host == "*" and r.match.path_prefix == "/"
    assert [e.url for e in r.version("blue").endpoints] == ["http://127.0.0.1:9001"]
    assert [e.port for e in r.version("green").endpoints] == [9002]
    assert r.stable == "blue"
    assert r.weights == (("blue", 90), ("green", 10))
    assert r.sticky is not None and r.sticky.cookie.name == "gg_uid"
    assert CohortSource("header", "x-user-id") in r.sticky.keys
    assert [(f.kind, f.name, f.value, f.to) for f in r.force] == [
        ("header", "x-canary", "always", "canary"),
        ("header", "x-canary", "never", "stable"),
        ("cookie", "canary", "always", "canary"),
    ]
    assert r.rollout.steps == tuple(WeightStep(w) for w in (10, 25, 50, 100))
    assert r.rollout.interval == 10.0
    assert r.rollout.analysis.min_samples == 50


def test_schema_is_json_with_the_parsers_top_level_keys():
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    # The parser names its allowed keys in the unknown-key error; the schema must list the same.
    err = refused({**base(), "bogus": 1})
    allowed = err.message.split("allowed: ")[1].split(", ")
    assert set(schema["properties"]) == set(allowed)
    route_allowed = refused(_with(base(), lambda d: route(d).update(x=1))).message
    assert set(schema["$defs"]["route"]["properties"]) == set(
        route_allowed.split("allowed: ")[1].split(", ")
    )


def test_schema_validates_example_files():
    import jsonschema  # a test dependency (pyproject.toml)
    import yaml

    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    files = sorted((ROOT / "config").glob("*.yaml"))
    assert EXAMPLE in files and DEMO in files
    for path in files:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


# --- defaults -----------------------------------------------------------------------------------


def test_minimal_config_defaults():
    cfg = parse_config(
        {"routes": [{"name": "a", "versions": {"v1": {"endpoints": ["http://h"]}}}]}, {}
    )
    assert cfg.listen == Address("0.0.0.0", 8080)
    (r,) = cfg.routes
    assert r.stable == "v1" and r.weights == (("v1", 100),)
    assert r.version("v1").endpoints[0].port == 80
    assert r.sticky is None
    assert r.rollout.steps[-1] == WeightStep(100)
    assert cfg.version_header == "X-Graygate-Version"


def test_missing_weights_gives_stable_everything():
    d = base()
    del route(d)["weights"]
    route(d)["stable"] = "green"
    assert parse_config(d, {}).routes[0].weights == (("blue", 0), ("green", 100))


@pytest.mark.parametrize("value", [{}, True, None])
def test_sticky_defaults(value):
    d = base()
    route(d)["sticky"] = value
    sticky = parse_config(d, {}).routes[0].sticky
    if value is None:
        assert sticky is None
    else:
        assert sticky == StickyConfig()
        assert sticky.cookie == CookieConfig(name="gg_uid", max_age=30 * 86400.0)


def test_listen_forms_and_lowercase_hosts():
    d = base()
    d["listen"] = "[::1]:8081"
    d["admin"] = {"listen": "localhost:0"}
    route(d)["match"] = {"host": "*.Example.COM", "path_prefix": "/api"}
    route(d)["versions"]["blue"]["endpoints"] = ["http://[::1]:9001/", "http://Backend.local"]
    cfg = parse_config(d, {})
    assert cfg.listen == Address("::1", 8081) and str(cfg.listen) == "[::1]:8081"
    assert cfg.admin.listen == Address("localhost", 0)
    assert cfg.routes[0].match.host == "*.example.com"
    eps = cfg.routes[0].version("blue").endpoints
    assert (eps[0].url, eps[0].host, eps[0].port) == ("http://[::1]:9001", "::1", 9001)
    assert (eps[1].host, eps[1].port) == ("backend.local", 80)


def test_forwarded_for_and_allowed_hosts():
    cfg = parse_config(base(), {})
    assert cfg.forwarded_for == "append"
    assert cfg.admin.allowed_hosts == ()
    d = {
        **base(),
        "forwarded_for": "replace",
        "admin": {"allowed_hosts": ["Graygate.Internal.", "10.0.0.5", "[FD00::1]", "fd00::2", "*"]},
    }
    cfg = parse_config(d, {})
    assert cfg.forwarded_for == "replace"
    # Compared as the Host header's name part: lowercase, no trailing dot, brackets kept.
    assert cfg.admin.allowed_hosts == (
        "graygate.internal",
        "10.0.0.5",
        "[fd00::1]",
        "[fd00::2]",
        "*",
    )


def test_version_header_can_be_disabled():
    assert parse_config({**base(), "version_header": None}, {}).version_header is None
    assert parse_config({**base(), "version_header": False}, {}).version_header is None
    assert parse_config({**base(), "version_header": "X-V"}, {}).version_header == "X-V"


def test_limits_and_timeouts():
    d = {
        **base(),
        "limits": {"max_header_bytes": "32k", "max_body_bytes": "1m", "max_pending": 0},
        "timeouts": {"connect": "250ms", "request": 5},
        "grace_period": "1m30s",
    }
    cfg = parse_config(d, {})
    assert cfg.limits.max_header_bytes == 32768 and cfg.limits.max_body_bytes == 1 << 20
    assert cfg.timeouts.connect == 0.25 and cfg.timeouts.request == 5.0
    assert cfg.timeouts.read == 30.0  # untouched default
    assert cfg.grace_period == 90.0


def test_upgrades_allow_list():
    assert parse_config(base(), {}).upgrades == ("websocket",)
    cfg = parse_config({**base(), "upgrades": ["WebSocket", "websocket"]}, {})
    assert cfg.upgrades == ("websocket",)  # lowercase, once
    assert parse_config({**base(), "upgrades": []}, {}).upgrades == ()


def test_client_write_timeout():
    # A reader that stops for good is cut after this; at least a minute by default.
    assert parse_config(base(), {}).timeouts.client_write == 60.0
    cfg = parse_config({**base(), "timeouts": {"client_write": "2m"}}, {})
    assert cfg.timeouts.client_write == 120.0


def test_admin_token_file(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("  abc123\n")
    cfg = parse_config({**base(), "admin": {"token_file": str(secret)}}, {})
    assert cfg.admin.token == "abc123"
    err = refused({**base(), "admin": {"token_file": str(tmp_path / "missing")}})
    assert err.path == "admin.token_file" and "cannot read" in err.message


def test_empty_token_is_none():
    assert parse_config({**base(), "admin": {"token": ""}}, {}).admin.token is None


# --- ${ENV} expansion ------------------------------------------------------------------------


def test_env_expansion_everywhere():
    d = base()
    d["admin"] = {"token": "${TOK}"}
    route(d)["versions"]["blue"]["endpoints"] = ["http://${HOST}:${PORT:-9001}"]
    route(d)["force"] = [{"header": "X-${H:-Canary}", "value": "a$${b}", "to": "canary"}]
    cfg = parse_config(d, {"TOK": "t0k", "HOST": "10.1.2.3"})
    assert cfg.admin.token == "t0k"
    assert cfg.routes[0].version("blue").endpoints[0].url == "http://10.1.2.3:9001"
    assert cfg.routes[0].force[0].name == "x-canary"
    assert cfg.routes[0].force[0].value == "a${b}"


def test_env_default_applies_to_empty_variable():
    d = {**base(), "listen": "${LISTEN:-127.0.0.1:7000}"}
    assert str(parse_config(d, {"LISTEN": ""}).listen) == "127.0.0.1:7000"


def test_env_undefined_names_key_and_variable():
    d = base()
    route(d)["versions"]["green"]["endpoints"] = ["http://${GREEN_HOST}:80"]
    err = refused(d)
    assert err.path == "routes[0].versions.green.endpoints[0]"
    assert "GREEN_HOST" in err.message and "not set" in err.message


def test_env_malformed_reference():
    assert "unclosed" in refused({**base(), "via": "a${B"}).message
    assert "malformed" in refused({**base(), "via": "${1X}"}).message


def test_env_defaults_to_process_environment(monkeypatch):
    monkeypatch.setenv("GG_TEST_VIA", "edge")
    assert parse_config({**base(), "via": "${GG_TEST_VIA}"}).via == "edge"


# --- durations and sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (0.5, 0.5),
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("30d", 2592000.0),
        ("1h30m", 5400.0),
        ("45", 45.0),
        (0, 0.0),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("value", [-1, "-2s", "2 parsecs", "s", "", True, None, [1], "1.2.3s"])
def test_parse_duration_refuses(value):
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "timeouts.read")
    assert info.value.path == "timeouts.read"
    assert "duration" in info.value.message


@pytest.mark.parametrize(
    ("value", "size"), [(65536, 65536), ("65536", 65536), ("64k", 65536), ("1m", 1 << 20)]
)
def test_parse_size(value, size):
    assert parse_size(value, "x") == size


@pytest.mark.parametrize("value", [-1, "64q", True, 1.5, "k"])
def test_parse_size_refuses(value):
    with pytest.raises(ConfigError, match="byte size"):
        parse_size(value, "limits.max_body_bytes")


# --- refusals ----------------------------------------------------------------------------------


def _with(data: dict[str, Any], change) -> dict[str, Any]:
    data = copy.deepcopy(data)
    change(data)
    return data


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(d):
        target = d
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return change


def _del(*keys):
    def change(d):
        target = d
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]

    return change


R = ("routes", 0)

REFUSALS = [
    # (id, change, dotted path, message fragment)
    ("unknown top key", _set("lisen", ":1"), "lisen", "unknown key; allowed: listen, admin"),
    ("unknown route key", _set(*R, "wieghts", {}), "routes[0].wieghts", "allowed: name, match"),
    ("unknown nested key", _set("timeouts", {"conect": 1}), "timeouts.conect", "connect, read"),
    (
        "weight range",
        _set(*R, "weights", {"blue": -20, "green": 120}),
        "routes[0].weights.blue",
        "must be 0..100",
    ),
    (
        "weight bool",
        _set(*R, "weights", {"blue": True, "green": 0}),
        "routes[0].weights.blue",
        "must be an integer 0..100",
    ),
    (
        "weight float",
        _set(*R, "weights", {"blue": 90.0, "green": 10}),
        "routes[0].weights.blue",
        "must be an integer",
    ),
    (
        "weights sum",
        _set(*R, "weights", {"blue": 90, "green": 20}),
        "routes[0].weights",
        "must sum to 100, got 110",
    ),
    (
        "weights missing version",
        _set(*R, "weights", {"blue": 100}),
        "routes[0].weights.green",  # the missing key itself, as the API reports it
        "missing weight for version green",
    ),
    (
        "weights unknown version",
        _set(*R, "weights", {"blue": 90, "green": 5, "red": 5}),
        "routes[0].weights.red",
        "unknown version; versions: blue, green",
    ),
    (
        "three versions",
        _set(*R, "versions", {n: {"endpoints": ["http://h"]} for n in "abc"}),
        "routes[0].versions",
        "1 or 2 versions, got 3",
    ),
    ("zero versions", _set(*R, "versions", {}), "routes[0].versions", "1 or 2 versions"),
    (
        "reserved version name",
        _set(*R, "versions", {"canary": {"endpoints": ["http://h"]}}),
        "routes[0].versions.canary",
        "role names",
    ),
    (
        "stable unknown",
        _set(*R, "stable", "red"),
        "routes[0].stable",
        "must be one of the versions: blue, green",
    ),
    ("stable missing", _del(*R, "stable"), "routes[0].stable", "is required with two versions"),
    (
        "force to unknown",
        _set(*R, "force", [{"header": "X-C", "value": "1", "to": "red"}]),
        "routes[0].force[0].to",
        "blue, green, canary, stable",
    ),
    (
        "force both header and cookie",
        _set(*R, "force", [{"header": "X", "cookie": "c", "value": "1", "to": "canary"}]),
        "routes[0].force[0]",
        "exactly one of header or cookie",
    ),
    (
        "force neither header nor cookie",
        _set(*R, "force", [{"value": "1", "to": "canary"}]),
        "routes[0].force[0]",
        "exactly one of header or cookie",
    ),
    (
        "force both value and regex",
        _set(*R, "force", [{"header": "X", "value": "1", "regex": "1", "to": "canary"}]),
        "routes[0].force[0]",
        "exactly one of value or regex",
    ),
    (
        "force neither value nor regex",
        _set(*R, "force", [{"header": "X", "to": "canary"}]),
        "routes[0].force[0]",
        "exactly one of value or regex",
    ),
    (
        "force bad regex",
        _set(*R, "force", [{"header": "X", "regex": "(a", "to": "canary"}]),
        "routes[0].force[0].regex",
        "invalid regular expression",
    ),
    (
        "force value not string",
        _set(*R, "force", [{"header": "X", "value": True, "to": "stable"}]),
        "routes[0].force[0].value",
        "must be a string",
    ),
    (
        "force missing to",
        _set(*R, "force", [{"header": "X", "value": "1"}]),
        "routes[0].force[0].to",
        "is required",
    ),
    (
        "duplicate route",
        lambda d: d["routes"].append(copy.deepcopy(d["routes"][0])),
        "routes[1].name",
        "duplicate route name (also routes[0].name)",
    ),
    ("routes empty", _set("routes", []), "routes", "at least one route"),
    ("routes missing", _del("routes"), "routes", "is required"),
    ("bad route name", _set(*R, "name", "my shop"), "routes[0].name", "must be 1-63 of"),
    (
        "endpoint https",
        _set(*R, "versions", "blue", "endpoints", ["https://h:1"]),
        "routes[0].versions.blue.endpoints[0]",
        "scheme 'https' is not http",
    ),
    (
        "endpoint no scheme",
        _set(*R, "versions", "blue", "endpoints", ["127.0.0.1:9001"]),
        "routes[0].versions.blue.endpoints[0]",
        'must be "http://host:port"',
    ),
    (
        "endpoint path",
        _set(*R, "versions", "blue", "endpoints", ["http://h:1/api"]),
        "routes[0].versions.blue.endpoints[0]",
        "remove the path",
    ),
    (
        "endpoint query",
        _set(*R, "versions", "blue", "endpoints", ["http://h:1?x=1"]),
        "routes[0].versions.blue.endpoints[0]",
        "remove the path, query",
    ),
    (
        "endpoint no host",
        _set(*R, "versions", "blue", "endpoints", ["http://:9001"]),
        "routes[0].versions.blue.endpoints[0]",
        "a host is required",
    ),
    (
        "endpoint bad port",
        _set(*R, "versions", "blue", "endpoints", ["http://h:99999"]),
        "routes[0].versions.blue.endpoints[0]",
        "http://host:port",
    ),
    (
        "endpoint user info",
        _set(*R, "versions", "blue", "endpoints", ["http://u:p@h:1"]),
        "routes[0].versions.blue.endpoints[0]",
        "no path, query or user info",
    ),
    (
        "endpoint ipv6 no brackets",
        _set(*R, "versions", "blue", "endpoints", ["http://::1:80"]),
        "routes[0].versions.blue.endpoints[0]",
        "http://host:port",
    ),
    (
        "endpoint duplicate",
        _set(*R, "versions", "blue", "endpoints", ["http://h:1", "http://h:1/"]),
        "routes[0].versions.blue.endpoints[1]",
        "duplicate endpoint",
    ),
    (
        "endpoints empty",
        _set(*R, "versions", "blue", "endpoints", []),
        "routes[0].versions.blue.endpoints",
        "at least one endpoint",
    ),
    (
        "endpoints missing",
        _set(*R, "versions", "blue", {}),
        "routes[0].versions.blue.endpoints",
        "is required",
    ),
    (
        "endpoints not list",
        _set(*R, "versions", "blue", "endpoints", "http://h"),
        "routes[0].versions.blue.endpoints",
        "must be a list",
    ),
    ("listen no port", _set("listen", "0.0.0.0"), "listen", '"host:port"'),
    ("listen bad port", _set("listen", "0.0.0.0:http"), "listen", "port must be 0..65535"),
    ("listen port range", _set("listen", ":70000"), "listen", "port must be 0..65535"),
    ("listen ipv6 no brackets", _set("listen", "::1:8080"), "listen", "need brackets"),
    ("listen bad ipv6", _set("listen", "[zz]:80"), "listen", "not an IPv6 address"),
    ("listen int", _set("listen", 8080), "listen", "must be a string"),
    ("admin listen", _set("admin", {"listen": "nowhere"}), "admin.listen", '"host:port"'),
    (
        "admin public without token",
        _set("admin", {"listen": "0.0.0.0:9901"}),
        "admin.token",
        "required when admin.listen (0.0.0.0:9901) is not a loopback",
    ),
    (
        "admin token and file",
        _set("admin", {"token": "a", "token_file": "/x"}),
        "admin.token_file",
        "not both",
    ),
    ("bad duration", _set("timeouts", {"read": "30 sec"}), "timeouts.read", "duration"),
    ("zero timeout", _set("timeouts", {"connect": 0}), "timeouts.connect", "> 0"),
    ("negative grace", _set("grace_period", -1), "grace_period", "non-negative duration"),
    (
        "rollout interval",
        _set(*R, "rollout", {"interval": "soon"}),
        "routes[0].rollout.interval",
        "duration",
    ),
    (
        "path prefix",
        _set(*R, "match", {"path_prefix": "api"}),
        "routes[0].match.path_prefix",
        'must start with "/"',
    ),
    (
        "host pattern middle wildcard",
        _set(*R, "match", {"host": "shop.*.com"}),
        "routes[0].match.host",
        '"*.example.com"',
    ),
    (
        "host pattern with port",
        _set(*R, "match", {"host": "shop.com:80"}),
        "routes[0].match.host",
        "no port",
    ),
    (
        "host pattern bare wildcard suffix",
        _set(*R, "match", {"host": "*shop.com"}),
        "routes[0].match.host",
        "exact host name",
    ),
    (
        "match unknown key",
        _set(*R, "match", {"method": "GET"}),
        "routes[0].match.method",
        "allowed: host, path_prefix",
    ),
    (
        "error rate > 1",
        _set(*R, "rollout", {"analysis": {"max_error_rate": 1.5}}),
        "routes[0].rollout.analysis.max_error_rate",
        "must be 0..1",
    ),
    (
        "error rate increase < 0",
        _set(*R, "rollout", {"analysis": {"max_error_rate_increase": -0.1}}),
        "routes[0].rollout.analysis.max_error_rate_increase",
        "must be 0..1",
    ),
    (
        "confidence 0.5",
        _set(*R, "rollout", {"analysis": {"confidence": 0.5}}),
        "routes[0].rollout.analysis.confidence",
        "between 0.5 and 1",
    ),
    (
        "confidence 1",
        _set(*R, "rollout", {"analysis": {"confidence": 1}}),
        "routes[0].rollout.analysis.confidence",
        "between 0.5 and 1",
    ),
    (
        "latency ratio",
        _set(*R, "rollout", {"analysis": {"max_latency_ratio": 0}}),
        "routes[0].rollout.analysis.max_latency_ratio",
        "must be > 0",
    ),
    (
        "min samples bool",
        _set(*R, "rollout", {"analysis": {"min_samples": True}}),
        "routes[0].rollout.analysis.min_samples",
        "must be an integer >= 1",
    ),
    (
        "exclude reasons",
        _set(*R, "rollout", {"analysis": {"exclude_reasons": ["tester"]}}),
        "routes[0].rollout.analysis.exclude_reasons[0]",
        "must be one of force_header",
    ),
    (
        "analysis unknown key",
        _set(*R, "rollout", {"analysis": {"p99": 1}}),
        "routes[0].rollout.analysis.p99",
        "allowed: min_samples",
    ),
    (
        "steps not increasing",
        _set(*R, "rollout", {"steps": [10, 50, {"pause": True}, 25]}),
        "routes[0].rollout.steps[3]",
        "steps must increase; the previous weight step is 50",
    ),
    (
        "steps equal",
        _set(*R, "rollout", {"steps": [10, 10]}),
        "routes[0].rollout.steps[1]",
        "must increase",
    ),
    (
        "step > 100",
        _set(*R, "rollout", {"steps": [50, 150]}),
        "routes[0].rollout.steps[1]",
        "must be 1..100",
    ),
    (
        "step 0",
        _set(*R, "rollout", {"steps": [0, 50]}),
        "routes[0].rollout.steps[0]",
        "must be 1..100",
    ),
    (
        "step string",
        _set(*R, "rollout", {"steps": ["10%"]}),
        "routes[0].rollout.steps[0]",
        "weight 1..100 or a pause",
    ),
    ("steps empty", _set(*R, "rollout", {"steps": []}), "routes[0].rollout.steps", "non-empty"),
    (
        "pause false",
        _set(*R, "rollout", {"steps": [{"pause": False}]}),
        "routes[0].rollout.steps[0].pause",
        "must be true",
    ),
    (
        "pause bad duration",
        _set(*R, "rollout", {"steps": [{"pause": "later"}]}),
        "routes[0].rollout.steps[0].pause",
        "duration",
    ),
    (
        "pause unknown key",
        _set(*R, "rollout", {"steps": [{"wait": 1}]}),
        "routes[0].rollout.steps[0].wait",
        "allowed: pause",
    ),
    (
        "on_failure",
        _set(*R, "rollout", {"on_failure": "panic"}),
        "routes[0].rollout.on_failure",
        "must be one of rollback, pause",
    ),
    (
        "failure_limit 0",
        _set(*R, "rollout", {"failure_limit": 0}),
        "routes[0].rollout.failure_limit",
        "must be >= 1",
    ),
    (
        "sticky key prefix",
        _set(*R, "sticky", {"keys": ["X-User-Id"]}),
        "routes[0].sticky.keys[0]",
        'must be "header:<Name>" or "cookie:<name>"',
    ),
    (
        "sticky key kind",
        _set(*R, "sticky", {"keys": ["query:uid"]}),
        "routes[0].sticky.keys[0]",
        '"header:<Name>"',
    ),
    (
        "sticky key empty name",
        _set(*R, "sticky", {"keys": ["header:"]}),
        "routes[0].sticky.keys[0]",
        '"header:<Name>"',
    ),
    (
        "sticky cookie max_age",
        _set(*R, "sticky", {"cookie": {"max_age": "forever"}}),
        "routes[0].sticky.cookie.max_age",
        "duration",
    ),
    (
        "sticky cookie secure",
        _set(*R, "sticky", {"cookie": {"secure": "yes"}}),
        "routes[0].sticky.cookie.secure",
        "must be true or false",
    ),
    (
        "sticky cookie name",
        _set(*R, "sticky", {"cookie": {"name": "a b"}}),
        "routes[0].sticky.cookie.name",
        "valid cookie name",
    ),
    ("sticky wrong type", _set(*R, "sticky", "yes"), "routes[0].sticky", "must be a mapping"),
    (
        "balance",
        _set(*R, "balance", "random"),
        "routes[0].balance",
        "one of least_request, round_robin",
    ),
    ("retries negative", _set(*R, "retries", -1), "routes[0].retries", "must be >= 0"),
    ("failover string", _set(*R, "failover", "yes"), "routes[0].failover", "true or false"),
    (
        "outlier max < base",
        _set(*R, "outlier", {"base_ejection": "1m", "max_ejection": "30s"}),
        "routes[0].outlier.max_ejection",
        "must be >= base_ejection",
    ),
    (
        "outlier failures 0",
        _set(*R, "outlier", {"consecutive_failures": 0}),
        "routes[0].outlier.consecutive_failures",
        ">= 1",
    ),
    (
        "health check no path",
        _set(*R, "health_check", {"interval": "5s"}),
        "routes[0].health_check.path",
        "is required",
    ),
    (
        "health check path",
        _set(*R, "health_check", {"path": "health"}),
        "routes[0].health_check.path",
        'must start with "/"',
    ),
    ("workers bool", _set("workers", True), "workers", "must be an integer 1..256"),
    ("workers zero", _set("workers", 0), "workers", "must be 1..256"),
    ("access_log int", _set("access_log", 1), "access_log", "true or false"),
    ("trusted proxy", _set("trusted_proxies", ["10.0.0.0/33"]), "trusted_proxies[0]", "CIDR"),
    (
        "trusted proxies not list",
        _set("trusted_proxies", "10.0.0.0/8"),
        "trusted_proxies",
        "must be a list",
    ),
    ("version header", _set("version_header", "X Version"), "version_header", "header name"),
    ("forwarded_for", _set("forwarded_for", "prepend"), "forwarded_for", "append, replace"),
    ("forwarded_for bool", _set("forwarded_for", True), "forwarded_for", "append, replace"),
    (
        "allowed hosts not list",
        _set("admin", {"allowed_hosts": "graygate.internal"}),
        "admin.allowed_hosts",
        "must be a list",
    ),
    (
        "allowed host url",
        _set("admin", {"allowed_hosts": ["ok.internal", "http://graygate.internal"]}),
        "admin.allowed_hosts[1]",
        "host name or IP address",
    ),
    (
        "allowed host port",
        _set("admin", {"allowed_hosts": ["graygate.internal:9901"]}),
        "admin.allowed_hosts[0]",
        "without a port",
    ),
    (
        "allowed host empty",
        _set("admin", {"allowed_hosts": [""]}),
        "admin.allowed_hosts[0]",
        "must not be empty",
    ),
    (
        "allowed host wildcard part",
        _set("admin", {"allowed_hosts": ["*.internal"]}),
        "admin.allowed_hosts[0]",
        'or "*"',
    ),
    (
        "allowed host int",
        _set("admin", {"allowed_hosts": [9901]}),
        "admin.allowed_hosts[0]",
        "must be a string",
    ),
    ("upgrades not list", _set("upgrades", "websocket"), "upgrades", "must be a list"),
    ("upgrade not token", _set("upgrades", ["websocket", "h2 c"]), "upgrades[1]", "protocol name"),
    ("upgrade not string", _set("upgrades", [7]), "upgrades[0]", "must be a string"),
    ("client write", _set("timeouts", {"client_write": "0s"}), "timeouts.client_write", "> 0"),
    ("state backend", _set("state", {"backend": "sqlite"}), "state.backend", "file, redis"),
    ("redis url", _set("state", {"redis_url": "http://r"}), "state.redis_url", "redis://"),
    (
        "max header bytes",
        _set("limits", {"max_header_bytes": 100}),
        "limits.max_header_bytes",
        "at least 1024",
    ),
    (
        "max body bytes",
        _set("limits", {"max_body_bytes": "lots"}),
        "limits.max_body_bytes",
        "byte size",
    ),
    (
        "max conns zero",
        _set("limits", {"max_connections_per_endpoint": 0}),
        "limits.max_connections_per_endpoint",
        ">= 1",
    ),
    ("section not mapping", _set("timeouts", [1]), "timeouts", "must be a mapping"),
    ("route not mapping", _set("routes", ["shop"]), "routes[0]", "must be a mapping"),
]


@pytest.mark.parametrize(
    ("change", "path", "fragment"),
    [pytest.param(c, p, f, id=i) for i, c, p, f in REFUSALS],
)
def test_refusal(change, path, fragment):
    err = refused(_with(base(), change))
    assert err.path == path, str(err)
    assert fragment in str(err), str(err)
    assert str(err).startswith(f"{path}: ")


# Refusals the JSON Schema cannot express: the loader refuses them, the schema accepts them.
# test_schema_refuses_what_the_loader_refuses checks both halves, so the list cannot go stale.
SCHEMA_CANNOT_REFUSE = frozenset(
    {
        # JSON Schema counts 90.0 as an integer ("type": "integer" is about the value).
        "weight float",
        # Cross-field: weights, stable and force targets must name the route's versions.
        "weights sum",
        "weights missing version",
        "weights unknown version",
        "stable unknown",
        "stable missing",
        "force to unknown",
        # The loader compiles the pattern with re; "format": "regex" is an annotation only.
        "force bad regex",
        # Unique after normalisation across items (route names, "http://h:1" == "http://h:1/").
        "duplicate route",
        "endpoint duplicate",
        # Cross-field: a token is required only when admin.listen is not a loopback address.
        "admin public without token",
        # Order across list items: weight steps strictly increase.
        "steps not increasing",
        "steps equal",
        # Cross-field: outlier.max_ejection >= outlier.base_ejection.
        "outlier max < base",
        # CIDR prefix lengths per address family: a regex would be a second IP parser.
        "trusted proxy",
    }
)


@pytest.mark.parametrize("change", [pytest.param(c, id=i) for i, c, _p, _f in REFUSALS])
def test_schema_refuses_what_the_loader_refuses(request, change):
    import jsonschema  # a test dependency (pyproject.toml)

    case = request.node.callspec.id
    data = _with(base(), change)
    refused(data)  # the loader refuses it (test_refusal checks how)
    valid = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).is_valid(data)
    if case in SCHEMA_CANNOT_REFUSE:
        assert valid, f"the schema now refuses {case!r}: remove it from SCHEMA_CANNOT_REFUSE"
    else:
        assert not valid, f"the loader refuses {case!r} but the schema accepts it"


def test_schema_exceptions_are_refusal_cases():
    assert not SCHEMA_CANNOT_REFUSE - {i for i, *_ in REFUSALS}, "ids not in REFUSALS"


def test_base_config_is_valid():
    # The refusal table mutates this; it must itself parse, or every refusal proves nothing.
    cfg = parse_config(base(), {})
    assert cfg.routes[0].weights == (("blue", 90), ("green", 10))


def test_error_message_shape():
    err = refused(_with(base(), _set(*R, "weights", {"blue": -20, "green": 120})))
    assert (err.path, err.value) == ("routes[0].weights.blue", -20)
    err = refused(_with(base(), _set(*R, "weights", {"blue": 0, "green": 120})))
    assert str(err) == "routes[0].weights.green: must be 0..100, got 120"
    assert err.message == "must be 0..100" and err.value == 120


def test_header_names_lowercase_cookie_names_as_written():
    d = base()
    route(d)["sticky"] = {"keys": ["header:X-User-Id", "cookie:SessionID"]}
    route(d)["force"] = [
        {"header": "X-Canary", "value": "always", "to": "canary"},
        {"cookie": "Canary", "regex": "al.*", "to": "blue"},
    ]
    r = parse_config(d, {}).routes[0]
    assert r.sticky is not None
    assert r.sticky.keys == (
        CohortSource("header", "x-user-id"),
        CohortSource("cookie", "SessionID"),
    )
    assert [(f.name, f.value, f.regex) for f in r.force] == [
        ("x-canary", "always", None),
        ("Canary", None, "al.*"),
    ]


def test_empty_or_non_mapping_document():
    assert "empty" in refused(None).message
    err = refused(["routes"])
    assert err.path == "config" and "mapping" in err.message


# --- load_config -------------------------------------------------------------------------------


def test_load_config_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing))
    assert info.value.path == ""
    assert str(missing) in str(info.value) and "cannot read" in str(info.value)


def test_load_config_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: ':8080'\nroutes:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert info.value.path == ""
    assert f"{bad}:" in str(info.value) and "invalid YAML" in str(info.value)
    line = int(str(info.value).split(f"{bad}:")[1].split(":")[0])
    assert line >= 3


def test_load_config_refuses_duplicate_keys(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("listen: ':1'\nlisten: ':2'\nroutes: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(dup))
    assert f"{dup}:2:" in str(info.value) and "duplicate key 'listen'" in str(info.value)


def test_load_config_validation_error_keeps_dotted_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(DEMO.read_text().replace("{blue: 90, green: 10}", "{blue: 90, green: 20}"))
    with pytest.raises(ConfigError) as info:
        load_config(str(f), env={})
    assert info.value.path == "routes[0].weights"


# --- describe ---------------------------------------------------------------------------------


def test_describe_mentions_routes_weights_and_rules():
    text = describe(load_config(str(EXAMPLE), env={}))
    assert text.splitlines()[0].startswith("listen 0.0.0.0:8080, admin 127.0.0.1:9901")
    assert "route shop: host * path_prefix /" in text
    assert "version blue (stable): http://127.0.0.1:9001, http://127.0.0.1:9002" in text
    assert "weights blue=100 green=0" in text
    assert "header:x-user-id" in text and "gg_uid" in text
    assert "force: header x-canary = 'always' -> canary" in text
    assert "force: header x-tester ~ /qa-.*/ -> green" in text
    assert "steps 5%, 10%, 25%, pause, 50%, pause 10m, 100% every 30s" in text


def test_describe_follows_the_config():
    d = base()
    d["routes"].append(
        {**copy.deepcopy(route(d)), "name": "api", "weights": {"blue": 50, "green": 50}}
    )
    text = describe(parse_config(d, {}))
    assert "route shop:" in text and "route api:" in text
    assert "weights blue=90 green=10" in text and "weights blue=50 green=50" in text
    assert "sticky: off" in text


# --- metrics source of the analysis, redis lease ------------------------------------------


PROM = {"url": "http://prometheus:9090/", "scrape_interval": "5s"}


def test_prometheus_source_globally_and_per_route_override():
    data = base()
    data["analysis"] = {
        "source": "prometheus",
        "prometheus": {**PROM, "replicas_selector": 'job="gg"'},
    }
    second = {**route(data), "name": "api", "rollout": {"analysis": {"source": "local"}}}
    data["routes"].append(second)
    cfg = parse_config(data, env={})
    shop, api = (r.rollout.analysis for r in cfg.routes)
    assert shop.source == "prometheus" and api.source == "local"
    assert shop.prometheus == PrometheusConfig(
        "http://prometheus:9090", 2.0, 'job="gg"', scrape_interval=5.0
    )
    assert api.prometheus == shop.prometheus  # inherited, unused while local
    assert "analysis source: prometheus http://prometheus:9090" in describe(cfg)
    # Per route only, with its own server.
    only = base()
    route(only)["rollout"] = {"analysis": {"source": "prometheus", "prometheus": PROM}}
    assert parse_config(only, env={}).routes[0].rollout.analysis.source == "prometheus"
    assert parse_config(base(), env={}).routes[0].rollout.analysis.source == "local"


def test_redis_lease_duration():
    data = base()
    data["state"] = {"backend": "redis", "lease": "1500ms"}
    assert parse_config(data, env={}).state.lease == 1.5
    assert parse_config(base(), env={}).state.lease == 3.0


@pytest.mark.parametrize(
    "top, analysis, path, fragment",
    [
        ({"source": "prometheus"}, None, "analysis.prometheus", "is required with source"),
        (None, {"source": "prometheus"}, "routes[0].rollout.analysis.prometheus", "is required"),
        ({"source": "graphite"}, None, "analysis.source", "must be one of local, prometheus"),
        ({"min_samples": 5}, None, "analysis.min_samples", "allowed: source, prometheus"),
        ({"prometheus": {"timeout": "1s"}}, None, "analysis.prometheus.url", "is required"),
        ({"prometheus": {"url": "ftp://x"}}, None, "analysis.prometheus.url", "http(s)://"),
        ({"prometheus": {"url": "http://x?q=1"}}, None, "analysis.prometheus.url", "query"),
        (
            {"prometheus": {"url": "http://x", "replicas_selector": 'job="a"} or vector(1) #'}},
            None,
            "analysis.prometheus.replicas_selector",
            "label matchers",
        ),
        (
            {"prometheus": {"url": "http://x", "scrape_interval": 0}},
            None,
            "analysis.prometheus.scrape_interval",
            "> 0",
        ),
        (
            {"source": "prometheus", "prometheus": {"url": "http://x", "scrape_interval": "20s"}},
            None,
            "routes[0].rollout.interval",
            "at least 2 scrape intervals (40s)",
        ),
    ],
)
def test_metrics_source_refusals(top, analysis, path, fragment):
    data = base()
    if top is not None:
        data["analysis"] = top
    if analysis is not None:
        route(data)["rollout"] = {"analysis": analysis}
    err = refused(data)
    assert err.path == path, str(err)
    assert fragment in str(err)


@pytest.mark.parametrize(
    "selector", ['job="graygate"', 'job="gg", namespace=~"prod|canary"', ' a!="x\\"y" ,']
)
def test_replicas_selector_accepts_label_matchers(selector):
    data = base()
    data["analysis"] = {"prometheus": {"url": "http://x", "replicas_selector": selector}}
    cfg = parse_config(data, env={})
    assert cfg.routes[0].rollout.analysis.prometheus is not None


def test_redis_lease_too_short_is_refused():
    data = base()
    data["state"] = {"lease": "100ms"}
    assert refused(data).path == "state.lease"
