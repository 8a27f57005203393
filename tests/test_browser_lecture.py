"""Issue 28 in a real browser at a projector's 1280×720 (Debian's Chromium through Playwright): after a
short run the headline numbers are on screen without scrolling, Start pressed twice says "busy", the
Compare tab's answers show more than two lines, and lecture mode shows three answers side by side
with their perplexities. The app opens on quick-demo on this CPU machine with the preset's label whole.
Screenshots go to test-output/ (lecture-*.png).
"""
import re
import time

import pytest

from test_app_e2e import running_app
from test_browser import SHOTS, browser, pytestmark  # noqa: F401 - the browser; skipped without Chromium
from test_ui_tiny_model import save_tiny_model

PROJECTOR = {"width": 1280, "height": 720}
HEADLINE = re.compile(r"dense (\d+\.\d\d) · ProxSparse (\d+\.\d\d) \(×(\d+\.\d\d)\)")


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    with running_app(tmp_path_factory.mktemp("logs"), "--model", str(model),
                     env={"PROXSPARSE_RUNS": str(tmp_path_factory.mktemp("runs"))}) as url:
        yield url, model


def open_page(browser, url):
    page = browser.new_page(viewport=PROJECTOR)
    page.set_default_timeout(180_000)
    page.goto(url)
    page.wait_for_selector("#ps-loss .js-plotly-plot")
    return page


def shot(page, name: str):
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / name))


def fill(page, label: str, value):
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Tab")


