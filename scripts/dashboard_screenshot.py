"""Makes docs/dashboard.png: a few minutes of real traffic through `graygate serve` while a
rollout runs, then a screenshot of the dashboard in Debian's chromium (Playwright).

    .venv/bin/python scripts/dashboard_screenshot.py [--seconds 300] [--out docs/dashboard.png]

Upstreams answer after a random delay (mean 8 ms blue, 11 ms green) and fail now and then,
so the charts and verdicts have something to show. Ports 18080, 19901, 18001-18002 on
loopback; scratch files in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from playwright.async_api import async_playwright

TOKEN = "demo-token"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CONFIG = """
listen: "127.0.0.1:18080"
admin: {listen: "127.0.0.1:19901", token: demo-token}
state: {path: STATE}
routes:
  - name: shop
    match: {host: "*", path_prefix: "/"}
    versions:
      blue:  {endpoints: ["http://127.0.0.1:18001"]}
      green: {endpoints: ["http://127.0.0.1:18002"]}
    stable: blue
    weights: {blue: 100, green: 0}
    sticky: {keys: ["header:X-User-Id"]}
    rollout:
      steps: [5, 10, 25, 50, 100]
      interval: 60s
      analysis: {min_samples: 100, max_p99_latency: 500ms}
"""


def upstream(name: str, mean: float, error_rate: float) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(random.expovariate(1 / mean))
        if random.random() < error_rate:
            return web.Response(status=500, text="upstream error")
        return web.json_response({"version": name})

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    return app


async def traffic(session: aiohttp.ClientSession, until: float) -> None:
    while time.time() < until:
        headers = {"X-User-Id": str(random.randrange(5000))}
        try:
            async with session.get("http://127.0.0.1:18080/", headers=headers) as resp:
                await resp.read()
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.15)


async def main(seconds: float, out: Path) -> int:
    runners = []
    for name, port, mean, errors in (("blue", 18001, 0.008, 0.001), ("green", 18002, 0.011, 0.003)):
        runner = web.AppRunner(upstream(name, mean, errors), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "graygate.yaml"
        config.write_text(CONFIG.replace("STATE", str(Path(tmp) / "state.json")))
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "-c", str(config)
        )
        try:
            await asyncio.sleep(2)
            end = time.time() + seconds
            async with aiohttp.ClientSession() as session:
                load = [asyncio.create_task(traffic(session, end)) for _ in range(8)]
                await asyncio.sleep(seconds * 0.3)
                async with session.post(
                    "http://127.0.0.1:19901/api/v1/routes/shop/rollout",
                    json={"canary": "green"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    params={"reason": "release 2.4.0"},
                ) as resp:
                    resp.raise_for_status()
                await asyncio.sleep(max(0.0, end - time.time() - 10))
                await screenshot(out)
                await asyncio.gather(*load)
        finally:
            gateway.terminate()
            await gateway.wait()
            for runner in runners:
                await runner.cleanup()
    print(f"wrote {out}")
    return 0


async def screenshot(out: Path) -> None:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        await context.add_init_script(f"sessionStorage.setItem('graygate.token', '{TOKEN}')")
        page = await context.new_page()
        await page.goto("http://127.0.0.1:19901/")
        await page.wait_for_timeout(3000)
        await page.screenshot(path=str(out), full_page=True)
        await browser.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    ns = parser.parse_args()
    sys.exit(asyncio.run(main(ns.seconds, ns.out)))
