"""A presenter's click-through in a real browser (Debian's Chromium through Playwright): every
screen explains itself. Each test drives one part of the studio as a new user would and saves a
screenshot of it to test-output/ (named after what it shows).

The tiny model folder keeps it quick; only the Markdown of a real answer needs the bundled model.
"""
import re
import time
from pathlib import Path

import pytest

from test_app_e2e import running_app
from test_browser import SHOTS, browser, pytestmark  # noqa: F401 - the browser; skipped without Chromium
from test_ui_tiny_model import save_tiny_model

VIEW = {"width": 1440, "height": 900}
STEP = re.compile(r"step (\d+) / (\d+)")
STEP_JS = "+((/step (\\d+) \\//.exec(document.querySelector('#ps-progress').innerText) || [0, 0])[1])"
DONE_JS = ("/Identical|differs from|agree on the first|wrote nothing|Stopped/"
           ".test(document.querySelector('#ps-divergence').innerText)")
HELD = "(document.querySelector('#ps-loss .js-plotly-plot')?.data || []).find(t => (t.name || '').includes('if stopped now'))"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory, exports):
    """The app started with `--model <a tiny model folder>` (so no preset fits it)."""
    model = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    with running_app(tmp_path_factory.mktemp("logs"), "--model", str(model),
                     env={"PROXSPARSE_EXPORTS": str(exports)}) as url:
        yield url, model


def open_page(browser, url):
    page = browser.new_page(viewport=VIEW)
    page.set_default_timeout(300_000)
    page.goto(url)
    page.get_by_text("ProxSparse", exact=False).first.wait_for()
    page.wait_for_selector("#ps-loss .js-plotly-plot")
    return page


def shot(page, name: str, full: bool = False):
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=full)


def fill(page, label: str, value):
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Tab")


def progress(page) -> str:
    return page.inner_text("#ps-progress")


def step(page) -> int:
    m = STEP.search(progress(page))
    return int(m.group(1)) if m else 0


def wait_progress(page, text: str, timeout=120_000):
    page.wait_for_function("(t) => document.querySelector('#ps-progress').innerText.includes(t)", arg=text,
                           timeout=timeout)


def in_view(page, selector: str) -> bool:
    box = page.locator(selector).first.bounding_box()
    return box is not None and box["y"] >= -1 and box["y"] + box["height"] <= VIEW["height"] + 1


def small_run(page, steps, windows):
    """Settings for a tiny run that lasts long enough to be watched (Advanced opened for the
    batch size and the perplexity windows)."""
    for label, v in [("Steps", steps), ("λ1 · 2:4 regulariser", 0.5), ("Learning rate", 0.01),
                     ("Calibration samples", 64), ("Tokens per sample", 256)]:
        fill(page, label, v)
    page.get_by_text("Advanced", exact=True).click()
    for label, v in [("Batch size", 32), ("Perplexity windows", windows), ("Perplexity window (tokens)", 128),
                     ("Per-layer stats every N steps", 2)]:
        fill(page, label, v)
    page.evaluate("() => window.scrollTo(0, 0)")


# ------------------------------------------------------------------------------------ the form

