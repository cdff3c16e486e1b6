"""The mirror-10 benchmark scenario (benchmarks/mirror.py), briefly: both graygate variants
measured in one run, the mirrored one really shadowing about 10 % of the requests."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))


from benchmarks import mirror  # noqa: E402
from tests.helpers.bench import graygate_works, quick_run, tools_or_fail  # noqa: E402


def test_cost_pairs_runs_and_takes_medians() -> None:
    plain = [{"rps": 1000.0, "cpu_us_per_req": 20.0}, {"rps": 1200.0, "cpu_us_per_req": 22.0}]
    mirrored = [
        {"rps": 950.0, "cpu_us_per_req": 23.0, "shadow_share": 0.1},
        {"rps": 1080.0, "cpu_us_per_req": 26.0, "shadow_share": 0.098},
        {"rps": 5.0, "cpu_us_per_req": 99.0},  # no partner: left out
    ]
    assert mirror.cost(plain, mirrored) == {
        "rps_ratio": 0.925,
        "extra_cpu_us_per_req": 3.5,
        "shadow_share": 0.099,
    }
    assert mirror.cost([], [{"error": "x"}])["rps_ratio"] is None


def test_mirror_scenario_quick(tmp_path: Path) -> None:
    tools_or_fail()
    assert graygate_works(), "the graygate command does not start"
    sc = quick_run(tmp_path, mirror.SCENARIO)["scenarios"][mirror.SCENARIO]
    for v in (mirror.PLAIN, mirror.MIRRORED):
        d = sc["variants"][v]
        assert d["failed_runs"] == 0 and d["errors"] == 0 and d["non2xx"] == 0, d
        assert d["rps_median"] > 100 and d["cpu_us_per_req"] > 0
    plain, mirrored = sc["runs"][mirror.PLAIN][0], sc["runs"][mirror.MIRRORED][0]
    assert plain["shadows"] == {}
    # 10 % of the users' requests were copied and compared; identical bodies match.
    assert 0.07 < mirrored["shadow_share"] < 0.13, mirrored
    assert set(mirrored["shadows"]) <= {"match", "dropped"}
    assert sc["mirror_cost"]["rps_ratio"] > 0
    assert sc["target"]["label"] == "graygate-mirror-10/graygate"
    assert "mirror_cost: rps_ratio=" in (tmp_path / "results.md").read_text()
