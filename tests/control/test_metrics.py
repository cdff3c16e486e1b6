import random
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import DuplicateTimeseries

from proxy.control.metrics import (
    CONTENT_TYPE,
    GraygateCollector,
    make_registry,
    render,
)
from proxy.core.config.model import Config, Endpoint, Match, RouteConfig, VersionConfig
from proxy.core.state import ROLLOUT_PHASES, RolloutStatus, RouteState
from proxy.core.stats import BUCKETS, UPSTREAM_ERROR_KINDS, VERDICTS, Stats

FAMILIES = {
    "graygate_requests": "counter",
    "graygate_request_duration_seconds": "histogram",
    "graygate_upstream_errors": "counter",
    "graygate_route_weight": "gauge",
    "graygate_rollout_state": "gauge",
    "graygate_rollout_step": "gauge",
    "graygate_rollout_verdicts": "counter",
    "graygate_endpoint_available": "gauge",
    "graygate_inflight_requests": "gauge",
    "graygate_state_store_up": "gauge",
    "graygate_controller_leader": "gauge",
}


@dataclass(frozen=True)
class FakeRoute:
    name: str
    state: RouteState


@dataclass(frozen=True)
class FakePolicy:
    routes: tuple[FakeRoute, ...]


def route_config(name, versions):
    return RouteConfig(
        name=name,
        match=Match(),
        versions=tuple(
            VersionConfig(v, (Endpoint(f"http://127.0.0.1:{9001 + i}", "127.0.0.1", 9001 + i),))
            for i, v in enumerate(versions)
        ),
        stable=versions[0],
        weights=tuple((v, 100 if i == 0 else 0) for i, v in enumerate(versions)),
    )


@pytest.fixture
def setup():
    config = Config(routes=(route_config("shop", ("blue", "green")), route_config("api", ("v1",))))
    stats = Stats.from_config(config, random.Random(1))
    policy = FakePolicy(
        (
            FakeRoute(
                "shop",
                RouteState(
                    weights=(("blue", 90), ("green", 10)),
                    stable="blue",
                    rollout=RolloutStatus(phase="progressing", canary="green", step=1),
                ),
            ),
            FakeRoute("api", RouteState(weights=(("v1", 100),), stable="v1")),
        )
    )
    endpoints = [
        ("shop", "blue", "http://127.0.0.1:9001", True),
        ("shop", "green", "http://127.0.0.1:9002", False),
        ("api", "v1", "http://127.0.0.1:9001", True),
    ]
    holder = {"policy": policy}
    registry = make_registry(stats, lambda: holder["policy"], lambda: endpoints)
    return stats, registry, holder