def test_form_start_stop_labels_and_presets(tiny_app, browser):
    url, model = tiny_app
    page = open_page(browser, url)
    # started with --model <folder>: no preset made for the bundled model is shown, only "custom"
    assert page.locator("#ps-preset input").input_value().startswith("custom")
    assert "no preset fits the chosen model" in page.inner_text("body")
    assert "⅕ of it (20%) is held out" in page.inner_text("body")          # the code holds out 20%
    assert in_view(page, "#ps-start") and in_view(page, "#ps-stop")
    shot(page, "01-custom-preset-for-another-model.png")

    # the form is long; Start and Stop stay on screen, and so do the charts
    page.get_by_text("Advanced", exact=True).click()
    page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_timeout(800)
    assert page.evaluate("() => window.scrollY") > 300
    assert in_view(page, "#ps-start") and in_view(page, "#ps-stop") and in_view(page, "#ps-loss")
    shot(page, "02-start-stop-and-charts-stay-in-view.png")

    # a bad value is named as the page names it, and goes away once it is fixed
    page.evaluate("() => window.scrollTo(0, 0)")
    fill(page, "λ1 · 2:4 regulariser", -1)
    page.click("#ps-start")
    wait_progress(page, "λ1 · 2:4 regulariser must be")
    assert "lambda1" not in progress(page)
    shot(page, "03-error-in-the-words-of-the-page.png")
    fill(page, "λ1 · 2:4 regulariser", 0.5)
    page.wait_for_function("() => !document.querySelector('#ps-progress').innerText.includes('must be')")
    shot(page, "04-fixed-error-is-cleared.png")

    # the preset list says which presets need a GPU and a download
    page.locator("#ps-preset input").click()
    options = page.get_by_role("option")
    options.first.wait_for()
    labels = options.all_inner_texts()
    assert any("llama-2-7b" in t and "GPU + download" in t for t in labels)
    assert any("quick-demo" in t and "CPU, offline" in t for t in labels)
    page.wait_for_timeout(500)
    shot(page, "05-preset-list-says-gpu-and-download.png")
    page.get_by_role("option", name=re.compile("^llama-2-7b")).click()
    page.wait_for_function("() => document.body.innerText.includes('Needs a GPU and a download')")
    assert page.get_by_label("Model", exact=True).input_value() == "meta-llama/Llama-2-7b-hf"
    # on this CPU-only machine, Start warns first instead of starting
    page.click("#ps-start")
    wait_progress(page, "Press Start again")
    assert "made for a GPU" in progress(page) and "READY" in progress(page).upper()
    shot(page, "06-gpu-preset-warns-before-starting.png")

    # another model typed in: the preset no longer fits and the box says "custom"
    box = page.get_by_label("Model", exact=True)
    box.fill(str(model))
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#ps-preset input').value.startsWith('custom')")
    page.locator("#ps-preset").scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    shot(page, "07-model-changed-preset-goes-custom.png")
    page.close()


# ------------------------------------------------------------------------------------ a run

def test_live_curves_honest_eta_phases_and_a_finished_run(tiny_app, browser):
    url, _ = tiny_app
    page = open_page(browser, url)
    small_run(page, steps=120, windows=1500)
    page.click("#ps-start")
    page.wait_for_function(f"() => {STEP_JS} >= 10 && document.querySelector('#ps-progress').innerText.includes('/ 120')")
    text = progress(page)
    eta = re.search(r"ETA \d+:\d\d: steps (\d+):(\d\d) \+ held-out perplexity ≈ \d+:\d\d", text)
    assert eta, text                         # the steps' part and the perplexity's after them, at this run's pace
    eta_s, eta_at, eta_step = 60 * int(eta.group(1)) + int(eta.group(2)), time.time(), step(page)

    # the held-out loss of the 2:4 model if stopped now, against the dense model's
    page.wait_for_function(f"() => ({HELD})?.x?.length >= 3")
    names = page.evaluate("() => document.querySelector('#ps-loss .js-plotly-plot').data.map(t => t.name)")
    assert {"training loss, per step", "training loss, smoothed", "dense model, held-out probe (2 windows × 128 tokens)",
            "2:4 model if stopped now, same probe"} <= set(names)
    axes = page.evaluate("() => { const l = document.querySelector('#ps-loss .js-plotly-plot').layout;"
                         " return [l.xaxis.title.text, l.yaxis.title.text]; }")
    assert axes == ["training step", "next-token loss (lower is better)"]
    log = page.locator("#ps-log textarea").input_value()
    assert "groups with 0/1/2/3/4 non-zeros: " in log and "nnz/group" not in log
    page.evaluate("() => window.scrollTo(0, 0)")
    assert "RUNNING" in progress(page).upper()
    shot(page, "08-learning-live-held-out-curve.png")

    # after the last step: each phase with its own progress (a phase is drawn as it begins, however
    # short; looked for every 50 ms, not only when the browser paints)
    phases = page.wait_for_function(
        "() => document.querySelector('#ps-progress .ps-ph-running')?.innerText.includes('windows')"
        " && document.querySelector('#ps-progress').innerText", polling=50).json_value()
    steps_done = time.time()
    shot(page, "09-phases-after-the-last-step.png")
    assert "✓ extracting the mask" in phases and "✓ verifying the 2:4 pattern" in phases
    assert re.search(r"held-out perplexity · .+ \d+ / \d+ windows", phases)
    # the ETA read early on was honest: within a factor of three, give or take a machine shared with
    # other work (it once said 16 minutes for a one-minute run: the first step counted for all)
    actual = steps_done - eta_at
    assert actual / 3 - 10 <= eta_s <= 3 * actual + 10, (eta_s, actual, eta_step)

    page.wait_for_function("() => document.querySelector('#ps-progress').innerText.toLowerCase().includes('finished')",
                           timeout=180_000)
    page.wait_for_function("() => document.querySelector('#ps-info').innerText.includes('Held-out perplexity')")
    assert "learned in 120 of 120 steps" in page.inner_text("#ps-info")
    assert progress(page).count("✓") == 4
    shot(page, "10-finished-run.png")
    page.close()


