"""benchmarks/micro_proxy.py runs (briefly), so the callgrind figure of issue 9 cannot rot."""

from __future__ import annotations

from benchmarks import micro_proxy


async def test_the_micro_benchmark_runs(capsys) -> None:
    await micro_proxy.main(50)
    out = capsys.readouterr().out
    assert "sticky=False" in out and "sticky=True" in out
