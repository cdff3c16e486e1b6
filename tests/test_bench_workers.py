"""The workers-2 benchmark scenario and the balance measurement run (briefly), so neither
can rot: both proxies run 2 processes, the report has each process's RSS."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_workers_2_scenario_runs_both_proxies_with_two_workers(tmp_path: Path) -> None:
    for tool in ("nginx", "wrk"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            pytest.fail(f"{tool} missing: run `sudo bash benchmarks/install_tools.sh`")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--quick",
            "--duration",
            "1",
            "--scenarios",
            "workers-2",
            "--variants",
            "graygate,nginx",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    sc = json.loads((tmp_path / "results.json").read_text())["scenarios"]["workers-2"]
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