def test_a_stopped_run_is_measured_and_says_how_many_steps(tiny_app, browser):
    url, _ = tiny_app
    page = open_page(browser, url)
    fill(page, "Steps", 100000)
    page.click("#ps-start")
    page.wait_for_function(f"() => {STEP_JS} >= 3 && document.querySelector('#ps-progress').innerText.includes('/ 100000')")
    page.click("#ps-stop")
    page.wait_for_function("() => document.querySelector('#ps-progress').innerText.includes('its mask was learned in')")
    page.wait_for_function("() => document.querySelector('#ps-info').innerText.includes('Held-out perplexity')")
    n = int(re.search(r"learned in (\d+) of 100000 steps", progress(page)).group(1))
    assert n >= 3 and f"learned in {n} of 100000 steps" in page.inner_text("#ps-info")
    shot(page, "11-stopped-run-measured-like-a-finished-one.png")
    page.close()


# ------------------------------------------------------------------------------------ compare

def test_compare_rows_arrive_with_per_task_progress_and_divergence(tiny_app, browser):
    url, _ = tiny_app
    page = open_page(browser, url)
    page.get_by_role("tab", name="Compare").click()
    page.get_by_label("Wanda 2:4 (one-shot)").check()
    page.click("#ps-ppl")
    # rows stay visible while the next ones are computed; each task has its own progress
    page.wait_for_function("() => document.querySelector('#ps-table').innerText.includes('Dense')"
                           " && document.querySelector('#ps-table-note').innerText.includes('▶')")
    seen, samples = {}, 0
    deadline = time.time() + 240
    while time.time() < deadline:
        note = page.inner_text("#ps-table-note")
        for name, stage, done in re.findall(r"▶ (.+?) — (\w+) (\d+) /", note):   # a row's progress within a stage
            assert int(done) >= seen.get((name, stage), 0), (name, stage, done, seen)
            seen[name, stage] = int(done)
        samples += 1
        if samples == 3:
            assert page.locator("#ps-table").is_visible()
            shot(page, "12-perplexity-rows-visible-with-per-task-progress.png")
        if "all rows computed" in note:
            break
        page.wait_for_timeout(300)
    assert "all rows computed" in page.inner_text("#ps-table-note")
    table = page.inner_text("#ps-table")
    assert "Dense" in table and "ProxSparse" in table and "Wanda" in table

    # the recovery length sets its three sliders (steps, samples, samples per step)
    def sliders():
        return [page.input_value(f"#ps-recover-{k} input[type=number]") for k in ("steps", "samples", "batch")]
    assert sliders() == ["300", "300", "1"]
    page.locator("#ps-recover-length").get_by_text("long, for a GPU").click()
    page.wait_for_function("() => document.querySelector('#ps-recover-batch input[type=number]').value === '8'")
    assert sliders() == ["1000", "8000", "8"]
    page.locator("#ps-recover-length").get_by_text("deep, live teacher + fresh text").click()
    page.wait_for_function("() => document.querySelector('#ps-recover-batch input[type=number]').value === '128'")
    assert sliders() == ["1000", "128000", "128"]
    page.locator("#ps-recover-more").get_by_text("Teacher, fresh text, learning rate").click()
    page.wait_for_function("() => document.querySelector('#ps-recover-text input[type=number]') !== null")
    assert page.input_value("#ps-recover-text input[type=number]") == "1000000"
    assert page.locator("#ps-recover-teacher input[value=live]").is_checked()
    page.locator("#ps-recover-length").get_by_text("standard: 300 steps").click()
    page.wait_for_function("() => document.querySelector('#ps-recover-batch input[type=number]').value === '1'")
    assert sliders() == ["300", "300", "1"]
    page.wait_for_function("() => document.querySelector('#ps-recover-text input[type=number]').value === '0'")
    assert page.locator("#ps-recover-teacher input[value=stored]").is_checked()

    page.fill("#ps-prompt textarea", "What is the capital of France?")
    page.click("#ps-generate")
    page.wait_for_function(f"() => {DONE_JS}",
                           timeout=180_000)
    summary = page.inner_text("#ps-divergence")
    dense_html, pruned_html = page.inner_html("#ps-dense"), page.inner_html("#ps-pruned")
    if "first character" in summary:            # only the pruned side is marked
        assert "ps-diff" not in dense_html and "ps-diff" in pruned_html
    elif "agree on the first" in summary:
        assert "ps-diff" in dense_html and "ps-diff" in pruned_html
    top = [page.locator(s).bounding_box()["y"] for s in ("#ps-dense .ps-gen", "#ps-pruned .ps-gen")]
    assert abs(top[0] - top[1]) < 2                       # both panels start at the top
    page.locator("#ps-dense").scroll_into_view_if_needed()
    shot(page, "13-compare-divergence-marked-on-the-pruned-side.png")

    # Decoding → Block repeats: the tiny random model loops under plain greedy, so with the loop
    # guard the dense answer changes (both panels are regenerated, then the summary returns)
    plain_dense = page.inner_text("#ps-dense")
    page.get_by_role("button", name="Decoding").click()
    box = page.locator("#ps-block-repeats input[type=checkbox]")
    assert not box.is_checked()
    box.check()
    page.click("#ps-generate")
    page.wait_for_function(f"(old) => {DONE_JS} && document.querySelector('#ps-dense').innerText !== old",
                           arg=plain_dense, timeout=180_000)
    assert page.inner_text("#ps-pruned").strip()
    page.close()


