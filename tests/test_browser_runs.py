"""Saved runs in a real browser (issue 28: "a run folder made by the CLI opens in the app and shows its
rows and curves"; "two runs and a stopped third stay three results"). The app runs on a tiny model
folder with a runs folder of its own; screenshots go to test-output/."""
import json
import re

import pytest

from proxsparse_core import cli
from test_app_e2e import running_app
from test_browser import browser, pytestmark  # noqa: F401 - the browser; skipped without Chromium
from test_browser_studio import STEP_JS, fill, open_page, progress, shot
from test_ui_tiny_model import save_tiny_model


@pytest.fixture(scope="module")
def runs_app(tmp_path_factory):
    """The app on a tiny model folder, saving its runs in a folder of its own; yields (url, model, runs)."""
    model = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    runs = tmp_path_factory.mktemp("runs")
    with running_app(tmp_path_factory.mktemp("logs"), "--model", str(model), "--runs-dir", str(runs)) as url:
        yield url, model, runs


def text_of(page, selector: str) -> str:
    return page.inner_text(selector)


def wait_text(page, selector: str, text: str, timeout=180_000):
    page.wait_for_function("([s, t]) => (document.querySelector(s)?.innerText || '').includes(t)",
                           arg=[selector, text], timeout=timeout)


def test_two_runs_and_a_stopped_third_stay_three_results(runs_app, browser):
    url, _, runs = runs_app
    page = open_page(browser, url)
    for label, v in [("Steps", 4), ("λ1 · 2:4 regulariser", 0.5), ("Learning rate", 0.01),
                     ("Calibration samples", 16), ("Tokens per sample", 64)]:
        fill(page, label, v)
    page.get_by_text("Advanced", exact=True).click()
    for label, v in [("Perplexity windows", 4), ("Perplexity window (tokens)", 64)]:
        fill(page, label, v)
    page.evaluate("() => window.scrollTo(0, 0)")

    page.click("#ps-start")                                   # a first run, finished and measured
    wait_text(page, "#ps-info", "Held-out perplexity")
    wait_text(page, "#ps-info", "Run folder")
    page.click("#ps-start")                                   # a second, the same settings
    wait_text(page, "#ps-info", "proxsparse#2")
    wait_text(page, "#ps-info", "Run folder")
    fill(page, "Steps", 100000)                               # a third, stopped
    page.evaluate("() => window.scrollTo(0, 0)")
    page.click("#ps-start")
    page.wait_for_function(f"() => {STEP_JS} >= 3 && document.querySelector('#ps-progress').innerText"
                           ".includes('/ 100000')")
    page.click("#ps-stop")
    wait_text(page, "#ps-info", "proxsparse#3")
    wait_text(page, "#ps-info", "Run folder")
    assert "stopped" in progress(page).lower()
    shot(page, "runs-01-a-stopped-third-run.png")

    page.get_by_role("tab", name="Compare").click()
    for row in ("ProxSparse (learned 2:4)", "ProxSparse (learned 2:4) · run 2", "ProxSparse (learned 2:4) · run 3"):
        wait_text(page, "#ps-table", row, timeout=30_000)
    table = text_of(page, "#ps-table")
    assert len(re.findall(r"ProxSparse \(learned 2:4\)", table)) == 3
    page.locator("#ps-table").scroll_into_view_if_needed()
    shot(page, "runs-02-three-results-side-by-side.png")

    page.get_by_role("tab", name="Saved runs").click()
    wait_text(page, "#ps-runs-table", "(stopped)", timeout=30_000)
    listed = text_of(page, "#ps-runs-table")
    assert len(re.findall(r"ProxSparse \(learned 2:4\)", listed)) == 3 and str(runs) in text_of(page, "#ps-runs-where")
    assert len([p for p in runs.iterdir() if not p.name.startswith(".")]) == 3
    shot(page, "runs-03-saved-runs-listed.png")
    page.close()


def test_a_run_folder_the_cli_made_opens_with_its_rows_and_curves(runs_app, browser, tmp_path):
    url, model, _ = runs_app
    out = tmp_path / "lecture-demo"
    assert cli.main(["learn", "--model", str(model), "--device", "cpu", "--dtype", "float32", "--samples", "8",
                     "--ctx", "32", "--eval-ctx", "32", "--eval-windows", "4", "--steps", "6", "--lambda1", "0.5",
                     "--lr", "0.01", "--layer-stats-every", "2", "--out", str(out)]) == 0
    recorded = json.loads((out / "metrics.json").read_text())["perplexity"]

    page = open_page(browser, url)
    page.get_by_role("tab", name="Saved runs").click()
    page.locator("#ps-runs-path textarea, #ps-runs-path input").first.fill(str(out))
    page.click("#ps-runs-open-path")
    wait_text(page, "#ps-runs-status", "Opened")
    status = text_of(page, "#ps-runs-status")
    assert "lecture-demo" in status and "Learn" in status
    shot(page, "runs-04-a-cli-run-folder-opened.png")

    page.get_by_role("tab", name="Learn a 2:4 mask").click()      # its curves, drawn from events.jsonl
    page.wait_for_function("() => (document.querySelector('#ps-loss .js-plotly-plot')?.data?.[0]?.x?.length || 0)"
                           " === 6")
    assert "opened from" in progress(page) and "6 / 6" in progress(page)
    wait_text(page, "#ps-info", "Held-out perplexity")
    shot(page, "runs-05-its-curves-in-the-learn-tab.png")

    page.get_by_role("tab", name="Compare").click()                # its rows, from metrics.json
    wait_text(page, "#ps-table", "ProxSparse (learned 2:4) · lecture-demo", timeout=30_000)
    table = text_of(page, "#ps-table")
    assert f"{round(recorded['proxsparse'], 3)}" in table and f"{round(recorded['dense'], 3)}" in table
    page.locator("#ps-table").scroll_into_view_if_needed()
    shot(page, "runs-06-its-perplexity-rows-in-compare.png")

    page.get_by_role("tab", name="Export").click()                 # and its place in Export
    page.wait_for_function("() => document.querySelector('#ps-export-result input').value.includes('lecture-demo')")
    page.close()
