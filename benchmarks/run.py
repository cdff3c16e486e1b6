"""`python -m benchmarks.run`: graygate against nginx and direct access, side by side.

Starts nginx upstreams (blue, green), then per scenario fresh proxies (nginx with
split_clients, graygate with its real configuration: the compiled build as "graygate",
the same install with GRAYGATE_NO_EXTENSIONS=1 as "graygate-pure"), and measures the
variants interleaved (A B C D A B C D ...). Proxy on CPU 0; wrk, our load generator and
upstreams on CPU 1. Writes results.json, results.md and results.png (see report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import mirror, report
from benchmarks.procs import (
    ROUTE,
    GraygateConfig,
    Processes,
    ToolMissing,
    cpu_times,
    free_port,
    graygate_command,
    make_certificate,
    peak_rss_kib,
    pin,
    require_tool,
    rss_by_process_kib,
    start_graygate,
    start_nginx_proxy,
    start_upstream,
    wait_port,
)
from benchmarks.wrk import run_wrk, write_script

WRK_SCENARIOS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "keepalive-5b": ("/5b", (), "5 B responses, 64 keep-alive connections (wrk)"),
    "keepalive-64k": ("/64k", (), "64 KiB responses, 64 keep-alive connections (wrk)"),
    "newconn": ("/5b", ("Connection: close",), "new connection per request, 64 clients (wrk)"),
    "tls-keepalive-5b": (
        "/5b",
        (),
        "5 B responses over HTTPS (TLS 1.3, ECDSA P-256, same files for both proxies), "
        "64 keep-alive connections (wrk); no direct variant: the upstreams speak plain HTTP",
    ),
}
TLS_SCENARIOS = frozenset({"tls-keepalive-5b"})
# N processes on each side, nothing pinned: wrk and the upstreams share the cores with them.
WORKERS_SCENARIO = "workers-2"
WORKERS_DESCRIPTION = (
    "graygate workers: 2 against nginx worker_processes 2, 5 B responses, 64 keep-alive "
    "connections (wrk); unpinned: wrk and the upstreams share the machine's cores with the "
    "proxies; CPU and RSS cover the whole process tree (nginx master + workers, graygate "
    "supervisor + workers + standby), RSS per process"
)
SCENARIOS = (
    *WRK_SCENARIOS,
    "fixed-rate",
    "churn-weights",
    "churn-rollback",
    WORKERS_SCENARIO,
    mirror.SCENARIO,
)
VARIANTS = ("direct", "graygate", "nginx", "graygate-pure")
# The graygate variants: the environment each one runs in. "graygate" is whatever the
# install runs by default (the mypyc-compiled build where a C compiler built it);
# "graygate-pure" forces the pure-Python modules of the same install (proxy/build.py).
GRAYGATE_BUILDS: dict[str, dict[str, str]] = {
    "graygate": {},
    "graygate-pure": {"GRAYGATE_NO_EXTENSIONS": "1"},
}
# A returning user: graygate hashes its cohort cookie, nginx's split_clients reads the same.
COOKIE = "Cookie: gg_uid=bench-user-0001"
CONNECTIONS = 64


class Progress:
    """A plain-text progress bar on stderr."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.done = 0
        self.t0 = time.monotonic()

    def show(self, label: str) -> None:
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(frac * 30)
        elapsed = time.monotonic() - self.t0
        sys.stderr.write(f"\r[{bar:<30}] {self.done}/{self.total} {elapsed:5.0f}s {label[:60]:<60}")
        sys.stderr.flush()

    def step(self, label: str) -> None:
        self.done += 1
        self.show(label)

    def end(self) -> None:
        sys.stderr.write("\n")


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes) -> None:
        self.args = args
        self.procs = procs
        self.work = procs.workdir
        two = (os.cpu_count() or 1) >= 2 and not args.no_pin
        self.proxy_cpu: int | None = 0 if two else None
        self.load_cpu: int | None = 1 if two else None
        self.script = write_script(self.work)
        self.gg_cmd = args.graygate_cmd.split() if args.graygate_cmd else graygate_command()
        self.raw: dict[str, Any] = {
            "machine": report.machine(),
            "settings": {"runs": args.runs, "duration": args.duration, "connections": CONNECTIONS},
            "pinning": (
                "proxy (nginx or graygate) on CPU 0; wrk, load generator and upstreams on CPU 1 "
                "(taskset)"
                if two
                else "none (fewer than 2 CPUs or --no-pin)"
            ),
            "scenarios": {},
        }
        self.raw["graygate_builds"] = self.graygate_builds()
        self.nginx_max: float | None = None
        self.proxies: list[subprocess.Popen[bytes]] = []
        self.workers = 1  # processes per proxy (the workers-2 scenario sets 2)

    # --- setup -------------------------------------------------------------------------

    def graygate_env(self, variant: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "GRAYGATE_NO_EXTENSIONS"}
        return {**env, **GRAYGATE_BUILDS[variant]}

    def graygate_builds(self) -> dict[str, str]:
        """variant -> the build it runs, as `graygate --version` says (compiled: mypyc, or
        pure python), for the graygate variants asked for."""
        builds: dict[str, str] = {}
        for v in GRAYGATE_BUILDS:
            if v not in self.args.variants or self.gg_cmd is None:
                continue
            try:
                out = subprocess.run(
                    [*self.gg_cmd, "--version"],
                    env=self.graygate_env(v),
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                builds[v] = f"unknown ({exc})"
                continue
            line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
            builds[v] = line.rsplit("(", 1)[-1].rstrip(")") if "(" in line else "unknown"
        return builds

    def start_upstreams(self) -> None:
        self.blue_port, self.green_port = free_port(), free_port()
        start_upstream(self.procs, "blue", self.blue_port, self.load_cpu)
        start_upstream(self.procs, "green", self.green_port, self.load_cpu)

    def start_proxies(
        self, variants: list[str], tls: bool = False
    ) -> tuple[dict[str, tuple[str, int | None]], dict[str, str]]:
        """variant -> (base URL, pid to measure); and variant -> why it is unavailable.
        With `tls`, both proxies listen with HTTPS on one certificate made for this run."""
        out: dict[str, tuple[str, int | None]] = {}
        missing: dict[str, str] = {}
        files = make_certificate(self.work) if tls else None
        scheme = "https" if tls else "http"
        for v in variants:
            if v == "direct" and tls:
                missing[v] = "the upstreams speak plain HTTP"
            elif v == "direct":
                out[v] = (f"http://127.0.0.1:{self.blue_port}", None)
            elif v == "nginx":
                port = free_port()
                proc = start_nginx_proxy(
                    self.procs,
                    port,
                    self.blue_port,
                    self.green_port,
                    self.proxy_cpu,
                    files,
                    self.workers,
                )
                self.proxies.append(proc)
                out[v] = (f"{scheme}://127.0.0.1:{port}", proc.pid)
            elif v in GRAYGATE_BUILDS:
                if self.gg_cmd is None:
                    missing[v] = "no graygate command found"
                    continue
                cfg = GraygateConfig(
                    free_port(),
                    free_port(),
                    f"http://127.0.0.1:{self.blue_port}",
                    f"http://127.0.0.1:{self.green_port}",
                    tls=files,
                    workers=self.workers,
                )
                try:
                    proc = start_graygate(
                        self.procs, self.gg_cmd, cfg, self.proxy_cpu, v, self.graygate_env(v)
                    )
                except RuntimeError as exc:
                    missing[v] = str(exc)[:2000]
                    continue
                self.proxies.append(proc)
                out[v] = (f"{scheme}://127.0.0.1:{cfg.port}", proc.pid)
        return out, missing

    def stop_proxies(self) -> None:
        for proc in self.proxies:
            self.procs.stop(proc)
        self.proxies.clear()

    # --- one measurement ---------------------------------------------------------------

    def measure(self, scenario: str, url: str, pid: int | None) -> dict[str, Any]:
        cpu0 = cpu_times(pid) if pid else (0.0, 0.0)
        if scenario in WRK_SCENARIOS or scenario == WORKERS_SCENARIO:
            path, headers, _ = WRK_SCENARIOS.get(scenario, WRK_SCENARIOS["keepalive-5b"])
            w = run_wrk(
                url + path,
                self.args.duration,
                CONNECTIONS,
                self.script,
                (COOKIE, *headers),
                self.load_cpu,
            )
            lat = w["latency_us"]
            assert isinstance(lat, dict)
            errors = w["errors"]
            assert isinstance(errors, dict)
            run: dict[str, Any] = {
                "requests": w["requests"],
                "rps": w["rps"],
                "latency_ms": {k: round(float(v) / 1000, 3) for k, v in lat.items() if k != "mean"},
                "errors": errors,
                "errors_total": sum(int(x) for x in errors.values()),
                "non2xx": w["non2xx"],
            }
        else:
            run = self.load(url + "/5b", self.args.duration, rate=self.fixed_rate)
        if pid:
            cpu1 = cpu_times(pid)
            if run["requests"]:
                per = 1e6 / int(run["requests"])
                user, system = (cpu1[0] - cpu0[0]) * per, (cpu1[1] - cpu0[1]) * per
                run["cpu_us_per_req"] = round(user + system, 2)
                run["user_us_per_req"] = round(user, 2)
            run["peak_rss_kib"] = peak_rss_kib(pid)
            run["rss_kib_by_process"] = rss_by_process_kib(pid)
        return run

    def load_argv(
        self,
        url: str,
        duration: float,
        rate: float | None,
        concurrency: int = CONNECTIONS,
        extra: tuple[str, ...] = (),
    ) -> list[str]:
        argv = [
            *pin(self.load_cpu),
            sys.executable,
            "-m",
            "benchmarks.load",
            url,
            "-c",
            str(concurrency),
            "-d",
            f"{duration}s",
            "--json",
            *extra,
        ]
        if rate:
            argv += ["-r", str(rate)]
        return argv

    def load(self, url: str, duration: float, rate: float | None) -> dict[str, Any]:
        argv = self.load_argv(url, duration, rate, extra=("-H", COOKIE))
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
            cwd=Path(__file__).resolve().parent.parent,
        )
        if out.returncode != 0:
            raise RuntimeError(f"load generator failed: {out.stderr[-800:]}")
        data: dict[str, Any] = json.loads(out.stdout)
        data.pop("timeline", None)
        return data

    # --- scenarios ---------------------------------------------------------------------

    def run_matrix(self, scenario: str, progress: Progress) -> None:
        desc = WRK_SCENARIOS[scenario][2] if scenario in WRK_SCENARIOS else ""
        entry: dict[str, Any] = {"description": desc, "runs": {}}
        self.fixed_rate: float | None = None
        if scenario == "fixed-rate":
            self.fixed_rate = self.fixed_rate_target(progress)
            entry["description"] = (
                f"latency at a constant {self.fixed_rate:.0f} req/s = 50 % of nginx's max "
                f"({self.nginx_max:.0f} req/s); our asyncio generator, latency from scheduled send "
                "time (coordinated-omission corrected), 64 connections, 5 B"
            )
        variants, missing = self.start_proxies(self.args.variants, tls=scenario in TLS_SCENARIOS)
        if missing:
            entry["note"] = "; ".join(
                f"{v} unavailable: {why.splitlines()[0]}" for v, why in missing.items()
            )
            entry["unavailable"] = missing
            progress.done += self.args.runs * len(missing)
        try:
            for i in range(self.args.runs):
                for v, (url, pid) in variants.items():
                    progress.show(f"{scenario} {v} run {i + 1}/{self.args.runs}")
                    try:
                        run = self.measure(scenario, url, pid)
                    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                        run = {"error": str(exc)[:500]}
                    entry["runs"].setdefault(v, []).append(run)
                    progress.step(f"{scenario} {v} run {i + 1}/{self.args.runs}")
        finally:
            self.stop_proxies()
        if scenario == "keepalive-5b" and entry["runs"].get("nginx"):
            rps = [r["rps"] for r in entry["runs"]["nginx"] if "rps" in r]
            if rps:
                self.nginx_max = statistics.median(rps)
        self.raw["scenarios"][scenario] = entry

    def fixed_rate_target(self, progress: Progress) -> float:
        if self.nginx_max is None:
            progress.show("fixed-rate: measuring nginx's max")
            variants, _ = self.start_proxies(["nginx"])
            try:
                url, _pid = variants["nginx"]
                w = run_wrk(
                    url + "/5b",
                    min(self.args.duration, 5.0),
                    CONNECTIONS,
                    self.script,
                    (COOKIE,),
                    self.load_cpu,
                )
                self.nginx_max = float(w["rps"])  # type: ignore[arg-type]
            finally:
                self.stop_proxies()
        return round(self.nginx_max * 0.5, 0)

    def run_workers(self, progress: Progress) -> None:
        """workers-2: the matrix with 2 processes per proxy and no pinning at all."""
        pins = self.proxy_cpu, self.load_cpu
        self.proxy_cpu = self.load_cpu = None
        self.workers = 2
        try:
            self.run_matrix(WORKERS_SCENARIO, progress)
        finally:
            self.proxy_cpu, self.load_cpu = pins
            self.workers = 1
        self.raw["scenarios"][WORKERS_SCENARIO]["description"] = WORKERS_DESCRIPTION

    # --- churn -------------------------------------------------------------------------

    def churn_weights(self, progress: Progress) -> None:
        entry: dict[str, Any] = {
            "description": "graygate under full load (64 connections, closed loop, our generator); "
            "PUT weights every 100 ms alternating 90/10 and 10/90; expected: 0 failed requests",
        }
        self.raw["scenarios"]["churn-weights"] = entry
        if self.gg_cmd is None:
            entry["note"] = "graygate unavailable: no graygate command found"
            progress.step("churn-weights skipped")
            return
        cfg = GraygateConfig(
            free_port(),
            free_port(),
            f"http://127.0.0.1:{self.blue_port}",
            f"http://127.0.0.1:{self.green_port}",
        )
        try:
            proc = start_graygate(self.procs, self.gg_cmd, cfg, self.proxy_cpu, "graygate-churn")
        except RuntimeError as exc:
            entry["note"] = f"graygate unavailable: {str(exc).splitlines()[0]}"
            progress.step("churn-weights skipped")
            return
        duration = max(self.args.duration, 2.0)
        progress.show("churn-weights")
        try:
            entry["churn"] = asyncio.run(self._churn_weights(cfg, duration))
        finally:
            self.procs.stop(proc)
        progress.step("churn-weights")

    async def _churn_weights(self, cfg: GraygateConfig, duration: float) -> dict[str, Any]:
        argv = self.load_argv(f"http://127.0.0.1:{cfg.port}/5b", duration, None)
        gen = await asyncio.create_subprocess_exec(
            *argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        puts: list[tuple[float, int, int]] = []  # (wall time, green weight, status)
        url = f"http://127.0.0.1:{cfg.admin_port}/api/v1/routes/{ROUTE}/weights"
        t_end = time.time() + duration
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            i = 0
            while time.time() < t_end and i < 10_000:
                green = 10 if i % 2 == 0 else 90
                try:
                    async with session.put(url, json={"blue": 100 - green, "green": green}) as r:
                        status = r.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                puts.append((time.time(), green, status))
                i += 1
                await asyncio.sleep(0.1)
        out, err = await asyncio.wait_for(gen.communicate(), duration + 60)
        if gen.returncode != 0:
            return {"error": err.decode()[-800:]}
        data = json.loads(out)
        ok = sum(1 for p in puts if 200 <= p[2] < 300)
        return {
            "requests": data["requests"],
            "rps": data["rps"],
            "failed_requests": data["errors_total"] + data["non2xx"],
            "errors": data["errors"],
            "statuses": data["statuses"],
            "version_share": data["version_share"],
            "weight_puts": len(puts),
            "weight_puts_ok": ok,
            "weight_put_statuses": sorted({p[2] for p in puts}),
            "timeline": _timeline(data, [(t, g) for t, g, s in puts if 200 <= s < 300]),
        }

    def churn_rollback(self, progress: Progress) -> None:
        entry: dict[str, Any] = {
            "description": "rollout of green (aiohttp app) at 1 s intervals under 1000 req/s; "
            "green starts failing (500) 1.5 s into the run, mid-rollout; measured: time "
            "from the first bad response to rollback and canary errors users saw",
        }
        self.raw["scenarios"]["churn-rollback"] = entry
        if self.gg_cmd is None:
            entry["note"] = "graygate unavailable: no graygate command found"
            progress.step("churn-rollback skipped")
            return
        app_port = free_port()
        app = self.procs.start(
            [
                *pin(self.load_cpu),
                sys.executable,
                "-m",
                "benchmarks.upstream_app",
                "--port",
                str(app_port),
            ],
            "canary-app",
        )
        cfg = GraygateConfig(
            free_port(),
            free_port(),
            f"http://127.0.0.1:{self.blue_port}",
            f"http://127.0.0.1:{app_port}",
            weights=(100, 0),
            min_samples=20,
        )
        try:
            wait_port(app_port, app)
            proc = start_graygate(self.procs, self.gg_cmd, cfg, self.proxy_cpu, "graygate-rollback")
        except RuntimeError as exc:
            entry["note"] = f"graygate unavailable: {str(exc).splitlines()[0]}"
            self.procs.stop(app)
            progress.step("churn-rollback skipped")
            return
        duration = max(self.args.duration * 2, 6.0)
        progress.show("churn-rollback")
        try:
            entry["rollback"] = asyncio.run(self._churn_rollback(cfg, app_port, duration))
        finally:
            self.procs.stop(proc)
            self.procs.stop(app)
        progress.step("churn-rollback")

    async def _churn_rollback(
        self, cfg: GraygateConfig, app_port: int, duration: float
    ) -> dict[str, Any]:
        argv = self.load_argv(f"http://127.0.0.1:{cfg.port}/", duration, 1000.0, concurrency=16)
        gen = await asyncio.create_subprocess_exec(
            *argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        admin = f"http://127.0.0.1:{cfg.admin_port}/api/v1/routes/{ROUTE}"
        polls: list[tuple[float, int | None, bool]] = []  # (wall, green weight, rolled back)
        start_status = 0
        fail_at = None
        t0 = time.time()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            await asyncio.sleep(0.3)
            try:
                async with session.post(admin + "/rollout", json={"canary": "green"}) as r:
                    start_status = r.status
            except (aiohttp.ClientError, TimeoutError):
                start_status = 0
            for i in range(int(duration * 10) + 20):
                now = time.time()
                if now - t0 > duration:
                    break
                # Fail while the rollout is still stepping (steps come every second), not
                # after it has been promoted: a third into the run, at most 1.5 s in.
                if fail_at is None and now - t0 > min(duration / 3, 1.5):
                    async with session.post(f"http://127.0.0.1:{app_port}/_fail") as r:
                        fail_at = time.time()
                try:
                    async with session.get(admin) as r:
                        body = await r.json() if r.status == 200 else {}
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    body = {}
                polls.append((time.time(), _green_weight(body), _rolled_back(body)))
                await asyncio.sleep(0.1 if i >= 0 else 0)
        out, err = await asyncio.wait_for(gen.communicate(), duration + 60)
        if gen.returncode != 0:
            return {"error": err.decode()[-800:]}
        data = json.loads(out)
        first_bad = data["first_error_s"].get("green")
        first_bad_wall = data["started_wall"] + first_bad if first_bad is not None else None
        rollback_wall = next(
            (t for t, g, rb in polls if first_bad_wall and t >= first_bad_wall and (rb or g == 0)),
            None,
        )
        canary_errors = sum(slot.get("error:green", 0) for slot in data["timeline"].values())
        return {
            "rollout_start_status": start_status,
            "requests": data["requests"],
            "canary_errors_seen": canary_errors,
            "first_bad_response_s": first_bad,
            "rolled_back": rollback_wall is not None,
            "time_to_rollback_s": round(rollback_wall - first_bad_wall, 3)
            if rollback_wall and first_bad_wall
            else None,
            "timeline": _timeline(data, [(t, g) for t, g, _ in polls if g is not None]),
        }


def _timeline(data: dict[str, Any], weights: list[tuple[float, int]]) -> list[dict[str, Any]]:
    """Per bucket: observed green share, 5xx count and the last green weight set before it."""
    step = float(data["bucket_s"])
    start = float(data["started_wall"])
    points = []
    for key, slot in sorted(data["timeline"].items(), key=lambda kv: int(kv[0])):
        t = int(key) * step
        total = sum(n for k, n in slot.items() if ":" not in k and k != "flip")
        point: dict[str, Any] = {
            "t": round(t, 3),
            "green_share": round(slot.get("green", 0) / total, 4) if total else 0.0,
            "errors": sum(n for k, n in slot.items() if k.startswith("error:")),
        }
        set_before = [g for w, g in weights if w - start <= t]
        if set_before:
            point["green_weight"] = set_before[-1]
        points.append(point)
    return points


def _green_weight(body: Any) -> int | None:
    # The runtime weights (body["state"]), not the config's starting point.
    state = body.get("state") if isinstance(body, dict) else None
    weights = state.get("weights") if isinstance(state, dict) else None
    if isinstance(weights, dict) and isinstance(weights.get("green"), int):
        return int(weights["green"])
    return None


def _rolled_back(body: Any) -> bool:
    state = body.get("state") if isinstance(body, dict) else None
    rollout = state.get("rollout") if isinstance(state, dict) else None
    return isinstance(rollout, dict) and rollout.get("state") == "rolled_back"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="1 run x 3 s")
    p.add_argument("--runs", type=int, help="runs per variant (default 3)")
    p.add_argument("--duration", type=float, help="seconds per run (default 10)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated subset of: " + ", ".join(SCENARIOS),
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    p.add_argument(
        "--graygate-cmd", help="command that runs graygate (default: found automatically)"
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    if not (1 <= args.runs <= 20 and 1 <= args.duration <= 300):
        print("error: --runs must be 1..20 and --duration 1..300", file=sys.stderr)
        return 2
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown or not set(args.variants) <= set(VARIANTS):
        print(
            f"error: unknown scenario/variant; scenarios: {', '.join(SCENARIOS)}", file=sys.stderr
        )
        return 2
    try:
        require_tool("nginx")
        require_tool("wrk")
    except ToolMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    matrix = [s for s in scenarios if s in WRK_SCENARIOS or s in ("fixed-rate", WORKERS_SCENARIO)]
    progress = Progress(len(matrix) * args.runs * len(args.variants) + len(scenarios) - len(matrix))
    with (
        tempfile.TemporaryDirectory(prefix="graygate-bench-") as tmp,
        Processes(Path(tmp)) as procs,
    ):
        bench = Bench(args, procs)
        try:
            bench.start_upstreams()
            for s in scenarios:
                if s == WORKERS_SCENARIO:
                    bench.run_workers(progress)
                elif s in matrix:
                    bench.run_matrix(s, progress)
                elif s == mirror.SCENARIO:
                    mirror.run(bench, progress)
                elif s == "churn-weights":
                    bench.churn_weights(progress)
                else:
                    bench.churn_rollback(progress)
        except KeyboardInterrupt:
            progress.end()
            print("interrupted: children stopped, partial results not written", file=sys.stderr)
            return 130
        finally:
            procs.close()
        progress.end()
        res = report.write(bench.raw, args.out)
    print(f"wrote {args.out}/results.json, results.md, results.png", file=sys.stderr)
    for name, sc in res["scenarios"].items():
        t = sc.get("target")
        if t:
            print(
                f"{name}: {t.get('label', 'graygate/nginx')} {t['figure']} {t['value']} "
                f"(target {t['bound']})",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
