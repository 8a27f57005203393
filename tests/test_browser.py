"""A real browser (Debian's Chromium through Playwright) drives the app like a user: start a run,
watch the charts grow, stop, generate in the Compare tab. Screenshots go to test-output/."""
import shutil
from pathlib import Path

import pytest

from test_app_e2e import app  # noqa: F401 - the launched-app fixture

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "test-output"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which("chromium") is None,
                                reason="Debian chromium is not installed (apt-get install chromium)")

LOSS_POINTS = "(document.querySelector('#ps-loss .js-plotly-plot')?.data?.[0]?.x?.length || 0)"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_user_learns_stops_and_compares(app, browser):  # noqa: F811
    url, model = app
    SHOTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1440, "height": 1200})
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_text("ProxSparse", exact=False).first.wait_for()
    page.get_by_label("Steps").fill("100000")
    page.get_by_label("Steps").press("Tab")
    page.click("#ps-start")

    page.wait_for_function(f"() => {LOSS_POINTS} >= 3")
    first = page.evaluate(f"() => {LOSS_POINTS}")
    page.wait_for_function(f"() => {LOSS_POINTS} > {first}")       # the chart keeps growing live
    page.wait_for_selector("#ps-heatmap .js-plotly-plot .heatmaplayer, #ps-heatmap .js-plotly-plot .hm")
    assert "running" in page.inner_text("#ps-progress").lower()
    page.screenshot(path=str(SHOTS / "learn-running.png"), full_page=True)

    page.click("#ps-stop")
    page.wait_for_function("() => document.querySelector('#ps-progress').innerText.toLowerCase().includes('stopped')")
    progress = page.inner_text("#ps-progress")
    assert "stopped by the user" in progress
    page.wait_for_function("() => document.querySelector('#ps-info').innerText.includes('verified')")
    page.screenshot(path=str(SHOTS / "learn-stopped.png"), full_page=True)

    page.get_by_role("tab", name="Compare").click()
    page.click("#ps-generate")
    page.wait_for_function("() => document.querySelector('#ps-divergence').innerText.trim().length > 0")
    assert page.inner_text("#ps-dense").strip() and page.inner_text("#ps-pruned").strip()
    page.click("#ps-ppl")
    page.wait_for_function("() => document.querySelector('#ps-table').innerText.includes('ProxSparse')")
    page.screenshot(path=str(SHOTS / "compare.png"), full_page=True)

    page.get_by_role("tab", name="How 2:4 works").click()
    page.wait_for_selector("#ps-prox .js-plotly-plot")
    page.screenshot(path=str(SHOTS / "explain.png"), full_page=True)
    page.close()

    # a reload shows the stopped run and the settings it ran with, not the defaults
    from playwright.sync_api import expect
    again = browser.new_page(viewport={"width": 1440, "height": 1200})
    again.goto(url)
    expect(again.get_by_label("Steps")).to_have_value("100000", timeout=30_000)
    expect(again.locator("#ps-progress")).to_contain_text("stopped by the user", timeout=30_000)
    again.close()
