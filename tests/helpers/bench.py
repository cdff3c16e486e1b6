"""The benchmark harness as its tests run it: the tools it needs (fail, never skip, when
missing), whether the graygate command starts, and one short `benchmarks.run` whose
results.json comes back parsed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.paths import ROOT


def tools_or_fail() -> None:
    missing = [
        t for t in ("nginx", "wrk") if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())
    ]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `sudo bash benchmarks/install_tools.sh`")


def graygate_works() -> bool:
    from benchmarks.procs import graygate_command

    cmd = graygate_command()
    if cmd is None:
        return False
    try:
        out = subprocess.run([*cmd, "--help"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def quick_run(
    out_dir: Path, scenario: str, variants: list[str] | None = None, timeout: float = 90
) -> dict[str, Any]:
    """`python -m benchmarks.run --quick --duration 1` of one scenario; its results.json."""
    argv = [sys.executable, "-m", "benchmarks.run", "--quick", "--duration", "1"]
    argv += ["--scenarios", scenario, "--out", str(out_dir)]
    if variants is not None:
        argv += ["--variants", ",".join(variants)]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads((out_dir / "results.json").read_text())
    return result