def scrape(registry):
    text = render(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {}
    for f in families.values():
        for s in f.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_every_family_present_with_type_before_traffic(setup):
    _, registry, _ = setup
    families, samples = scrape(registry)
    assert {n: f.type for n, f in families.items()} == FAMILIES
    assert not families["graygate_requests"].samples  # code is dynamic: only seen codes
    for route, version in (("shop", "blue"), ("shop", "green"), ("api", "v1")):
        for kind in UPSTREAM_ERROR_KINDS:
            assert (
                value(
                    samples,
                    "graygate_upstream_errors_total",
                    route=route,
                    version=version,
                    kind=kind,
                )
                == 0
            )
        assert value(samples, "graygate_inflight_requests", route=route, version=version) == 0
        assert (
            value(samples, "graygate_request_duration_seconds_count", route=route, version=version)
            == 0
        )
        assert (
            value(samples, "graygate_request_duration_seconds_sum", route=route, version=version)
            == 0
        )
        for le in (*BUCKETS, float("inf")):
            le_text = "+Inf" if le == float("inf") else str(le)
            assert (
                value(
                    samples,
                    "graygate_request_duration_seconds_bucket",
                    route=route,
                    version=version,
                    le=le_text,
                )
                == 0
            )
    for route in ("shop", "api"):
        for verdict in VERDICTS:
            assert (
                value(samples, "graygate_rollout_verdicts_total", route=route, verdict=verdict) == 0
            )
    # One process with a file: its store is up and it runs the controller.
    assert value(samples, "graygate_state_store_up", backend="file") == 1
    assert value(samples, "graygate_controller_leader") == 1


def test_replica_gauges_follow_the_shared_store():
    stats = Stats()
    status = ("redis", True, False)
    registry = make_registry(stats, lambda: FakePolicy(()), list, lambda: status)
    _, samples = scrape(registry)
    assert value(samples, "graygate_state_store_up", backend="redis") == 1
    assert value(samples, "graygate_controller_leader") == 0
    status = ("redis", False, True)
    _, samples = scrape(registry)
    assert value(samples, "graygate_state_store_up", backend="redis") == 0
    assert value(samples, "graygate_controller_leader") == 1


def test_requests_and_histogram_match_recorded(setup):
    stats, registry, _ = setup
    green = stats.get("shop", "green")
    recorded = [(200, "weight", 0.0004), (200, "weight", 0.003), (200, "cohort", 0.003)]
    recorded += [(503, "weight", 0.2), (502, "force_header", 12.0)]
    for status, reason, seconds in recorded:
        green.record(status, reason, seconds)
    stats.get("api", "v1").record(404, "weight", 0.001)

    _, samples = scrape(registry)
    expected_counts = {}
    for status, reason, _ in recorded:
        expected_counts[(str(status), reason)] = expected_counts.get((str(status), reason), 0) + 1
    got_counts = {
        (dict(labels)["code"], dict(labels)["reason"]): v
        for (name, labels), v in samples.items()
        if name == "graygate_requests_total" and dict(labels)["version"] == "green"
    }
    assert got_counts == expected_counts
    assert (
        value(
            samples,
            "graygate_requests_total",
            route="api",
            version="v1",
            code="404",
            reason="weight",
        )
        == 1
    )

    for le in BUCKETS:
        want = sum(1 for _, _, s in recorded if s <= le)
        got = value(
            samples,
            "graygate_request_duration_seconds_bucket",
            route="shop",
            version="green",
            le=str(le),
        )
        assert got == want, le
    assert value(
        samples,
        "graygate_request_duration_seconds_bucket",
        route="shop",
        version="green",
        le="+Inf",
    ) == len(recorded)
    assert value(
        samples, "graygate_request_duration_seconds_count", route="shop", version="green"
    ) == len(recorded)
    assert value(
        samples, "graygate_request_duration_seconds_sum", route="shop", version="green"
    ) == pytest.approx(sum(s for _, _, s in recorded))
    # blue saw nothing
    assert (
        value(samples, "graygate_request_duration_seconds_count", route="shop", version="blue") == 0
    )


def test_upstream_errors_inflight_and_verdicts(setup):
    stats, registry, _ = setup
    blue = stats.get("shop", "blue")
    blue.upstream_error("timeout")
    blue.upstream_error("timeout")
    blue.upstream_error("protocol")
    blue.inflight = 7
    stats.count_verdict("shop", "fail")
    stats.count_verdict("shop", "need_more_samples")
    stats.count_verdict("shop", "need_more_samples")
    _, samples = scrape(registry)
    errs = {
        k: value(samples, "graygate_upstream_errors_total", route="shop", version="blue", kind=k)
        for k in UPSTREAM_ERROR_KINDS
    }
    assert errs == {"connect": 0, "timeout": 2, "reset": 0, "protocol": 1}
    assert value(samples, "graygate_inflight_requests", route="shop", version="blue") == 7
    assert value(samples, "graygate_inflight_requests", route="shop", version="green") == 0
    verdicts = {
        v: value(samples, "graygate_rollout_verdicts_total", route="shop", verdict=v)
        for v in VERDICTS
    }
    assert verdicts == {"pass": 0, "fail": 1, "need_more_samples": 2}


def test_policy_gauges_and_endpoints(setup):
    _, registry, holder = setup
    _, samples = scrape(registry)
    assert value(samples, "graygate_route_weight", route="shop", version="blue") == 90
    assert value(samples, "graygate_route_weight", route="shop", version="green") == 10
    assert value(samples, "graygate_route_weight", route="api", version="v1") == 100
    shop_states = {
        p: value(samples, "graygate_rollout_state", route="shop", state=p) for p in ROLLOUT_PHASES
    }
    assert shop_states == {p: (1 if p == "progressing" else 0) for p in ROLLOUT_PHASES}
    api_states = {
        p: value(samples, "graygate_rollout_state", route="api", state=p) for p in ROLLOUT_PHASES
    }
    assert api_states == {p: (1 if p == "idle" else 0) for p in ROLLOUT_PHASES}
    assert value(samples, "graygate_rollout_step", route="shop") == 1
    assert value(samples, "graygate_rollout_step", route="api") == -1
    assert (
        value(
            samples,
            "graygate_endpoint_available",
            route="shop",
            version="blue",
            endpoint="http://127.0.0.1:9001",
        )
        == 1
    )
    assert (
        value(
            samples,
            "graygate_endpoint_available",
            route="shop",
            version="green",
            endpoint="http://127.0.0.1:9002",
        )
        == 0
    )

    # scrape reads the policy live: a new snapshot shows on the next scrape
    old = holder["policy"].routes[0]
    rolled = RouteState(
        weights=(("blue", 100), ("green", 0)),
        stable="blue",
        rollout=RolloutStatus(phase="rolled_back", canary="green", step=1),
    )
    holder["policy"] = FakePolicy((FakeRoute(old.name, rolled), holder["policy"].routes[1]))
    _, samples = scrape(registry)
    assert value(samples, "graygate_route_weight", route="shop", version="green") == 0
    assert value(samples, "graygate_rollout_state", route="shop", state="rolled_back") == 1
    assert value(samples, "graygate_rollout_state", route="shop", state="progressing") == 0


def test_counters_survive_reconfigure_in_exposition(setup):
    stats, registry, _ = setup
    stats.get("shop", "blue").record(200, "weight", 0.01)
    stats.reconfigure(Config(routes=(route_config("shop", ("blue", "red")),)))
    stats.get("shop", "blue").record(200, "weight", 0.01)
    _, samples = scrape(registry)
    assert (
        value(
            samples,
            "graygate_requests_total",
            route="shop",
            version="blue",
            code="200",
            reason="weight",
        )
        == 2
    )
    assert value(samples, "graygate_inflight_requests", route="shop", version="red") == 0
    assert not any(
        dict(labels).get("version") == "green" and name.startswith("graygate_request")
        for name, labels in samples
    )
    assert not any(
        dict(labels).get("route") == "api" and name == "graygate_rollout_verdicts_total"
        for name, labels in samples
    )


def test_fresh_registry_not_global_and_duplicates_refused(setup):
    stats, registry, holder = setup
    assert registry is not REGISTRY
    assert (
        REGISTRY.get_sample_value(
            "graygate_inflight_requests", {"route": "shop", "version": "blue"}
        )
        is None
    )
    other = CollectorRegistry()
    other.register(GraygateCollector(stats, lambda: holder["policy"], list))
    with pytest.raises(DuplicateTimeseries):
        other.register(GraygateCollector(stats, lambda: holder["policy"], list))


def test_content_type_matches_body_format(setup):
    _, registry, _ = setup
    assert CONTENT_TYPE.startswith("text/plain")
    assert "version=0.0.4" in CONTENT_TYPE
    body = render(registry)
    assert isinstance(body, bytes)
    assert b"# TYPE graygate_requests_total counter" in body
    assert b"# TYPE graygate_request_duration_seconds histogram" in body
