"""The cost of shadow traffic (DESIGN.md section 10, "mirroring 10 % of traffic"): graygate
with its real configuration, and the same with `mirror: {percent: 10}` to green, measured in
one run, interleaved, 5 B responses over 64 keep-alive connections (wrk); req/s and CPU
microseconds per user request of the graygate process (from /proc), shadows counted.
"""

from __future__ import annotations

import statistics
import urllib.request
from typing import TYPE_CHECKING, Any

from benchmarks.procs import GraygateConfig, free_port, graygate_yaml, pin, wait_port

if TYPE_CHECKING:
    from benchmarks.run import Bench, Progress

SCENARIO = "mirror-10"
PERCENT = 10
PLAIN, MIRRORED = "graygate", f"graygate-mirror-{PERCENT}"
DESCRIPTION = (
    f"graygate without a mirror and with `mirror: {{percent: {PERCENT}}}` to green (shadow "
    "answers compared by digest; blue and green serve the same 5 B body), same run, "
    "interleaved, 64 keep-alive connections (wrk); target: the mirror costs <= 10 % of req/s"
)
MIRROR_YAML = f"    mirror: {{to: canary, percent: {PERCENT}, compare: {{body: digest}}}}\n"


def start(bench: Bench, name: str, mirrored: bool) -> tuple[str, int, GraygateConfig]:
    cfg = GraygateConfig(
        free_port(),
        free_port(),
        f"http://127.0.0.1:{bench.blue_port}",
        f"http://127.0.0.1:{bench.green_port}",
        weights=(100, 0),  # users on blue; the shadows go to green
    )
    assert bench.gg_cmd is not None
    conf_dir = bench.work / name
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "graygate.yaml"
    # The route is the last mapping of the file, so an appended key belongs to it.
    conf.write_text(graygate_yaml(cfg, conf_dir / "state.json") + (MIRROR_YAML if mirrored else ""))
    proc = bench.procs.start([*pin(bench.proxy_cpu), *bench.gg_cmd, "serve", "-c", str(conf)], name)
    try:
        wait_port(cfg.port, proc, timeout=15.0)
    except RuntimeError as exc:
        bench.procs.stop(proc)
        raise RuntimeError(f"graygate: {exc}\n{bench.procs.log_tail(name)}") from exc
    bench.proxies.append(proc)
    return f"http://127.0.0.1:{cfg.port}", proc.pid, cfg


def shadow_counts(admin_port: int) -> dict[str, float]:
    """graygate_mirror_requests_total by result, from the admin's /metrics."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("graygate_mirror_requests_total{") and 'version="green"' in line:
            result = line.split('result="')[1].split('"')[0]
            out[result] = out.get(result, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run(bench: Bench, progress: Progress) -> None:
    entry: dict[str, Any] = {"description": DESCRIPTION, "runs": {}}
    bench.raw["scenarios"][SCENARIO] = entry
    if bench.gg_cmd is None:
        entry["note"] = "graygate unavailable: no graygate command found"
        progress.step(f"{SCENARIO} skipped")
        return
    try:
        variants = {PLAIN: start(bench, PLAIN, False), MIRRORED: start(bench, MIRRORED, True)}
    except RuntimeError as exc:
        bench.stop_proxies()
        entry["note"] = f"graygate unavailable: {str(exc).splitlines()[0]}"
        progress.step(f"{SCENARIO} skipped")
        return
    try:
        for i in range(bench.args.runs):
            for v, (url, pid, cfg) in variants.items():
                progress.show(f"{SCENARIO} {v} run {i + 1}/{bench.args.runs}")
                before = shadow_counts(cfg.admin_port)
                try:
                    result = bench.measure("keepalive-5b", url, pid)
                except (RuntimeError, ValueError, OSError) as exc:
                    result = {"error": str(exc)[:500]}
                after = shadow_counts(cfg.admin_port)
                shadows = {k: round(after.get(k, 0.0) - before.get(k, 0.0)) for k in after}
                result["shadows"] = {k: n for k, n in shadows.items() if n}
                if result.get("requests"):
                    result["shadow_share"] = round(
                        sum(shadows.values()) / int(result["requests"]), 4
                    )
                entry["runs"].setdefault(v, []).append(result)
    finally:
        bench.stop_proxies()
    entry["mirror_cost"] = cost(entry["runs"].get(PLAIN, []), entry["runs"].get(MIRRORED, []))
    value = entry["mirror_cost"]["rps_ratio"]
    entry["target"] = {
        "label": f"{MIRRORED}/{PLAIN}",
        "figure": "rps",
        "bound": ">= 0.9",
        "value": value,
        "met": None if value is None else value >= 0.9,
    }
    progress.step(SCENARIO)


def cost(plain: list[dict[str, Any]], mirrored: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-run pairs (interleaved, so close in time): req/s ratio mirrored/plain and the
    extra CPU per user request; medians over the pairs."""
    pairs = [(p, m) for p, m in zip(plain, mirrored, strict=False) if "rps" in p and "rps" in m]
    ratios = [m["rps"] / p["rps"] for p, m in pairs if p["rps"]]
    cpu = [
        m["cpu_us_per_req"] - p["cpu_us_per_req"]
        for p, m in pairs
        if "cpu_us_per_req" in p and "cpu_us_per_req" in m
    ]
    shares = [m["shadow_share"] for _, m in pairs if "shadow_share" in m]
    return {
        "rps_ratio": round(statistics.median(ratios), 3) if ratios else None,
        "extra_cpu_us_per_req": round(statistics.median(cpu), 2) if cpu else None,
        "shadow_share": round(statistics.median(shares), 4) if shares else None,
    }
