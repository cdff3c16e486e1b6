"""Every Prometheus metric name and label of graygate (the contract in README "Metrics").

A custom collector renders stats.Stats, the routing policy and endpoint health at scrape
time, so the hot path only bumps plain counters (Counter.labels().inc() costs microseconds).
Always on an injected CollectorRegistry, never prometheus_client's global REGISTRY.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from proxy.core.mirror import Mirrors
from proxy.core.state import ROLLOUT_PHASES, RouteState
from proxy.core.stats import BUCKETS, Stats

# generate_latest writes the 0.0.4 text format; CONTENT_TYPE_LATEST names 1.0.0 in
# prometheus_client >= 0.22, which would mislabel the body.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

REQUESTS = "graygate_requests_total"
DURATION = "graygate_request_duration_seconds"
UPSTREAM_ERRORS = "graygate_upstream_errors_total"
ROUTE_WEIGHT = "graygate_route_weight"
ROLLOUT_STATE = "graygate_rollout_state"
ROLLOUT_STEP = "graygate_rollout_step"
ROLLOUT_VERDICTS = "graygate_rollout_verdicts_total"
ENDPOINT_AVAILABLE = "graygate_endpoint_available"
INFLIGHT = "graygate_inflight_requests"
WORKER_RESTARTS = "graygate_worker_restarts_total"  # only with workers > 1
# Several replicas: whether this one reaches its state store and runs the controller.
STATE_STORE_UP = "graygate_state_store_up"
CONTROLLER_LEADER = "graygate_controller_leader"
# Shadow traffic (route `mirror:` and mirror rollout steps); version is the shadow's.
MIRROR_REQUESTS = "graygate_mirror_requests_total"
MIRROR_DURATION = "graygate_mirror_duration_seconds"
MIRROR_DROPPED = "graygate_mirror_dropped_total"

# str(float) matches the client library's own `le` formatting for these bounds ("0.0005", "1.0").
_LE = (*(str(b) for b in BUCKETS), "+Inf")


class RouteLike(Protocol):
    # state.RoutePolicy satisfies this; only the fields the collector reads.
    @property
    def name(self) -> str: ...

    @property
    def state(self) -> RouteState: ...


class PolicyLike(Protocol):
    @property
    def routes(self) -> Sequence[RouteLike]: ...


# (route, version, endpoint url, available)
EndpointRow = tuple[str, str, str, bool]
# (state backend, its store reachable, this replica holds the controller lease)
ReplicaRow = tuple[str, bool, bool]


_Families = tuple[
    CounterMetricFamily,
    HistogramMetricFamily,
    CounterMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    CounterMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
]


def _families() -> _Families:
    # Fresh, empty families on every scrape; the order here is the order of the exposition.
    return (
        CounterMetricFamily(
            REQUESTS,
            "Requests proxied, by upstream or graygate status code and routing reason.",
            labels=("route", "version", "code", "reason"),
        ),
        HistogramMetricFamily(
            DURATION,
            "Time from request head to the end of the response, in seconds.",
            labels=("route", "version"),
        ),
        CounterMetricFamily(
            UPSTREAM_ERRORS,
            "Failed upstream exchanges by kind (connect, timeout, reset, protocol).",
            labels=("route", "version", "kind"),
        ),
        GaugeMetricFamily(
            ROUTE_WEIGHT, "Current traffic weight in percent.", labels=("route", "version")
        ),
        GaugeMetricFamily(
            ROLLOUT_STATE, "1 for the route's current rollout state.", labels=("route", "state")
        ),
        GaugeMetricFamily(
            ROLLOUT_STEP,
            "Index of the current rollout step (0-based; -1 before the first step).",
            labels=("route",),
        ),
        CounterMetricFamily(
            ROLLOUT_VERDICTS,
            "Rollout analysis verdicts (pass, fail, need_more_samples).",
            labels=("route", "verdict"),
        ),
        GaugeMetricFamily(
            ENDPOINT_AVAILABLE,
            "1 when the endpoint may receive requests (not ejected, healthy).",
            labels=("route", "version", "endpoint"),
        ),
        GaugeMetricFamily(
            INFLIGHT, "Requests being proxied right now.", labels=("route", "version")
        ),
    )


class GraygateCollector(Collector):
    def __init__(
        self,
        stats: Stats,
        get_policy: Callable[[], PolicyLike],
        get_endpoints: Callable[[], Iterable[EndpointRow]],
        get_replica: Callable[[], ReplicaRow] | None = None,
    ) -> None:
        self._stats = stats
        self._get_policy = get_policy
        self._get_endpoints = get_endpoints
        self._get_replica = get_replica

    def describe(self) -> Iterable[Metric]:
        # Names only: lets the registry refuse duplicates without reading live state.
        return (*_families(), *_replica_families())

    def collect(self) -> Iterator[Metric]:
        (
            requests,
            duration,
            upstream_errors,
            weight,
            rollout_state,
            rollout_step,
            verdicts,
            endpoint_available,
            inflight,
        ) = _families()
        for route, version, vs in self._stats.items():
            # list(...) copies in one C call, so a scrape run off the loop thread cannot
            # hit "dictionary changed size during iteration".
            for (status, reason), n in list(vs.counts.items()):
                requests.add_metric((route, version, str(status), reason), n)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, n in zip(_LE, list(vs.bucket_counts), strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            duration.add_metric((route, version), buckets, vs.duration_sum)
            for kind, n in list(vs.upstream_errors.items()):
                upstream_errors.add_metric((route, version, kind), n)
            inflight.add_metric((route, version), vs.inflight)
        for route, counts in self._stats.verdicts():
            for verdict, n in counts.items():
                verdicts.add_metric((route, verdict), n)
        for rp in self._get_policy().routes:
            state = rp.state
            for version, w in state.weights:
                weight.add_metric((rp.name, version), w)
            phase = state.rollout.phase
            for p in ROLLOUT_PHASES:
                rollout_state.add_metric((rp.name, p), 1 if p == phase else 0)
            rollout_step.add_metric((rp.name,), state.rollout.step)
        for route, version, url, available in self._get_endpoints():
            endpoint_available.add_metric((route, version, url), 1 if available else 0)
        yield from (
            requests,
            duration,
            upstream_errors,
            weight,
            rollout_state,
            rollout_step,
            verdicts,
            endpoint_available,
            inflight,
        )
        backend, up, leader = self._get_replica() if self._get_replica else ("file", True, True)
        store_up, is_leader = _replica_families()
        store_up.add_metric((backend,), 1 if up else 0)
        is_leader.add_metric((), 1 if leader else 0)
        yield from (store_up, is_leader)


def _replica_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            STATE_STORE_UP,
            "1 while the state store (file, or redis shared by replicas) is reachable.",
            labels=("backend",),
        ),
        GaugeMetricFamily(
            CONTROLLER_LEADER,
            "1 while this replica runs the rollout controller (holds the redis lease).",
        ),
    )


class MirrorCollector(Collector):
    """Shadow copies per (route, shadow version), rendered from core.mirror.Mirrors at
    scrape time: every result and drop cause pre-initialised, answer durations on the
    request histogram's buckets."""

    def __init__(self, mirrors: Mirrors) -> None:
        self._mirrors = mirrors

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                MIRROR_REQUESTS,
                "Shadow copies by result: match, status/header/body mismatch, shadow_error "
                "(no usable answer), dropped (not sent or not compared).",
                labels=("route", "version", "result"),
            ),
            HistogramMetricFamily(
                MIRROR_DURATION,
                "Time from sending a shadow copy to the end of its answer, in seconds.",
                labels=("route", "version"),
            ),
            CounterMetricFamily(
                MIRROR_DROPPED,
                "Shadow copies not compared, by cause (max_inflight, max_body_bytes, "
                "primary_incomplete).",
                labels=("route", "version", "cause"),
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        requests, duration, dropped = self._families()
        for route, version, ms in self._mirrors.items():
            for result, n in list(ms.results.items()):
                requests.add_metric((route, version, result), n)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, n in zip(_LE, list(ms.bucket_counts), strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            duration.add_metric((route, version), buckets, ms.duration_sum)
            for cause, n in list(ms.dropped.items()):
                dropped.add_metric((route, version, cause), n)
        yield from (requests, duration, dropped)


class WorkerCollector(Collector):
    """The supervisor's own figures (workers > 1)."""

    def __init__(self, restarts: Callable[[], int]) -> None:
        self._restarts = restarts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            WORKER_RESTARTS, "Workers restarted by the supervisor after they died or stalled."
        )
        family.add_metric((), self._restarts())
        yield family


def make_registry(
    stats: Stats,
    get_policy: Callable[[], PolicyLike],
    get_endpoints: Callable[[], Iterable[EndpointRow]],
    get_replica: Callable[[], ReplicaRow] | None = None,
    worker_restarts: Callable[[], int] | None = None,
    mirrors: Mirrors | None = None,
) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(GraygateCollector(stats, get_policy, get_endpoints, get_replica))
    if mirrors is not None:
        registry.register(MirrorCollector(mirrors))
    if worker_restarts is not None:
        registry.register(WorkerCollector(worker_restarts))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


# --- webhook notifications (control/notify.py) -----------------------------------------------

NOTIFICATIONS_DELIVERED = "graygate_notifications_delivered_total"
NOTIFICATIONS_FAILED = "graygate_notifications_failed_total"
NOTIFICATIONS_DROPPED = "graygate_notifications_dropped_total"


class NotificationCounts(Protocol):
    delivered: int
    failed: int
    dropped: int


class NotificationCollector(Collector):
    """Per `notifications[].name`: events delivered, given up after every retry, and
    dropped (queue full, or still queued at a reload or shutdown)."""

    def __init__(self, get_rows: Callable[[], Iterable[tuple[str, NotificationCounts]]]) -> None:
        self._get_rows = get_rows

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        labels = ("notification",)
        return (
            CounterMetricFamily(
                NOTIFICATIONS_DELIVERED, "Events a webhook answered 2xx to.", labels=labels
            ),
            CounterMetricFamily(
                NOTIFICATIONS_FAILED,
                "Events not delivered after every retry (no 2xx answer).",
                labels=labels,
            ),
            CounterMetricFamily(
                NOTIFICATIONS_DROPPED,
                "Events dropped undelivered: queue full, or still queued at a reload or shutdown.",
                labels=labels,
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        delivered, failed, dropped = self._families()
        for name, counts in self._get_rows():
            delivered.add_metric((name,), counts.delivered)
            failed.add_metric((name,), counts.failed)
            dropped.add_metric((name,), counts.dropped)
        yield from (delivered, failed, dropped)
