"""The workers-2 benchmark scenario and the balance measurement run (briefly), so neither
can rot: both proxies run 2 processes, the report has each process's RSS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT
from tests.helpers.bench import quick_run, tools_or_fail


def test_workers_2_scenario_runs_both_proxies_with_two_workers(tmp_path: Path) -> None:
    tools_or_fail()
    res = quick_run(tmp_path, "workers-2", ["graygate", "nginx"], timeout=120)
    sc = res["scenarios"]["workers-2"]
    assert "unpinned" in sc["description"]
    for variant, processes in (("graygate", 3), ("nginx", 3)):
        d = sc["variants"][variant]
        assert d["failed_runs"] == 0 and d["errors"] == 0 and d["non2xx"] == 0, d
        assert d["rps_median"] > 100
        # graygate: supervisor, 2 workers (+ the standby); nginx: master and 2 workers.
        assert len(d["rss_mib_by_process"]) >= processes, d
    assert sc["target"]["figure"] == "rps"
    assert "peak RSS per process" in (tmp_path / "results.md").read_text()


def test_balance_measurement_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.balance", "--trials", "2", "--modes", "reuseport"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reuseport: smaller worker's connections of 64" in out.stdout