# ------------------------------------------------------------------------------------ how 2:4 works

def test_how_2to4_works_opens_at_2to4_and_compares_masks_after_a_run(tiny_app, browser):
    url, _ = tiny_app
    page = open_page(browser, url)
    page.get_by_role("tab", name="How 2:4 works").click()
    page.wait_for_selector("#ps-prox .js-plotly-plot")
    text = page.inner_text("#ps-prox-text")
    assert "already 2:4" in text and "becomes 2:4 from λ" in text
    fig = "document.querySelector('#ps-prox .js-plotly-plot')"
    assert page.evaluate(f"() => {fig}.layout.xaxis2.range") == [0, 5]
    assert "prox output, dropped by the 2:4 mask" in page.evaluate(f"() => {fig}.data.map(t => t.name)")
    ys = sorted(page.evaluate(f"() => {fig}.layout.annotations.filter(a => /^w[1-4]$/.test(a.text)).map(a => a.y)"))
    assert all(b - a > 0.05 for a, b in zip(ys, ys[1:]))             # no label hides under another
    page.locator("#ps-prox").scroll_into_view_if_needed()
    shot(page, "14-how-2to4-opens-on-a-2to4-group.png")

    # after a run: the learned mask next to magnitude's on the same block, differences counted
    page.wait_for_function("() => document.querySelector('#ps-block-text').innerText.includes('differently')")
    assert re.search(r"choose \d+ of its \d+ weights differently", page.inner_text("#ps-block-text"))
    page.locator("#ps-block").scroll_into_view_if_needed()
    shot(page, "15-learned-mask-next-to-magnitude.png")
    page.close()