def on_screen(page, selector: str) -> dict:
    """The element's box, asserted inside the viewport, and what the page shows at its centre is
    the element itself (nothing covers it)."""
    box = page.locator(selector).first.bounding_box()
    assert box is not None, selector
    assert box["x"] >= 0 and box["y"] >= 0, (selector, box)
    assert box["x"] + box["width"] <= PROJECTOR["width"] and box["y"] + box["height"] <= PROJECTOR["height"], \
        (selector, box)
    seen = page.evaluate("([s, x, y]) => document.querySelector(s).contains(document.elementFromPoint(x, y))",
                         [selector, box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
    assert seen, f"{selector} is covered"
    return box


def test_after_a_short_run_the_headline_is_on_screen_at_1280x720(tiny_app, browser):
    page = open_page(browser, tiny_app[0])
    for label, v in [("Steps", 8), ("Calibration samples", 16), ("Tokens per sample", 64)]:
        fill(page, label, v)
    page.get_by_text("Advanced", exact=True).click()
    for label, v in [("Perplexity windows", 8), ("Perplexity window (tokens)", 64)]:
        fill(page, label, v)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.click("#ps-start")
    page.click("#ps-start")                          # pressed twice: the second press says it is busy
    page.get_by_text("the machine is busy learning a mask", exact=False).first.wait_for(timeout=60_000)
    page.wait_for_function("() => document.querySelector('#ps-progress').innerText.toLowerCase().includes('finished')")
    page.wait_for_function("() => document.querySelector('#ps-info').innerText.includes('Held-out perplexity')")
    page.evaluate("() => window.scrollTo(0, 0)")
    page.wait_for_timeout(500)
    assert page.evaluate("() => window.scrollY") == 0
    on_screen(page, "#ps-headline")
    shot(page, "lecture-01-headline-at-1280x720.png")
    m = HEADLINE.search(page.inner_text("#ps-headline"))
    assert m, page.inner_text("#ps-headline")
    dense, pruned, ratio = (float(g) for g in m.groups())
    info = page.inner_text("#ps-info")                                  # the run's own numbers
    assert re.search(rf"dense {m.group(1)}\b", info) and re.search(rf"proxsparse\S* {m.group(2)}\b", info), info
    assert ratio == pytest.approx(pruned / dense, abs=0.006)
    card = page.inner_text("#ps-progress")
    assert card.index(m.group(2)) < card.index("steps/s")               # the result before the timings
    assert re.search(r"were forced to 2:4 at extraction", card)
    # the chart names its probe and shows the final numbers; the note says why the loss can rise
    names = page.evaluate("() => document.querySelector('#ps-loss .js-plotly-plot').data.map(t => t.name)")
    assert any(n.startswith("dense model, held-out probe (2 windows × 32 tokens)") for n in names), names
    assert any(n.startswith(f"final 2:4: perplexity {m.group(2)}") and "8 windows × 64 tokens" in n for n in names)
    assert "training loss can rise" in page.inner_text("#ps-chart-note").lower()
    page.close()


def test_compare_answers_show_more_than_two_lines_and_lecture_mode_three(tiny_app, browser):
    from gradio_client import Client

    from test_app_e2e import start_args

    url, model = tiny_app
    client = Client(url, verbose=False)
    page = open_page(browser, url)
    page.wait_for_timeout(1000)
    if "finished" not in page.inner_text("#ps-progress").lower():      # run alone: a mask to compare first
        client.predict(*start_args(model, steps=3), api_name="/start")
        page.reload()
        page.wait_for_selector("#ps-loss .js-plotly-plot")
    page.wait_for_function("() => document.querySelector('#ps-progress').innerText.toLowerCase().includes('finished')")
    page.get_by_role("tab", name="Compare").click()
    page.fill("#ps-prompt textarea", "Write a short poem about the sea.")
    page.click("#ps-generate")
    page.wait_for_function("() => /Identical|differs from|agree on the first|wrote nothing|Stopped/"
                           ".test(document.querySelector('#ps-divergence').innerText)")
    page.wait_for_timeout(800)
    lines = page.evaluate("""() => { const g = document.querySelector('#ps-dense .ps-gen');
        const r = g.getBoundingClientRect(), cs = getComputedStyle(g);
        const shown = Math.min(r.bottom, innerHeight) - Math.max(r.top, 0) - parseFloat(cs.paddingTop);
        return [shown / parseFloat(cs.lineHeight), g.scrollHeight / parseFloat(cs.lineHeight)]; }""")
    assert lines[1] > 3, lines                        # the answer has more than two lines …
    assert lines[0] >= 3, lines                       # … and more than two of them are on screen
    shot(page, "lecture-02-compare-answers-in-view.png")

    # lecture mode: the heads and the three answer panels are on screen once it is opened
    page.evaluate("() => window.scrollTo(0, 0)")
    page.locator("#ps-lecture").get_by_text("Lecture mode", exact=False).first.click()
    page.fill("#ps-lec-prompt textarea", "What is the capital of France?")
    page.click("#ps-lec-go")
    page.wait_for_function("() => document.querySelector('#ps-lec-status').innerText.includes('Highlighted')")
    assert page.evaluate("() => window.scrollY") == 0
    for side in ("dense", "mask", "recovered"):
        on_screen(page, f"#ps-lec-head-{side}")
        box = page.locator(f"#ps-lec-{side}").bounding_box()
        assert box["y"] + 90 <= PROJECTOR["height"], (side, box)        # at least three lines of it
    heads = {s: page.inner_text(f"#ps-lec-head-{s}") for s in ("dense", "mask", "recovered")}
    assert re.search(r"perplexity \d+\.\d\d", heads["dense"]) and "reference" in heads["dense"]
    assert re.search(r"perplexity \d+\.\d\d \(\d+\.\d\d×\) · same top-1 as dense \d+\.\d%", heads["mask"]), heads
    assert "Not recovered yet" in heads["recovered"] and "Recover the surviving weights" in heads["recovered"]
    assert page.inner_text("#ps-lec-dense").strip() and page.inner_text("#ps-lec-mask").strip()
    shot(page, "lecture-03-lecture-mode-before-recovery.png")

    # recover the mask (the weight update: seconds) and ask again: three answers, three heads with numbers
    try:
        client.predict("proxsparse", "obs", 1, 300, 1, 2e-3, "stored", 0, api_name="/recover")
    except Exception:  # noqa: BLE001 - drawing the recovery's panel is not this test's subject: the job runs on
        pass
    deadline = time.time() + 180
    while "perplexity" not in str(client.predict("proxsparse", api_name="/lecture_refresh")[2]):
        assert time.time() < deadline, "no recovered result with its perplexity"
        time.sleep(1)
    page.click("#ps-lec-go")
    page.wait_for_function("() => document.querySelector('#ps-lec-head-recovered').innerText.includes('perplexity')"
                           " && document.querySelector('#ps-lec-status').innerText.includes('Highlighted')")
    for side in ("dense", "mask", "recovered"):
        assert page.inner_text(f"#ps-lec-{side}").strip(), side
    assert "nothing to ask" not in page.inner_text("#ps-lec-recovered")
    head = page.inner_text("#ps-lec-head-recovered")
    assert "recovery" in head and re.search(r"perplexity \d+\.\d\d .* same top-1 as dense \d+\.\d%", head), head
    shot(page, "lecture-04-three-answers-side-by-side.png")
    page.close()


@pytest.fixture(scope="module")
def default_app(tmp_path_factory):
    """The app as a teacher starts it on a laptop: no arguments (this machine has no GPU)."""
    with running_app(tmp_path_factory.mktemp("logs-default"),
                     env={"PROXSPARSE_RUNS": str(tmp_path_factory.mktemp("runs-default"))}) as url:
        yield url


def test_the_app_opens_on_quick_demo_with_its_label_whole(default_app, browser):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the app opens on bundled-quality")
    page = open_page(browser, default_app)
    box = page.locator("#ps-preset input")
    assert box.input_value().startswith("quick-demo")
    on_screen(page, "#ps-preset")                                   # at the top of the form
    assert page.evaluate("(el) => el.scrollWidth <= el.clientWidth", box.element_handle()), box.input_value()
    assert page.get_by_label("Steps", exact=True).input_value() == "45"
    box.click()
    options = page.get_by_role("option")
    options.first.wait_for()
    assert options.first.bounding_box()["y"] > page.locator("#ps-preset input").bounding_box()["y"]   # opens down
    shot(page, "lecture-05-opens-on-quick-demo.png")
    page.close()
