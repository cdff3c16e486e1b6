"""Run wrk once and read its result from a Lua done() hook that prints one JSON line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks.procs import pin, require_tool

MARK = "WRKJSON "

DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"non2xx":%d,' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p99.9":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


def write_script(workdir: Path) -> Path:
    path = workdir / "done.lua"
    path.write_text(DONE_LUA)
    return path


def parse_output(text: str) -> dict[str, object]:
    for line in text.splitlines():
        if line.startswith(MARK):
            data: dict[str, object] = json.loads(line[len(MARK) :])
            return data
    raise ValueError(f"no {MARK.strip()} line in wrk output:\n{text[-1500:]}")


def run_wrk(
    url: str,
    duration: float,
    connections: int,
    script: Path,
    headers: tuple[str, ...] = (),
    cpu: int | None = None,
    threads: int = 1,
) -> dict[str, object]:
    if not url.startswith(("http://127.", "http://localhost", "https://127.", "https://localhost")):
        raise ValueError(f"wrk targets loopback only, got {url}")
    wrk = require_tool("wrk")
    argv = [*pin(cpu), wrk, "-t", str(threads), "-c", str(connections)]
    argv += ["-d", f"{max(1, round(duration))}s", "--timeout", "5s", "-s", str(script)]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    result = parse_output(out.stdout)
    dur = float(result["duration_us"]) / 1e6  # type: ignore[arg-type]
    result["rps"] = round(float(result["requests"]) / dur, 1) if dur else 0.0  # type: ignore[arg-type]
    return result
