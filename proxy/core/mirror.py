"""Shadow traffic, the pure part: what one answer looks like once captured, the result of
comparing a primary's answer with its shadow's, the mismatch evidence kept per route, and
the per-(route, version) counters the data plane bumps and metrics/rollout read.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from proxy.core.config.model import Config
from proxy.core.stats import BUCKETS

MirrorResult = Literal[
    "match", "status_mismatch", "header_mismatch", "body_mismatch", "shadow_error", "dropped"
]
RESULTS: tuple[MirrorResult, ...] = (
    "match",
    "status_mismatch",
    "header_mismatch",
    "body_mismatch",
    "shadow_error",
    "dropped",
)
# Why a copy was not compared: the route's max_inflight was reached, the request body was
# over max_body_bytes, or the primary's answer never completed (so there is nothing to
# compare with).
DropCause = Literal["max_inflight", "max_body_bytes", "primary_incomplete"]
DROP_CAUSES: tuple[DropCause, ...] = ("max_inflight", "max_body_bytes", "primary_incomplete")
RECENT_MISMATCHES = 50  # per route, newest last
TRUNCATE = 80  # characters of a JSON value kept in the evidence


@dataclass(frozen=True, slots=True)
class JsonDiff:
    path: str  # "$.items[3].price"
    primary: str  # the values, JSON-encoded and truncated to TRUNCATE characters
    shadow: str


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The evidence of one differing answer: no body, no denied header value."""

    at: float  # wall-clock seconds
    route: str
    version: str  # the shadow's version
    method: str
    path: str  # without the query, truncated
    result: MirrorResult
    status: tuple[int, int]  # (primary, shadow); shadow 0 when it gave no answer
    headers: tuple[str, ...]  # names of the compared headers that differ
    json_paths: tuple[JsonDiff, ...]
    digests: tuple[str, str]  # body digests (hex), "" when not computed
    detail: str = ""  # shadow_error: why

    def to_json(self) -> dict[str, object]:
        return {
            "at": self.at,
            "route": self.route,
            "version": self.version,
            "method": self.method,
            "path": self.path,
            "result": self.result,
            "status": list(self.status),
            "headers": list(self.headers),
            "json_paths": [
                {"path": d.path, "primary": d.primary, "shadow": d.shadow} for d in self.json_paths
            ],
            "digests": list(self.digests),
            "detail": self.detail,
        }


class MirrorStats:
    """Counters of one (route, shadow version); mutated by the data plane, read at scrape
    and by the rollout controller (the window since its last take)."""

    __slots__ = (
        "bucket_counts",
        "dropped",
        "duration_sum",
        "inflight",
        "recent",
        "results",
        "window_mismatches",
        "window_samples",
    )

    def __init__(self) -> None:
        self.results: dict[MirrorResult, int] = dict.fromkeys(RESULTS, 0)
        self.dropped: dict[DropCause, int] = dict.fromkeys(DROP_CAUSES, 0)
        self.bucket_counts: list[int] = [0] * (len(BUCKETS) + 1)  # shadow answer durations
        self.duration_sum = 0.0
        self.inflight = 0
        self.recent: deque[Mismatch] = deque(maxlen=RECENT_MISMATCHES)
        # Compared copies and the non-matching ones among them (shadow_error included)
        # since the controller last took the window; dropped copies are not samples.
        self.window_samples = 0
        self.window_mismatches = 0

    def record(self, result: MirrorResult, seconds: float, evidence: Mismatch | None) -> None:
        """One compared copy (any result but dropped)."""
        self.results[result] += 1
        self.bucket_counts[bisect_left(BUCKETS, seconds)] += 1
        self.duration_sum += seconds
        self.window_samples += 1
        if result != "match":
            self.window_mismatches += 1
            if evidence is not None:
                self.recent.append(evidence)

    def drop(self, cause: DropCause) -> None:
        self.results["dropped"] += 1
        self.dropped[cause] += 1

    def take_window(self) -> tuple[int, int]:
        """(samples, mismatches) since the last take; resets them."""
        taken = self.window_samples, self.window_mismatches
        self.window_samples = 0
        self.window_mismatches = 0
        return taken


@dataclass(slots=True)
class Capture:
    """One answer as the comparison sees it, filled while it streams."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # the compared names only
    digest: str = ""  # hex, when body: digest (or json over max_json_bytes)
    json: object = None  # the parsed body, when body: json and it parsed
    json_ok: bool = False  # `json` holds a parsed value
    complete: bool = False  # the whole answer arrived
    error: str = ""  # the shadow gave no usable answer: why


class Mirrors:
    """MirrorStats per route per version (every version can be a shadow: `to: VERSION`, or
    the canary after a promotion swapped roles). Reloads keep surviving objects, as Stats."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, MirrorStats]] = {}

    @classmethod
    def from_config(cls, config: Config) -> Mirrors:
        mirrors = cls()
        mirrors.reconfigure(config)
        return mirrors

    def reconfigure(self, config: Config) -> None:
        routes: dict[str, dict[str, MirrorStats]] = {}
        for route in config.routes:
            old = self._routes.get(route.name, {})
            routes[route.name] = {v: old.get(v) or MirrorStats() for v in route.version_names}
        self._routes = routes

    def get(self, route: str, version: str) -> MirrorStats:
        return self._routes[route][version]

    def items(self) -> Iterator[tuple[str, str, MirrorStats]]:
        for route, versions in self._routes.items():
            for version, ms in versions.items():
                yield route, version, ms

    def recent(self, route: str) -> list[Mismatch]:
        """The route's last RECENT_MISMATCHES mismatches over all versions, oldest first."""
        rows = [m for ms in self._routes.get(route, {}).values() for m in ms.recent]
        rows.sort(key=lambda m: m.at)
        return rows[-RECENT_MISMATCHES:]
