"""The dashboard in a real browser: Playwright drives Debian's chromium (never a downloaded
one) against the real gateway (App in-process, real listeners) and real upstreams on
loopback. One browser for the module; screenshots of each state go to $GRAYGATE_ARTIFACTS
(default /tmp/graygate-artifacts). A missing chromium fails: `make tools` installs it."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect

from proxy.control.api import SERIES
from proxy.control.controller import _Mark
from tests.helpers import (
    RunningGateway,
    route_config,
    serve_app,
    start_gateway,
    stop_gateway,
)
from tests.helpers import version_app as make_version_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("GRAYGATE_ARTIFACTS", "/tmp/graygate-artifacts"))
TOKEN = "dashboard-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 10_000  # a loaded 2-core machine; the page itself polls every 2 s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: the dashboard tests drive Debian's chromium; install it "
            "with `make tools` (benchmarks/install_tools.sh, apt-get install chromium)"
        )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        await b.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstream_urls() -> AsyncIterator[dict[str, str]]:
    runners, urls = [], {}
    for name in ("blue", "green"):
        runner, port = await serve_app(make_version_app(name, [], None))
        runners.append(runner)
        urls[name] = f"http://127.0.0.1:{port}"
    yield urls
    for runner in runners:
        await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="module")
async def gw(tmp_path: Path, upstream_urls: dict[str, str]) -> AsyncIterator[RunningGateway]:
    route = route_config(
        upstream_urls["blue"],
        upstream_urls["green"],
        rollout={
            "steps": [10, {"pause": True}, 50, 100],
            "interval": "1h",  # the test makes the controller's decisions itself
            "analysis": {"min_samples": 10, "max_p99_latency": "2s", "max_latency_ratio": 50},
        },
    )
    gateway = await start_gateway(tmp_path, 0, [route], admin={"token": TOKEN})
    yield gateway
    await stop_gateway(gateway)


@pytest_asyncio.fixture(loop_scope="module")
async def api(gw: RunningGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(gw.admin_url, headers=AUTH) as session:
        yield session


class Console:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def on_console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(message.text)


async def open_page(
    browser: Browser, gw: RunningGateway, token: str | None = TOKEN
) -> tuple[Page, Console]:
    context = await browser.new_context(viewport=DESKTOP)
    if token is not None:  # as the page itself keeps it once asked (sessionStorage)
        await context.add_init_script(
            f"sessionStorage.setItem('graygate.token', {json.dumps(token)})"
        )
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    console = Console()
    page.on("console", console.on_console)
    page.on("pageerror", lambda exc: console.errors.append(f"page error: {exc}"))
    await page.goto(gw.admin_url + "/")
    return page, console


async def shot(page: Page, name: str) -> Path:
    path = ARTIFACTS / f"dashboard-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def send(gw: RunningGateway, n: int, concurrency: int = 16) -> collections.Counter[str]:
    """`n` real requests through the proxy; how many each version answered."""
    seen: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as session:

        async def worker(count: int) -> None:
            for _ in range(count):
                async with session.get(gw.url + "/") as resp:
                    assert resp.status == 200
                    seen[(await resp.json())["version"]] += 1

        share, extra = divmod(n, concurrency)
        await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))
    return seen


async def route_state(api: aiohttp.ClientSession) -> dict[str, Any]:
    async with api.get("/api/v1/routes/shop") as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def confirm(page: Page) -> None:
    dialog = page.locator("dialog#confirm")
    await expect(dialog).to_be_visible()
    await dialog.get_by_role("button", name="Confirm").click()
    await expect(dialog).to_be_hidden()


def close_interval(gw: RunningGateway) -> None:
    """Close a chart interval now instead of waiting for the 5 s sampling task."""
    assert gw.app.admin_runner is not None
    gw.app.admin_runner.app[SERIES].sample(time.time())


def card(page: Page) -> Any:
    return page.locator('section.route[data-route="shop"]')


# ---- the tests -----------------------------------------------------------------------------


async def test_page_shows_what_the_api_reports_without_console_errors(browser, gw, api):
    close_interval(gw)
    async with api.put("/api/v1/routes/shop/weights", json={"blue": 80, "green": 20}) as resp:
        assert resp.status == 200
    await send(gw, 200)
    close_interval(gw)
    page, console = await open_page(browser, gw)
    shop = card(page)
    state = await route_state(api)
    await expect(shop.get_by_test_id("revision")).to_have_text(f"revision {state['revision']}")
    for version, weight in state["state"]["weights"].items():
        await expect(shop.get_by_test_id(f"weight-{version}")).to_have_text(f"{weight} %")
    await expect(shop.get_by_test_id("phase")).to_have_text(state["state"]["rollout"]["state"])
    await expect(shop.locator("dl.facts")).to_contain_text(f"stable{state['state']['stable']}")
    await expect(shop.locator("ol.steps li")).to_have_text(["10 %", "pause", "50 %", "100 %"])
    await expect(shop.get_by_label("weight of green", exact=True).last).to_have_value("20")
    await expect(shop.locator(".timeline li").first).to_contain_text("blue 100 → 80 %")
    # The stats table and the charts carry the traffic just sent.
    requests = sum(v["requests"] for v in state["stats"].values())
    assert requests == 200
    await expect(shop.locator("table.stats")).to_contain_text("blue")
    await expect(shop.locator('[data-chart="Request rate"] path')).to_have_count(2)
    await expect(page.locator("#live")).to_contain_text("live")
    await shot(page, "idle-1280x800")

    await page.set_viewport_size(PHONE)
    await page.wait_for_timeout(300)
    await shot(page, "idle-phone")
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    assert console.errors == []
    await page.context.close()


async def test_missing_and_wrong_token_are_told_clearly(browser, gw):
    page, console = await open_page(browser, gw, token=None)
    banner = page.locator("#auth")
    await expect(banner).to_be_visible()
    await expect(banner).to_contain_text("needs a bearer token (HTTP 401)")
    await expect(page.locator("#live")).to_have_text("token needed")
    await shot(page, "token-missing")

    await page.get_by_label("admin token").fill("not-the-token")
    await page.get_by_role("button", name="Use token").click()
    await expect(banner).to_contain_text("refused this token (HTTP 401)")
    await expect(banner).to_contain_text("missing or wrong bearer token")
    await expect(page.locator("#live")).to_have_text("wrong token")
    await shot(page, "token-wrong")

    await page.get_by_label("admin token").fill(TOKEN)
    await page.get_by_role("button", name="Use token").click()
    await expect(banner).to_be_hidden()
    await expect(card(page).get_by_test_id("weight-blue")).to_have_text("100 %")
    await page.reload()  # asked once: the tab keeps it
    await expect(card(page).get_by_test_id("weight-blue")).to_have_text("100 %")
    await expect(banner).to_be_hidden()
    # The only console errors are the browser's own notes of the refused calls.
    assert console.errors and all("401" in e for e in console.errors), console.errors
    await page.context.close()


async def test_weight_set_in_the_page_moves_real_traffic(browser, gw, api):
    assert await send(gw, 100) == {"blue": 100}
    page, console = await open_page(browser, gw)
    shop = card(page)
    await expect(shop.get_by_test_id("weight-green")).to_have_text("0 %")
    await shop.get_by_role("spinbutton", name="weight of green").fill("30")
    await expect(shop.get_by_role("spinbutton", name="weight of blue")).to_have_value("70")
    await shop.get_by_role("button", name="Apply weights").click()
    await expect(page.locator("#confirm-text")).to_contain_text("blue 70 %, green 30 %")
    await confirm(page)
    await expect(shop.get_by_test_id("message")).to_contain_text("Weights done")
    state = await route_state(api)
    assert state["state"]["weights"] == {"blue": 70, "green": 30}
    await expect(shop.get_by_test_id("weight-green")).to_have_text("30 %")

    seen = await send(gw, 600)
    share = seen["green"] / 600
    # Binomial sd at 30 %: 1.9 points; 0.22..0.38 is more than four of them.
    assert 0.22 <= share <= 0.38, seen
    await shot(page, "weights-applied")

    # A stale page: another operator moves the weights while this one edits.
    await shop.get_by_role("spinbutton", name="weight of green").fill("50")
    async with api.put("/api/v1/routes/shop/weights", json={"blue": 60, "green": 40}) as resp:
        assert resp.status == 200
    await expect(shop.locator(".editor + .note")).to_contain_text("Apply will be refused")
    await shop.get_by_role("button", name="Apply weights").click()
    await confirm(page)
    await expect(shop.get_by_test_id("message")).to_contain_text("Not applied (409)")
    assert (await route_state(api))["state"]["weights"] == {"blue": 60, "green": 40}
    await expect(shop.get_by_test_id("weight-green")).to_have_text("40 %")
    await shot(page, "weights-stale-409")
    assert console.errors == [] or all("409" in e for e in console.errors), console.errors
    await page.context.close()


async def test_pause_and_resume_from_the_page_show_in_api_and_timeline(browser, gw, api):
    async with api.post("/api/v1/routes/shop/rollout", json={"canary": "green"}) as resp:
        assert resp.status == 200
    app = gw.app
    rp = app.store.policy.by_name["shop"]
    ctrl = app.controller
    # The controller opens the step's window (drains what was counted so far) the first
    # time it sees the step: now, not at its next tick in the middle of the traffic below.
    assert await ctrl.step(rp.config, rp.state) is None
    close_interval(gw)
    await send(gw, 300)
    close_interval(gw)
    # One real verdict of the controller on that traffic: a pass at 10 % moves on to the
    # manual pause step.
    source = ctrl.source_for(rp.config)
    judgement = await ctrl.judge(
        rp.config, rp.state, source, rp.state.rollout.step_started, time.time()
    )
    mark = _Mark(rp.state.rollout.step_started, rp.state.rollout.step_started)
    decision = await ctrl.apply(rp.config, rp.state, judgement, source, mark, time.time())
    assert decision is not None and decision.action == "advance", decision
    page, console = await open_page(browser, gw)
    shop = card(page)
    await expect(shop.get_by_test_id("phase")).to_have_text("progressing")
    await expect(shop.locator("ol.steps li.current")).to_have_text("pause")
    await expect(shop.locator(".timeline li").first).to_contain_text("Verdict pass. Canary")
    await expect(shop.locator(".verdict")).to_contain_text("errors (0 %)")
    await shot(page, "rollout-progressing")

    await shop.get_by_role("button", name="Pause", exact=True).click()
    await confirm(page)
    await expect(shop.get_by_test_id("phase")).to_have_text("paused")
    assert (await route_state(api))["state"]["rollout"]["state"] == "paused"
    await expect(shop.locator(".timeline li").first).to_contain_text("rollout.pause")
    await shot(page, "rollout-paused")

    await shop.get_by_role("button", name="Resume").click()
    await confirm(page)
    await expect(shop.get_by_test_id("phase")).to_have_text("progressing")
    state = (await route_state(api))["state"]
    assert state["rollout"]["state"] == "progressing" and state["weights"]["green"] == 50
    await expect(shop.locator(".timeline li").first).to_contain_text("rollout.resume")
    await expect(shop.locator("ol.steps li.current")).to_have_text("50 %")
    await shot(page, "rollout-resumed")

    # A stale page: the rollout is paused elsewhere while this page's dialog is open.
    await shop.get_by_role("button", name="Pause", exact=True).click()
    await expect(page.locator("dialog#confirm")).to_be_visible()
    async with api.post("/api/v1/routes/shop/rollout/pause") as resp:
        assert resp.status == 200
    await confirm(page)
    # The phase check answers first (the stale If-Match would too): 409, nothing overwritten.
    await expect(shop.get_by_test_id("message")).to_contain_text(
        "Not applied (409 conflict): cannot pause: rollout is paused"
    )
    await expect(shop.get_by_test_id("phase")).to_have_text("paused")
    async with api.get("/api/v1/events", params={"route": "shop"}) as resp:
        actions = [e["action"] for e in (await resp.json())["events"]]
    assert actions.count("rollout.pause") == 2 and actions.count("rollout.resume") == 1
    await shot(page, "rollout-stale-409")
    await page.set_viewport_size(PHONE)
    await expect(shop.locator(".timeline li").first).to_be_visible()
    await shot(page, "rollout-phone")
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    assert console.errors == [] or all("409" in e for e in console.errors), console.errors
    await page.context.close()
