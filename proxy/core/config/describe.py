"""What `graygate check` prints: routes, weights, rules and rollout of a Config."""

from __future__ import annotations

import urllib.parse

from proxy.core.config.mirror import mirror_warnings
from proxy.core.config.model import GATE_NAMES, Config, MirrorStep, Step, WeightStep
from proxy.core.config.values import format_duration


def _describe_step(step: Step) -> str:
    if isinstance(step, WeightStep):
        return f"{step.weight}%"
    if isinstance(step, MirrorStep):
        return (
            f"mirror {step.percent:g}% for {format_duration(step.seconds)} "
            f"(max mismatch {step.max_mismatch_ratio:g}, min {step.min_samples} samples)"
        )
    return "pause" if step.seconds is None else f"pause {format_duration(step.seconds)}"


def describe(config: Config) -> str:
    """The resolved config as `graygate check` prints it."""
    token = "token set" if config.admin.token else "no token"
    tls = config.listen_tls
    https = f" (https, {tls.min_version}+, cert {tls.cert})" if tls is not None else ""
    lines = [
        f"listen {config.listen}{https}, admin {config.admin.listen} ({token})",
        f"state {config.state.backend} "
        + (config.state.path if config.state.backend == "file" else config.state.redis_url),
        f"timeouts connect {format_duration(config.timeouts.connect)}, "
        f"read {format_duration(config.timeouts.read)}, "
        f"request {format_duration(config.timeouts.request)}; workers {config.workers}",
    ]
    for n in config.notifications:
        where = urllib.parse.urlsplit(n.url)
        lines.append(
            f"notification {n.name}: {n.format} to {where.scheme}://{where.netloc.rpartition('@')[2]}"
            f" on {', '.join(n.events)} (timeout {format_duration(n.timeout)}, "
            f"{n.retries} retries)"
        )
    for r in config.routes:
        lines.append(f"route {r.name}: host {r.match.host} path_prefix {r.match.path_prefix}")
        for v in r.versions:
            role = " (stable)" if v.name == r.stable else ""
            urls = ", ".join(e.url for e in v.endpoints)
            lines.append(f"  version {v.name}{role}: {urls}")
        lines.append("  weights " + " ".join(f"{n}={w}" for n, w in r.weights))
        if r.sticky is None:
            lines.append("  sticky: off (weighted choice per request)")
        else:
            c = r.sticky.cookie
            keys = [f"{k.kind}:{k.name}" for k in r.sticky.keys]
            keys.append(f"own cookie {c.name} (max_age {format_duration(c.max_age)})")
            lines.append("  sticky: " + ", then ".join(keys))
        for f in r.force:
            test = f"= {f.value!r}" if f.regex is None else f"~ /{f.regex}/"
            lines.append(f"  force: {f.kind} {f.name} {test} -> {f.to}")
        ro = r.rollout
        steps = ", ".join(_describe_step(s) for s in ro.steps)
        lines.append(
            f"  rollout: steps {steps} every {format_duration(ro.interval)}; "
            f"min_samples {ro.analysis.min_samples}, on_failure {ro.on_failure}"
        )
        for gate in GATE_NAMES:
            g = ro.gates.get(gate)
            if g is not None:
                host = urllib.parse.urlsplit(g.url).netloc.rpartition("@")[2]
                lines.append(f"  gate {gate}: {host} (timeout {format_duration(g.timeout)})")
        if ro.analysis.prometheus is not None and ro.analysis.source == "prometheus":
            lines.append(f"  analysis source: prometheus {ro.analysis.prometheus.url}")
        m = r.mirror
        if m is not None:
            noise = ", noise floor from stable" if m.noise else ""
            lines.append(
                f"  mirror: {m.percent:g}% of {', '.join(m.methods)} to {m.to}, "
                f"compare body {m.compare.body}{noise}"
            )
    return "\n".join(lines)


def config_warnings(config: Config) -> list[str]:
    """What `graygate check` warns about in a valid config."""
    return [
        w
        for i, r in enumerate(config.routes)
        for w in mirror_warnings(r.mirror, f"routes[{i}].mirror")
    ]
