"""The benchmark harness end to end (short), the load tester against real loopback servers."""

from __future__ import annotations

import asyncio
import json
import sys
import zlib
from pathlib import Path

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import load, report  # noqa: E402
from benchmarks.loadgen import LoadSpec, TargetError, parse_target, run_load  # noqa: E402
from benchmarks.procs import graygate_command  # noqa: E402
from benchmarks.upstream_app import make_app  # noqa: E402
from proxy.build import BUILD  # noqa: E402
from tests.helpers.bench import graygate_works, quick_run, tools_or_fail  # noqa: E402


def test_harness_quick_end_to_end(tmp_path: Path) -> None:
    tools_or_fail()
    # The graygate variant is the point of the harness: a broken command fails the test
    # instead of leaving a run of nginx and direct only.
    assert graygate_works(), f"`{graygate_command()} --help` does not run"
    variants = ["direct", "nginx", "graygate", "graygate-pure"]  # compiled and pure
    res = quick_run(tmp_path, "keepalive-5b", variants)
    assert res["machine"]["cores"] >= 1 and res["machine"]["nginx"]
    sc = res["scenarios"]["keepalive-5b"]
    for v in variants:
        d = sc["variants"][v]
        assert d["failed_runs"] == 0, d
        assert d["rps_median"] > 100
        assert d["errors"] == 0 and d["non2xx"] == 0
        assert 0 < d["p50_ms"] <= d["p99_ms"] <= d["p99.9_ms"]
    assert sc["variants"]["nginx"]["cpu_us_per_req"] > 0
    assert sc["variants"]["nginx"]["peak_rss_mib"] > 0
    assert set(sc["variants"]) >= set(variants), sc["variants"].keys()
    assert sc["variants"]["graygate"]["rps_median"] > 100
    assert sc["ratio_graygate_nginx"]["rps"] > 0
    assert sc["ratio_pure_compiled"]["rps"] > 0
    for v in ("graygate", "graygate-pure", "nginx"):
        d = sc["variants"][v]
        assert 0 < d["user_us_per_req"] < d["cpu_us_per_req"], d  # user is part of the total
    # The graygate command is this test's own install: its build is the one imported here.
    assert res["graygate_builds"] == {"graygate": BUILD.describe(), "graygate-pure": "pure python"}
    md = (tmp_path / "results.md").read_text()
    assert "## keepalive-5b" in md and "| nginx |" in md and "| direct |" in md
    assert "| graygate-pure |" in md and "graygate builds: " in md
    png = (tmp_path / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_tls_scenario_configs_are_valid(tmp_path: Path) -> None:
    import yaml

    from benchmarks.procs import NGINX_TLS, PROXY_SERVER, GraygateConfig, graygate_yaml
    from proxy.core.config.load import parse_config
    from proxy.core.config.model import TlsConfig

    files = (tmp_path / "c.pem", tmp_path / "k.pem")
    cfg = GraygateConfig(8443, 9901, "http://127.0.0.1:1", "http://127.0.0.1:2", tls=files)
    parsed = parse_config(yaml.safe_load(graygate_yaml(cfg, tmp_path / "s.json")), env={})
    assert parsed.listen.port == 8443
    assert parsed.listen_tls == TlsConfig(str(files[0]), str(files[1]), "TLSv1.2")
    tls = NGINX_TLS.format(cert=files[0], key=files[1])
    nginx = PROXY_SERVER.format(port=8443, blue=1, green=2, ssl=" ssl", tls=tls)
    assert "listen 127.0.0.1:8443 ssl reuseport" in nginx
    assert f"ssl_certificate {files[0]};" in nginx
    assert "ssl" not in PROXY_SERVER.format(port=1, blue=1, green=2, ssl="", tls="")


def test_ratio_is_median_of_pairwise_ratios() -> None:
    a = [{"rps": 10.0}, {"rps": 30.0}, {"rps": 20.0}]
    b = [{"rps": 20.0}, {"rps": 30.0}, {"rps": 10.0}]
    # pairwise: 0.5, 1.0, 2.0 -> median 1.0 (ratio of medians would be 20/20 too, so add a run)
    assert report.pair_ratios(a, b, "rps") == 1.0
    assert report.pair_ratios([*a, {"rps": 40.0}], [*b, {"rps": 10.0}], "rps") == 1.5
    assert report.pair_ratios([{"error": "x"}], [{"rps": 1.0}], "rps") is None


async def _versioned_server(mode: str) -> tuple[web.AppRunner, str, dict[str, int]]:
    seen = {"requests": 0, "with_cookie": 0}

    async def handle(request: web.Request) -> web.Response:
        seen["requests"] += 1
        headers = {}
        if mode == "flip":  # every user alternates: the stickiness check must notice
            uid = request.headers.get("X-User-Id", "")
            seen[uid] = seen.get(uid, 0) + 1
            version = "green" if seen[uid] % 2 else "blue"
        elif mode == "cookie":
            uid = request.cookies.get("gg_uid")
            if uid is None:
                uid = f"u{seen['requests']}"
                headers["Set-Cookie"] = f"gg_uid={uid}; HttpOnly; Path=/"
            else:
                seen["with_cookie"] += 1
            version = "green" if zlib.crc32(uid.encode()) % 4 == 0 else "blue"
        else:
            uid = request.headers.get("X-User-Id", "")
            version = "green" if zlib.crc32(uid.encode()) % 4 == 0 else "blue"
        headers["X-Graygate-Version"] = version
        return web.Response(text="hello", headers=headers)

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/", seen


@pytest.mark.parametrize("mode", ["header", "cookie"])
async def test_load_sticky_users_see_one_version(mode: str) -> None:
    runner, url, seen = await _versioned_server(mode)
    try:
        spec = LoadSpec(
            url,
            concurrency=8,
            duration=0.8,
            users=40,
            user_key="header" if mode == "header" else "cookie",
        )
        res = (await run_load(spec)).summary()
    finally:
        await runner.cleanup()
    assert res["requests"] == seen["requests"] > 40
    assert res["errors_total"] == 0 and res["statuses"] == {"200": res["requests"]}
    assert set(res["versions"]) == {"blue", "green"}
    assert sum(res["version_share"].values()) == pytest.approx(1.0, abs=0.01)
    assert res["users"] == {"total": 40, "saw_multiple_versions": 0, "flips": 0}
    if mode == "cookie":
        assert seen["with_cookie"] >= res["requests"] - 40  # every user's jar sent it back


async def test_load_detects_flips_and_constant_rate() -> None:
    runner, url, _ = await _versioned_server("flip")
    try:
        res = (await run_load(LoadSpec(url, concurrency=4, duration=0.6, users=10))).summary()
        fixed = (await run_load(LoadSpec(url, concurrency=4, duration=1.0, rate=200.0))).summary()
    finally:
        await runner.cleanup()
    assert res["users"]["saw_multiple_versions"] > 0 and res["users"]["flips"] > 0
    # Bounded: a constant rate of 200/s for 1 s schedules exactly 200 requests.
    assert fixed["requests"] == 200
    assert fixed["latency_ms"]["p50"] > 0


async def test_load_cli_json_and_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    runner, url, _ = await _versioned_server("header")
    try:
        rc = await asyncio.to_thread(
            load.main,
            [url, "-c", "2", "-d", "0.5s", "-n", "300", "--users", "4", "--json", "--no-uvloop"],
        )
    finally:
        await runner.cleanup()
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["requests"] == 300 or data["duration"] >= 0.5
    assert data["requests"] <= 300 and data["users"]["total"] == 4
    assert load.main(["http://10.1.2.3:80/", "-d", "1s"]) == 2
    with pytest.raises(TargetError):
        parse_target("http://example.com/")
    assert parse_target("http://[::1]:8080/x?y=1").path == "/x?y=1"


async def test_canary_app_failure_toggle() -> None:
    runner = web.AppRunner(make_app("green"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        ok = (
            await run_load(LoadSpec(base + "/", concurrency=1, duration=5, max_requests=5))
        ).summary()
        import aiohttp

        async with aiohttp.ClientSession() as s, s.post(base + "/_fail") as r:
            assert r.status == 200
        bad = (
            await run_load(LoadSpec(base + "/", concurrency=1, duration=5, max_requests=5))
        ).summary()
    finally:
        await runner.cleanup()
    assert ok["statuses"] == {"200": 5}
    assert bad["statuses"] == {"500": 5} and bad["non2xx"] == 5