# ------------------------------------------------------------------------------------ export

def test_export_writes_the_name_it_shows_and_the_report_reads_like_the_app(tiny_app, browser, exports):
    url, _ = tiny_app
    page = open_page(browser, url)
    page.get_by_role("tab", name="Export").click()
    name_box = page.locator("#ps-export-name textarea, #ps-export-name input").first
    page.wait_for_function("(el) => el.placeholder.includes('2to4-')", arg=name_box.element_handle())
    shown = name_box.get_attribute("placeholder")
    page.wait_for_timeout(1500)                          # a second on: the old code named it anew
    page.click("#ps-export")
    page.wait_for_function("() => document.querySelector('#ps-export-status').innerText.includes('Exported')",
                           timeout=180_000)
    assert str(exports / shown) in page.inner_text("#ps-export-status")
    assert (exports / shown / "proxsparse" / "report.html").is_file()
    shot(page, "16-export-writes-the-name-shown.png")
    page.wait_for_function("([el, old]) => el.placeholder && el.placeholder !== old",
                           arg=[name_box.element_handle(), shown])      # the next export gets a new name
    page.close()

    report = browser.new_page(viewport={"width": 1200, "height": 900})
    report.goto((exports / shown / "proxsparse" / "report.html").as_uri())
    html = report.content()
    assert "<pre>" not in html and "Settings" in html and "Packages" in html
    ticks = report.evaluate("() => [...document.querySelectorAll('svg text[text-anchor=middle]')].map(t => t.textContent)")
    assert not [t for t in ticks if re.fullmatch(r"\d+\.\d+", t)]          # whole-number steps
    shot(report, "17-report-reads-like-the-app.png", full=True)
    report.close()


# ------------------------------------------------------------------------------------ a reload during a recovery

RECOVERY = "document.querySelector('#ps-recover-progress').innerText"
KL_POINTS = "(document.querySelector('#ps-recover-loss .js-plotly-plot')?.data?.[0]?.x?.length || 0)"


def test_a_reloaded_page_re_attaches_to_a_running_recovery_and_shows_its_result(tiny_app, browser):
    """A recovery is a job on the server: reloading the page mid-way shows it running, with its
    progress and its chart (not READY with an empty chart), live, until Stop ends it."""
    from gradio_client import Client

    from test_app_e2e import start_args

    url, model = tiny_app
    Client(url, verbose=False).predict(*start_args(model, steps=3), api_name="/start")     # a mask to recover
    page = open_page(browser, url)
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_function("() => document.querySelector('#ps-recover-result input').value.includes('ProxSparse')")
    steps = page.locator("#ps-recover-steps input[type=number]")
    steps.fill("10000")            # long enough to outlast the reload on a fast machine; stopped below
    steps.press("Tab")
    page.click("#ps-recover")
    page.wait_for_function(f"() => {RECOVERY}.includes('fine-tuning: step') && {KL_POINTS} >= 2")

    page.reload()
    page.get_by_text("ProxSparse", exact=False).first.wait_for()
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_function(f"() => {RECOVERY}.includes('fine-tuning: step') && {KL_POINTS} >= 2", timeout=120_000)
    text = page.inner_text("#ps-recover-progress")
    assert "RUNNING" in text.upper() and "READY" not in text.upper() and re.search(r"step \d+ / 10,?000", text), text
    done = int(re.search(r"step (\d+) / 10,?000", text).group(1))
    page.wait_for_function(f"(n) => +((/step (\\d+) \\//.exec({RECOVERY}) || [0, 0])[1]) > n", arg=done)  # live
    page.locator("#ps-recover-progress").scroll_into_view_if_needed()
    shot(page, "18-reloaded-page-follows-the-running-recovery.png")

    Client(url, verbose=False).predict(api_name="/stop_recover")    # Stop, as any page's button does
    badge = "document.querySelector('#ps-recover-progress .ps-badge').innerText.toLowerCase()"
    page.wait_for_function(f"() => !{badge}.includes('running')", timeout=600_000)
    assert page.evaluate(f"() => {KL_POINTS}") > done       # the reloaded page drew every step it saw
    shot(page, "19-reloaded-page-shows-the-ended-recovery.png")
    page.close()


