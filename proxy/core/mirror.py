"""Shadow traffic, the pure part: what one answer looks like once captured, the result of
comparing a primary's answer with its shadow's, the mismatch evidence kept per route, and
the per-(route, version) counters the data plane bumps and metrics/rollout read.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from proxy.core.config.mirror import JsonStep, parse_json_path
from proxy.core.config.model import (
    CompareConfig,
    Config,
    MirrorConfig,
    MirrorStep,
    RouteConfig,
    Step,
)
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


# --- the comparison (pure) -----------------------------------------------------------------

MAX_JSON_DIFFS = 20  # differing paths kept per answer (evidence and noise counts)
NOISE_RELATIVE = 0.2  # the canary must differ 20 % more often than stable differs from stable
NOISE_ABSOLUTE = 0.01  # ... and by more than 1 % of the copies compared with both
NOISE_FIELDS = 1024  # fields tracked per route; beyond, a difference always counts
ABSENT = ""  # the evidence value of a JSON member one side does not have


@dataclass(frozen=True, slots=True)
class Comparison:
    """One primary/shadow pair compared: the result by precedence, and every difference."""

    result: MirrorResult
    status: bool  # the statuses differ (and compare.status)
    headers: tuple[str, ...]  # compared header names whose values differ
    body: bool  # the bodies differ (digest, or JSON at `json_paths`)
    json_paths: tuple[JsonDiff, ...]

    def fields(self) -> list[str]:
        """The differences as the noise floor counts them: status, header:NAME, body or $.path."""
        keys = ["status"] if self.status else []
        keys += [f"header:{h}" for h in self.headers]
        if self.json_paths:
            keys += [d.path for d in self.json_paths]
        elif self.body:
            keys.append("body")
        return keys


def _result(status: bool, headers: Sequence[str], body: bool) -> MirrorResult:
    if status:
        return "status_mismatch"
    if headers:
        return "header_mismatch"
    return "body_mismatch" if body else "match"


def compare(primary: Capture, shadow: Capture, rules: CompareConfig) -> Comparison:
    """Precedence: shadow_error > status_mismatch > header_mismatch > body_mismatch > match."""
    if shadow.error or not shadow.complete:
        return Comparison("shadow_error", False, (), False, ())
    status = rules.status and primary.status != shadow.status
    headers = tuple(
        h
        for h in rules.headers
        if h not in rules.ignore_headers and primary.headers.get(h) != shadow.headers.get(h)
    )
    body = False
    diffs: tuple[JsonDiff, ...] = ()
    if rules.body == "json" and primary.json_ok and shadow.json_ok:
        ignore = [p for p in map(parse_json_path, rules.ignore_json_paths) if p is not None]
        found: list[JsonDiff] = []
        _diff(primary.json, shadow.json, [], ignore, found)
        diffs = tuple(found)
        body = bool(diffs)
    elif rules.body != "none":
        body = primary.digest != shadow.digest
    return Comparison(_result(status, headers, body), status, headers, body, diffs)


def _ignored(path: list[JsonStep], ignore: list[tuple[JsonStep, ...]]) -> bool:
    # A pattern ignores the subtree it names: "$.meta" covers "$.meta.at".
    for pattern in ignore:
        if len(pattern) <= len(path) and all(
            (p is None and isinstance(s, int)) or p == s
            for p, s in zip(pattern, path, strict=False)
        ):
            return True
    return False


def render_path(path: list[JsonStep]) -> str:
    return "$" + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in path)


def truncate(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= TRUNCATE else text[: TRUNCATE - 1] + "\u2026"


_MISSING = object()


def _diff(
    a: object,
    b: object,
    path: list[JsonStep],
    ignore: list[tuple[JsonStep, ...]],
    out: list[JsonDiff],
) -> None:
    if len(out) >= MAX_JSON_DIFFS or _ignored(path, ignore):
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            _diff(a.get(key, _MISSING), b.get(key, _MISSING), [*path, key], ignore, out)
        return
    if isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            _diff(
                a[i] if i < len(a) else _MISSING,
                b[i] if i < len(b) else _MISSING,
                [*path, i],
                ignore,
                out,
            )
        return
    # bool is an int to Python, not to JSON: true and 1 differ.
    if type(a) is type(b) and a == b:
        return
    out.append(
        JsonDiff(
            render_path(path),
            ABSENT if a is _MISSING else truncate(a),
            ABSENT if b is _MISSING else truncate(b),
        )
    )


class NoiseFloor:
    """Diffy's primary/secondary/candidate rule for one (route, shadow version): per field,
    how often the canary's copy differed from the primary's answer and how often the stable
    copy did. A canary difference counts only where the canary differs more often."""

    __slots__ = ("canary", "samples", "stable")

    def __init__(self) -> None:
        self.samples = 0  # copies where the primary, the canary and stable all answered
        self.canary: dict[str, int] = {}
        self.stable: dict[str, int] = {}

    def observe(self, canary: Comparison, stable: Comparison) -> None:
        self.samples += 1
        for counts, keys in ((self.canary, canary.fields()), (self.stable, stable.fields())):
            for key in keys:
                if key in counts or len(counts) < NOISE_FIELDS:
                    counts[key] = counts.get(key, 0) + 1

    def counts(self, key: str) -> bool:
        """A difference at `key` is the canary's own (not noise)."""
        c = self.canary.get(key)
        if c is None or self.samples == 0:
            return True  # not tracked: count it
        s = self.stable.get(key, 0)
        return c > s * (1 + NOISE_RELATIVE) and (c - s) / self.samples > NOISE_ABSOLUTE

    def judge(self, canary: Comparison) -> Comparison:
        """The canary's comparison with the noisy fields taken out."""
        status = canary.status and self.counts("status")
        headers = tuple(h for h in canary.headers if self.counts(f"header:{h}"))
        diffs = tuple(d for d in canary.json_paths if self.counts(d.path))
        body = bool(diffs) if canary.json_paths else canary.body and self.counts("body")
        return Comparison(_result(status, headers, body), status, headers, body, diffs)


# --- which mirror a route runs now ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActiveMirror:
    """The mirror in force on a route in one policy snapshot (RoutePolicy.mirror)."""

    config: MirrorConfig  # the route's `mirror:`, or MirrorConfig() under a mirror step
    to: str  # the shadow version, never the stable one
    percent: float  # 0..100 of the eligible requests
    step: bool  # set by a rollout's mirror step (else by the route's `mirror:`)


def active_mirror(
    route: RouteConfig,
    stable: str,
    canary: str | None,
    phase: str,
    steps: tuple[Step, ...],
    index: int,
) -> ActiveMirror | None:
    """A progressing rollout whose current step (the rollout's steps, else the route's) is a
    mirror step copies to the canary at the step's percent with the route's compare rules;
    else the route's `mirror:` applies, `to: canary` resolved. None when the target is
    missing or is stable, or the percent is 0."""
    steps = steps or route.rollout.steps
    step = steps[index] if 0 <= index < len(steps) else None
    in_step = phase == "progressing" and isinstance(step, MirrorStep)
    if in_step and isinstance(step, MirrorStep):
        config, target, percent = route.mirror or MirrorConfig(), canary, step.percent
    elif route.mirror is not None:
        config = route.mirror
        target = canary if config.to == "canary" else config.to
        percent = config.percent
    else:
        return None
    if target is None or target == stable or percent <= 0:
        return None
    return ActiveMirror(config, target, percent, in_step)
