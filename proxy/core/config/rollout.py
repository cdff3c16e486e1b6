"""Parsing of the rollout sections: steps (the one rule of config, API and CLI),
analysis thresholds, the metrics source (local or prometheus) and the manual gates.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable

from proxy.core.config.model import (
    GATE_NAMES,
    ON_FAILURE,
    REASONS,
    SOURCES,
    AnalysisConfig,
    ConfigError,
    GateConfig,
    GatesConfig,
    MirrorStep,
    PauseStep,
    PrometheusConfig,
    Reason,
    RolloutConfig,
    SourceName,
    Step,
    WeightStep,
)
from proxy.core.config.values import (
    _T,
    _choice,
    _fail,
    _int,
    _key,
    _list,
    _number,
    _positive_duration,
    _probability,
    _str,
    _table,
    _webhook_url,
    format_duration,
)

# --- rollout -----------------------------------------------------------------------------------

_ANALYSIS_KEYS = tuple(AnalysisConfig.__dataclass_fields__)
_SOURCE_KEYS = ("source", "prometheus")
_MIRROR_STEP_KEYS = tuple(
    ("mirror", *(k for k in MirrorStep.__dataclass_fields__ if k != "seconds"))
)  # the top-level `analysis:` holds only these


def parse_steps(value: object, path: str) -> tuple[Step, ...]:
    """Rollout steps: mirror entries first, then weights 1..100 strictly increasing, and
    pause entries anywhere. The one rule for the config file, `POST .../rollout` and
    `graygate rollout start --steps`."""
    help_ = (
        "weights 1..100, {pause: true} / {pause: <duration>} and "
        "{mirror: <duration>, percent, max_mismatch_ratio, min_samples} entries"
    )
    items = _list(value, path, help_)
    if not items:
        _fail(path, f"must be a non-empty list of {help_}")
    steps: list[Step] = []
    last = 0
    for i, item in enumerate(items):
        p = f"{path}[{i}]"
        if isinstance(item, dict) and "mirror" in item:
            if last:
                _fail(
                    _key(p, "mirror"),
                    "mirror steps must come before the first weight step "
                    f"(an earlier step already sends {last}% of users to the canary)",
                )
            steps.append(_mirror_step(item, p))
            continue
        if isinstance(item, dict):
            pause = _table(item, p, ("pause", "mirror"), ("pause",))["pause"]
            if pause is True:
                steps.append(PauseStep(None))
            elif pause is False or pause is None:
                _fail(_key(p, "pause"), "must be true (wait for resume) or a duration", pause)
            else:
                steps.append(PauseStep(_positive_duration(pause, _key(p, "pause"))))
            continue
        if isinstance(item, bool) or not isinstance(item, int):
            _fail(p, f"must be a weight 1..100 or a pause or mirror entry ({help_})", item)
        weight = _int(item, p, 1, 100)
        if weight <= last:
            _fail(p, f"steps must increase; the previous weight step is {last}", weight)
        last = weight
        steps.append(WeightStep(weight))
    return tuple(steps)


def _mirror_step(item: dict[object, object], path: str) -> MirrorStep:
    t = _table(item, path, _MIRROR_STEP_KEYS, ("mirror",))
    d = MirrorStep(0.0)
    return MirrorStep(
        seconds=_positive_duration(t["mirror"], _key(path, "mirror")),
        percent=_percent(t.get("percent", d.percent), _key(path, "percent")),
        max_mismatch_ratio=_probability(
            t.get("max_mismatch_ratio", d.max_mismatch_ratio), _key(path, "max_mismatch_ratio")
        ),
        min_samples=_int(t.get("min_samples", d.min_samples), _key(path, "min_samples"), 1),
    )


def _percent(value: object, path: str) -> float:
    allowed = "0.01..100 in steps of 0.01"
    p = _number(value, path, allowed)
    if not 0.0 < p <= 100.0 or abs(round(p, 2) - p) > 1e-9:
        _fail(path, f"must be {allowed}", value)
    return round(p, 2)


def steps_to_json(steps: tuple[Step, ...]) -> list[object]:
    """Steps as parse_steps reads them (stored states, the API's answers)."""
    out: list[object] = []
    for s in steps:
        if isinstance(s, WeightStep):
            out.append(s.weight)
        elif isinstance(s, PauseStep):
            out.append({"pause": True if s.seconds is None else s.seconds})
        else:
            out.append(
                {
                    "mirror": s.seconds,
                    "percent": s.percent,
                    "max_mismatch_ratio": s.max_mismatch_ratio,
                    "min_samples": s.min_samples,
                }
            )
    return out


def steps_from_json(raw: object) -> tuple[Step, ...]:
    """Stored steps back (ValueError for a mirror entry that no longer parses: dropping it
    would shift the step index)."""
    steps: list[Step] = []
    for s in raw if isinstance(raw, list | tuple) else []:
        if isinstance(s, int) and not isinstance(s, bool):
            steps.append(WeightStep(s))
        elif isinstance(s, dict) and "mirror" in s:
            try:
                steps.append(_mirror_step(s, "steps"))
            except ConfigError as exc:
                raise ValueError(str(exc)) from exc
        elif isinstance(s, dict):
            p = s.get("pause")
            if p is not True and not isinstance(p, int | float | str | None):
                raise ValueError(f"expected a pause duration, got {p!r}")
            steps.append(PauseStep(None if p is True else float(p or 0.0)))
    return tuple(steps)


def _analysis(value: object, path: str, inherited: AnalysisConfig | None = None) -> AnalysisConfig:
    t = _table(value, path, _ANALYSIS_KEYS)
    d = AnalysisConfig()
    source, prometheus = _metrics_source(t, path, inherited or d)

    def get(key: str, parse: Callable[[object, str], _T], default: _T) -> _T:
        return parse(t[key], _key(path, key)) if key in t else default

    def optional(parse: Callable[[object, str], float]) -> Callable[[object, str], float | None]:
        return lambda v, p: None if v is None else parse(v, p)

    def ratio(v: object, p: str) -> float:
        r = _number(v, p, "> 0")
        if r <= 0:
            _fail(p, "must be > 0", v)
        return r

    def confidence(v: object, p: str) -> float:
        c = _number(v, p, "between 0.5 and 1 (exclusive)")
        if not 0.5 < c < 1.0:
            _fail(p, "must be between 0.5 and 1 (exclusive), e.g. 0.95 or 0.99", v)
        return c

    def reasons(v: object, p: str) -> tuple[Reason, ...]:
        items = _list(v, p, f"reasons ({', '.join(REASONS)})")
        return tuple(_choice(r, f"{p}[{i}]", REASONS) for i, r in enumerate(items))

    return AnalysisConfig(
        min_samples=get("min_samples", lambda v, p: _int(v, p, 1), d.min_samples),
        max_error_rate=get("max_error_rate", _probability, d.max_error_rate),
        max_error_rate_increase=get(
            "max_error_rate_increase", _probability, d.max_error_rate_increase
        ),
        max_p99_latency=get("max_p99_latency", optional(_positive_duration), d.max_p99_latency),
        max_latency_ratio=get("max_latency_ratio", optional(ratio), d.max_latency_ratio),
        confidence=get("confidence", confidence, d.confidence),
        exclude_reasons=get("exclude_reasons", reasons, d.exclude_reasons),
        source=source,
        prometheus=prometheus,
    )


# --- metrics source of the rollout analysis (several replicas: prometheus) ------------------

# PromQL label matchers: name op "value", comma-separated; no braces, so a selector can be
# pasted inside every query's {...} without changing its meaning.
_MATCHER = r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*'
_SELECTOR = re.compile(rf"(?:{_MATCHER}(?:,{_MATCHER})*)?,?\s*")


def _prometheus(value: object, path: str) -> PrometheusConfig:
    t = _table(value, path, tuple(PrometheusConfig.__dataclass_fields__), ("url",))
    url = _str(t["url"], _key(path, "url")).strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        _fail(_key(path, "url"), 'must be "http(s)://host:port[/path]" without a query', url)
    selector = t.get("replicas_selector", "")
    selector_path = _key(path, "replicas_selector")
    if not isinstance(selector, str) or not _SELECTOR.fullmatch(selector):
        _fail(selector_path, "must be PromQL label matchers like 'job=\"graygate\"'", selector)
    d = PrometheusConfig(url)
    return PrometheusConfig(
        url=url,
        timeout=_positive_duration(t.get("timeout", d.timeout), _key(path, "timeout")),
        replicas_selector=selector.strip().rstrip(",").strip(),
        scrape_interval=_positive_duration(
            t.get("scrape_interval", d.scrape_interval), _key(path, "scrape_interval")
        ),
    )


def _metrics_source(
    t: dict[str, object], path: str, inherited: AnalysisConfig
) -> tuple[SourceName, PrometheusConfig | None]:
    """`source` and `prometheus` of one analysis table; unset keys come from `inherited`
    (the top-level `analysis:`)."""
    source = inherited.source
    if "source" in t:
        source = _choice(t["source"], _key(path, "source"), SOURCES)
    prometheus = inherited.prometheus
    if t.get("prometheus") is not None:
        prometheus = _prometheus(t["prometheus"], _key(path, "prometheus"))
    if source == "prometheus" and prometheus is None:
        _fail(
            _key(path, "prometheus"),
            "is required with source: prometheus ({url: ...}; here or in the top-level analysis)",
        )
    return source, prometheus


def _global_source(value: object, path: str) -> AnalysisConfig:
    t = _table(value, path, _SOURCE_KEYS)
    source, prometheus = _metrics_source(t, path, AnalysisConfig())
    return AnalysisConfig(source=source, prometheus=prometheus)


def _check_window(interval: float, analysis: AnalysisConfig, path: str) -> None:
    # increase() needs two samples of every series inside a window.
    prom = analysis.prometheus
    if analysis.source == "prometheus" and prom is not None and interval < 2 * prom.scrape_interval:
        _fail(
            _key(path, "interval"),
            f"must be at least 2 scrape intervals ({format_duration(2 * prom.scrape_interval)}) "
            "with source: prometheus",
            interval,
        )


def _rollout(value: object, path: str, inherited: AnalysisConfig | None = None) -> RolloutConfig:
    t = _table(
        value,
        path,
        (
            "steps",
            "interval",
            "analysis",
            "failure_limit",
            "on_failure",
            "max_inconclusive",
            "gates",
        ),
    )
    d = RolloutConfig()
    interval = _positive_duration(t.get("interval", d.interval), _key(path, "interval"))
    analysis = _analysis(t.get("analysis"), _key(path, "analysis"), inherited)
    _check_window(interval, analysis, path)
    return RolloutConfig(
        steps=parse_steps(t["steps"], _key(path, "steps")) if "steps" in t else d.steps,
        interval=interval,
        analysis=analysis,
        failure_limit=_int(t.get("failure_limit", d.failure_limit), _key(path, "failure_limit"), 1),
        on_failure=_choice(t.get("on_failure", d.on_failure), _key(path, "on_failure"), ON_FAILURE),
        max_inconclusive=_int(
            t.get("max_inconclusive", d.max_inconclusive), _key(path, "max_inconclusive"), 1
        ),
        gates=_gates(t.get("gates"), _key(path, "gates")),
    )


def _gates(value: object, path: str) -> GatesConfig:
    t = _table(value, path, GATE_NAMES)
    gates: dict[str, GateConfig | None] = {}
    for name in GATE_NAMES:
        if t.get(name) is None:
            gates[name] = None
            continue
        p = _key(path, name)
        g = _table(t[name], p, ("url", "timeout"), ("url",))
        gates[name] = GateConfig(
            url=_webhook_url(g["url"], _key(p, "url")),
            timeout=_positive_duration(g.get("timeout", 5.0), _key(p, "timeout")),
        )
    return GatesConfig(**gates)
