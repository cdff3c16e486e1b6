"""Turn the harness's raw runs into results.json, results.md and results.png.

Per scenario and variant: median req/s (min-max), latency percentiles, errors, CPU us per
request, peak RSS; graygate/nginx ratios are the median of per-run (pair by pair) ratios.
"graygate" is the default (compiled) build, "graygate-pure" the pure-Python one; the
targets are judged on "graygate".
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

# DESIGN.md section 10: scenario -> (figure, comparison, bound)
TARGETS: dict[str, tuple[str, str, float]] = {
    "keepalive-5b": ("rps", ">=", 0.75),
    "keepalive-64k": ("rps", ">=", 0.90),
    "newconn": ("rps", ">=", 0.60),
    "fixed-rate": ("p99", "<=", 1.5),
    "tls-keepalive-5b": ("rps", ">=", 0.75),
    "workers-2": ("rps", ">=", 0.75),
}
RSS_TARGET_KIB = 64 * 1024


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):  # no /proc/cpuinfo: the report says "unknown"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
    }


def _version(argv: list[str], pattern: str) -> str | None:
    exe = shutil.which(argv[0]) or (
        f"/usr/sbin/{argv[0]}" if Path(f"/usr/sbin/{argv[0]}").exists() else None
    )
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else None


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize_variant(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    rps = [float(r["rps"]) for r in ok]
    out: dict[str, Any] = {
        "runs": len(runs),
        "failed_runs": len(runs) - len(ok),
        "rps_median": _median(rps),
        "rps_min": min(rps) if rps else None,
        "rps_max": max(rps) if rps else None,
    }
    for p in ("p50", "p99", "p99.9"):
        out[f"{p}_ms"] = _median(
            [float(r["latency_ms"][p]) for r in ok if r["latency_ms"].get(p) is not None]
        )
    out["errors"] = sum(int(r.get("errors_total", 0)) for r in ok)
    out["non2xx"] = sum(int(r.get("non2xx", 0)) for r in ok)
    for key in ("cpu_us_per_req", "user_us_per_req"):  # user: the proxy's own code
        out[key] = _median([float(r[key]) for r in ok if r.get(key)])
    rss = [int(r["peak_rss_kib"]) for r in ok if r.get("peak_rss_kib")]
    out["peak_rss_mib"] = round(max(rss) / 1024, 1) if rss else None
    per_process = [r["rss_kib_by_process"] for r in ok if r.get("rss_kib_by_process")]
    if per_process and len(per_process[-1]) > 1:  # several processes: each one's peak
        out["rss_mib_by_process"] = sorted(
            round(int(kib) / 1024, 1) for kib in per_process[-1].values()
        )
    if ok and ok[0].get("rate_target"):
        out["rate_target"] = ok[0]["rate_target"]
    errs = [r["error"] for r in runs if "error" in r]
    if errs:
        out["run_errors"] = errs[:3]
    return out


def pair_ratios(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float | None:
    """Median over runs i of a[i][key] / b[i][key] (runs are interleaved, so pairs are close)."""
    ratios = []
    for ra, rb in zip(a, b, strict=False):
        va, vb = _figure(ra, key), _figure(rb, key)
        if va is not None and vb:
            ratios.append(va / vb)
    return round(statistics.median(ratios), 3) if ratios else None


def _figure(run: dict[str, Any], key: str) -> float | None:
    if "error" in run:
        return None
    if key == "rps":
        return float(run["rps"])
    v = run.get("latency_ms", {}).get(key)
    return None if v is None else float(v)


def build(raw: dict[str, Any]) -> dict[str, Any]:
    scenarios: dict[str, Any] = {}
    for name, sc in raw["scenarios"].items():
        runs: dict[str, list[dict[str, Any]]] = sc.get("runs", {})
        entry: dict[str, Any] = {k: v for k, v in sc.items() if k != "runs"}
        entry["variants"] = {v: summarize_variant(r) for v, r in runs.items()}
        if "graygate" in runs and "nginx" in runs:
            ratios = {
                "rps": pair_ratios(runs["graygate"], runs["nginx"], "rps"),
                "p99": pair_ratios(runs["graygate"], runs["nginx"], "p99"),
            }
            entry["ratio_graygate_nginx"] = ratios
            if name in TARGETS:
                figure, cmp, bound = TARGETS[name]
                val = ratios[figure]
                entry["target"] = {
                    "figure": figure,
                    "bound": f"{cmp} {bound}",
                    "value": val,
                    "met": None if val is None else (val >= bound if cmp == ">=" else val <= bound),
                }
        if "graygate" in runs and "graygate-pure" in runs:
            entry["ratio_pure_compiled"] = {
                "rps": pair_ratios(runs["graygate-pure"], runs["graygate"], "rps"),
                "p99": pair_ratios(runs["graygate-pure"], runs["graygate"], "p99"),
            }
        entry["runs"] = runs
        scenarios[name] = entry
    return {
        "machine": raw["machine"],
        "settings": raw["settings"],
        "pinning": raw["pinning"],
        "graygate_builds": raw.get("graygate_builds", {}),
        "scenarios": scenarios,
    }


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    lines = [
        "# graygate benchmark",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}",
        f"- python {m['python']}, nginx {m['nginx']}, wrk {m['wrk']}",
        f"- runs: {s['runs']} x {s['duration']} s per variant, interleaved; scenarios: "
        + ", ".join(res["scenarios"]),
        f"- pinning: {res['pinning']}",
    ]
    builds = res.get("graygate_builds") or {}
    if builds:
        lines.append("- graygate builds: " + ", ".join(f"{v}: {b}" for v, b in builds.items()))
    lines.append("")
    for name, sc in res["scenarios"].items():
        lines += [f"## {name}", ""]
        if sc.get("description"):
            lines += [sc["description"], ""]
        if sc.get("note"):
            lines += [f"Note: {sc['note']}", ""]
        if sc.get("variants"):
            lines += [
                "| variant | req/s median (min-max) | p50 ms | p99 ms | p99.9 ms | errors "
                "| non-2xx | CPU us/req | peak RSS MiB |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for v, d in sc["variants"].items():
                rng = (
                    f"({_fmt(d['rps_min'])}-{_fmt(d['rps_max'])})"
                    if d["rps_min"] is not None
                    else ""
                )
                lines.append(
                    f"| {v} | {_fmt(d['rps_median'])} {rng} | {_fmt(d['p50_ms'], 3)} | "
                    f"{_fmt(d['p99_ms'], 3)} | {_fmt(d['p99.9_ms'], 3)} | {d['errors']} | "
                    f"{d['non2xx']} | {_fmt(d['cpu_us_per_req'], 1)} | "
                    f"{_fmt(d['peak_rss_mib'], 1)} |"
                )
                if d.get("run_errors"):
                    lines.append(
                        f"|  | failed runs: {d['failed_runs']}: "
                        f"{d['run_errors'][0][:120]!r} |||||||"
                    )
            users = {v: d.get("user_us_per_req") for v, d in sc["variants"].items()}
            users = {v: u for v, u in users.items() if u is not None}
            if users:  # user time is the proxy's own code; the kernel's share is alike
                lines.append(
                    "- user CPU us/req: " + ", ".join(f"{v} {_fmt(u, 1)}" for v, u in users.items())
                )
            for v, d in sc["variants"].items():
                if d.get("rss_mib_by_process"):
                    lines.append(f"- {v}: peak RSS per process MiB {d['rss_mib_by_process']}")
            lines.append("")
        ratio = sc.get("ratio_graygate_nginx")
        if ratio:
            lines.append(
                f"graygate/nginx (median of per-run ratios): req/s {_fmt(ratio['rps'], 3)}, "
                f"p99 {_fmt(ratio['p99'], 3)}"
            )
        pure = sc.get("ratio_pure_compiled")
        if pure:
            lines.append(
                f"graygate-pure/graygate (median of per-run ratios): req/s {_fmt(pure['rps'], 3)}, "
                f"p99 {_fmt(pure['p99'], 3)}"
            )
        t = sc.get("target")
        if t:
            verdict = {True: "met", False: "NOT met", None: "unknown"}[t["met"]]
            lines.append(
                f"target: {t['figure']} ratio {t['bound']}: {_fmt(t['value'], 3)} ({verdict})"
            )
        for key in ("churn", "rollback", "mirror_cost"):
            if sc.get(key):
                lines.append(
                    f"{key}: "
                    + ", ".join(f"{k}={v}" for k, v in sc[key].items() if k != "timeline")
                )
        lines.append("")
    return "\n".join(lines)


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = {n: sc for n, sc in res["scenarios"].items() if sc.get("variants")}
    timelines = {
        n: sc[k]["timeline"]
        for n, sc in res["scenarios"].items()
        for k in ("churn", "rollback")
        if sc.get(k, {}).get("timeline")
    }
    rows = 1 + (1 if timelines else 0)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.5 * rows), squeeze=False)
    names = list(bench)
    variants = sorted({v for sc in bench.values() for v in sc["variants"]}, key=_variant_order)
    width = 0.8 / max(1, len(variants))
    for col, (key, label) in enumerate(
        (("rps_median", "req/s (median)"), ("p99_ms", "p99 latency ms"))
    ):
        ax = axes[0][col]
        for i, v in enumerate(variants):
            vals = [bench[n]["variants"].get(v, {}).get(key) or 0 for n in names]
            xs = [x + i * width for x in range(len(names))]
            ax.bar(xs, vals, width, label=v)
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(names))])
        ax.set_xticklabels(names, rotation=15, fontsize=8)
        ax.set_title(label)
        ax.legend(fontsize=8)
    if timelines:
        for col, (name, tl) in enumerate(list(timelines.items())[:2]):
            ax = axes[1][col]
            ts = [p["t"] for p in tl]
            ax.plot(ts, [p["green_share"] for p in tl], label="green share observed", lw=1)
            if any("green_weight" in p for p in tl):
                ax.step(
                    ts,
                    [p.get("green_weight", 0) / 100 for p in tl],
                    where="post",
                    label="green weight set",
                    lw=1,
                )
            ax.plot(ts, [p.get("errors", 0) for p in tl], label="5xx per bucket", lw=1, color="red")
            ax.set_title(f"{name}: split over time")
            ax.set_xlabel("seconds")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _variant_order(v: str) -> tuple[int, str]:
    order = {"direct": 0, "graygate": 1, "graygate-pure": 2, "nginx": 3}
    return (order.get(v, 9), v)


def write(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    res = build(raw)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "results.md").write_text(markdown(res))
    try:
        chart(res, out / "results.png")
    except ImportError:
        print("matplotlib missing: no results.png (pip install matplotlib)", file=sys.stderr)
    return res