# ------------------------------------------------------------------------------------ a real model

@pytest.fixture(scope="module")
def bundled_app(tmp_path_factory, exports):
    from proxsparse_core.models.loading import bundled_folder

    if not any(Path(bundled_folder()).glob("*.safetensors")):
        pytest.skip("the bundled model is not converted on this machine")
    with running_app(tmp_path_factory.mktemp("logs-bundled"), env={"PROXSPARSE_EXPORTS": str(exports)}) as url:
        yield url


def test_the_bundled_model_teaches_with_its_curves_and_renders_markdown(bundled_app, browser):
    page = open_page(browser, bundled_app)
    from proxsparse_core.config import default_preset
    assert page.locator("#ps-preset input").input_value().startswith(default_preset())   # it fits this model
    page.locator("#ps-preset input").click()
    page.get_by_role("option", name=re.compile("^quick-demo")).click()
    page.wait_for_function("() => document.querySelector('#ps-preset input').value.startsWith('quick-demo')")
    fill(page, "Steps", 20)                              # the first third of the quick demo
    page.get_by_text("Advanced", exact=True).click()
    page.get_by_label("Measure held-out perplexity after learning").uncheck()
    page.evaluate("() => window.scrollTo(0, 0)")
    page.click("#ps-start")
    page.wait_for_function("() => document.querySelector('#ps-progress').innerText.toLowerCase().includes('finished')",
                           timeout=900_000)
    held = page.evaluate(f"() => {HELD}.y")
    dense = page.evaluate("() => document.querySelector('#ps-loss .js-plotly-plot').data"
                          ".find(t => t.name.startsWith('dense model, held-out')).y[0]")
    assert len(held) >= 2 and held[-1] < held[0] and held[-1] > dense     # the gap to dense closes
    page.evaluate("() => window.scrollTo(0, 0)")
    shot(page, "18-bundled-model-gap-to-dense-closes.png")

    page.get_by_role("tab", name="Compare").click()
    page.fill("#ps-prompt textarea", "Write a Python function that adds two numbers.")
    page.click("#ps-generate")
    page.wait_for_function(f"() => {DONE_JS}", timeout=600_000)
    dense_html, pruned_html = page.inner_html("#ps-dense"), page.inner_html("#ps-pruned")
    assert "<pre><code>" in dense_html and "def " in dense_html and "```" not in dense_html   # a fence, rendered
    if "first character" in page.inner_text("#ps-divergence"):
        assert "ps-diff" not in dense_html and "ps-diff" in pruned_html
    top = [page.locator(s).bounding_box()["y"] for s in ("#ps-dense .ps-gen", "#ps-pruned .ps-gen")]
    assert abs(top[0] - top[1]) < 2
    shot(page, "19-compare-markdown-renders.png")

    page.get_by_role("tab", name="How 2:4 works").click()
    page.wait_for_function("() => document.querySelector('#ps-block-text').innerText.includes('differently')")
    page.locator("#ps-block").scroll_into_view_if_needed()
    shot(page, "20-learned-vs-magnitude-on-smollm2.png")
    page.close()
