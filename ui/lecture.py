"""Lecture mode of the Compare tab: the dense model, a 2:4 mask alone and the same mask after
recovery answer one prompt side by side, in three columns sized for a projector (1280×720).

Over each column stand its held-out perplexity and its top-1 agreement with the dense model, read
from the perplexity table (answers.perplexity_table: measured in this tab or after learning,
or recorded by a saved run); nothing is measured here, and a number not in the table reads "not
measured yet". The recovery column is the newest recovered version of the chosen mask; when there
is none it says so, and how to make one.

compare_tab.build_compare_tab builds it at the top of the tab; both draw with ui/answers.py.
Generation is the Compare tab's: the same checked settings (answers.settings_from_form, greedy
decoding, the same for all three), the same answer panels (safe Markdown; where an answer departs
from the dense one is highlighted), the workspace's `generate_stream`, and one request that holds
the machine under the one-at-a-time rule (jobs.claim: busy while a job runs); any Stop ends it
after the current token and keeps what was written.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import gradio as gr
import torch

from proxsparse_core import measured
from proxsparse_core.errors import Stopped, UserError
from proxsparse_core.inference.evaluate import EXAMPLE_PROMPTS, GenerationSettings, first_divergence
from proxsparse_core.results import DENSE, LEARNED, RECOVERED, title
from proxsparse_core.sparsity.masks import same_masks

from . import inputs
from .answers import (LOOP_GUARD, MAX_PROMPT, _plain_md, answer_panel as _panel, measuring_note,
                      perplexity_table, settings_from_form, unknown_result)
from .feedback import esc, notify
from .jobs import JobManager, in_worker
from .widgets import SKIP, Widgets

SIDES = ("dense", "mask", "recovered")
TAG = "#"                    # a second result of one method is "proxsparse#2" (results.unique)
HOW_TO_RECOVER = "recover:standard"


# ---------------------------------------------------------------------------- which results

def base_choices(jobs: JobManager) -> list[tuple[str, str]]:
    """The 2:4 results a lecture can show: every result that is not itself recovered."""
    return [(title(n), n) for n in list(jobs.ws.results) if RECOVERED not in n]


def default_base(jobs: JobManager) -> str | None:
    """The newest learned mask, else the newest 2:4 result, else None."""
    names = [n for _, n in base_choices(jobs)]
    learned = [n for n in names if n.split(TAG)[0] == LEARNED]
    return (learned or names or [None])[-1]


def recovered_of(jobs: JobManager, base: str | None) -> str | None:
    """The newest recovered version of result `base` ("proxsparse+recovery", "…+recovery#2"), if any;
    failing that, the newest recovered result with the very mask of `base` (a recovered run opened
    from a folder is named after the folder, not after the result it recovered)."""
    results = dict(jobs.ws.results)
    if base is None or base not in results:
        return None
    found = [n for n in results if RECOVERED in n and n.split(RECOVERED)[0] == base]
    if not found and results[base].weights is None:
        found = [n for n in results if RECOVERED in n and same_masks(results[n].masks, results[base].masks)]
    return found[-1] if found else None


def columns(jobs: JobManager, base: str | None) -> dict[str, str | None]:
    """What each column shows: side → result name (None: nothing to show there)."""
    return {"dense": DENSE, "mask": base, "recovered": recovered_of(jobs, base)}


def check_base(jobs: JobManager, asked: str | None) -> str | None:
    """The mask a lecture shows: `asked`, or by default the newest learned one."""
    if asked is None:
        return default_base(jobs)
    if asked not in jobs.ws.results:
        raise UserError(unknown_result(jobs, asked))
    if RECOVERED in asked:
        raise UserError(f"{title(asked)} is a recovered result: pick the mask it recovered, and its recovered "
                        f"version answers in the third column")
    return asked


# ---------------------------------------------------------------------------- the heads over the columns

def scores(jobs: JobManager) -> dict[str, tuple]:
    """title → (perplexity, '× dense', 'same top-1 as dense') as the perplexity table holds them."""
    table = perplexity_table(jobs)
    return {row[0]: (row[1], row[2], row[3]) for row in table.itertuples(index=False)}


def how_to_recover() -> str:
    """The recovery column's words when the mask has no recovered version: none yet, how to make one
    and how long that took here (bench/measured.json)."""
    key = f"{HOW_TO_RECOVER}:{'gpu' if torch.cuda.is_available() else 'cpu'}"
    seconds = measured.seconds(key)
    when = (f", measured {measured.duration(seconds)} on {measured.figures()[key].get('machine', '?')}"
            if seconds is not None else "")
    return (f"Not recovered yet: press <b>Recover</b> under <b>Recover the surviving weights</b> below "
            f"(standard length{esc(when)}), then ask again.")


def head_html(side: str, name: str | None, base: str | None, known: dict) -> str:
    """A column's head: what answers there, its perplexity and top-1 agreement (or why none)."""
    if side == "mask" and name is None:
        head, stats = "2:4 mask", "no 2:4 result yet: learn a mask in the <b>Learn</b> tab"
    elif side == "recovered" and name is None:
        head = "2:4 + recovery"
        stats = how_to_recover() if base is not None else "a 2:4 mask first, then its recovery"
    else:
        head = title(name)
        found = known.get(title(name))
        if found is None:
            stats = ('perplexity <span class="ps-lec-nm">not measured yet</span> · top-1 agreement '
                     '<span class="ps-lec-nm">not measured yet</span> (<b>Compute perplexities</b>, below)')
        elif side == "dense":
            stats = f"perplexity <b>{found[0]:.2f}</b> · top-1 agreement: the reference"
        else:
            agree = (f"<b>{esc(found[2])}</b>" if found[2] else '<span class="ps-lec-nm">not measured yet</span>')
            stats = f"perplexity <b>{found[0]:.2f}</b> ({esc(found[1])}) · same top-1 as dense {agree}"
    return (f'<div class="ps-lec-head ps-lec-{side}"><div class="ps-lec-title">{esc(head)}</div>'
            f'<div class="ps-lec-stats">{stats}</div></div>')


def heads(jobs: JobManager, base: str | None) -> dict[str, str]:
    names, known = columns(jobs, base), scores(jobs)
    return {f"lec_head_{s}": head_html(s, names[s], base, known) for s in SIDES}


# ---------------------------------------------------------------------------- the answers

class LectureView(NamedTuple):
    """The lecture's outputs, by widget name."""
    lec_head_dense: Any = SKIP
    lec_head_mask: Any = SKIP
    lec_head_recovered: Any = SKIP
    lec_dense: Any = SKIP
    lec_mask: Any = SKIP
    lec_recovered: Any = SKIP
    lec_status: Any = SKIP
    lec_base: Any = SKIP


def panels(names: dict, texts: dict, streaming: str | None) -> dict[str, str]:
    """The three answer panels; in the 2:4 columns, the text from where it departs from the dense
    answer is highlighted (the dense answer is the reference)."""
    out = {}
    for side in SIDES:
        text = texts.get(side, "")
        if names.get(side) is None:
            out[f"lec_{side}"] = '<div class="ps-gen ps-muted">nothing to ask here yet (see above)</div>'
            continue
        cut = None
        if side != "dense" and text and texts.get("dense") is not None:
            i = first_divergence(texts["dense"], text)
            cut = i if 0 <= i < len(text) else None
        ended = streaming is None or SIDES.index(side) < SIDES.index(streaming)
        out[f"lec_{side}"] = _panel(text, cut, side == streaming, "(no text)" if ended else "…")
    return out


def refresh(jobs: JobManager, base=None) -> LectureView:
    """The heads and the mask list as the results and the perplexity table stand now."""
    asked = inputs.text("2:4 mask", base).strip() or None
    choices = base_choices(jobs)
    chosen = asked if asked in {n for _, n in choices} else default_base(jobs)
    return LectureView(**heads(jobs, chosen), lec_base=gr.update(choices=choices, value=chosen))


def generate_three(jobs: JobManager, base, prompt, max_new_tokens, chat, block_repeats=False):
    """Stream the dense model's answer, then the mask's, then its recovered version's, with the same
    greedy settings (LectureView frames). A short request, not a job: it holds the machine under the
    one-at-a-time rule, and Stop (any tab's) ends it after the current token."""
    prompt = inputs.text("Prompt", prompt, MAX_PROMPT).strip()
    if not prompt:
        raise UserError("type a question for the three models first")
    asked = inputs.text("2:4 mask", base).strip() or None
    settings = settings_from_form(False, GenerationSettings.temperature, GenerationSettings.top_p,
                                  max_new_tokens, chat, block_repeats)
    names: dict = {}
    stopped = []

    def work(emit):
        with jobs.claim("generating text"):       # busy first: a running job may be making results
            chosen = check_base(jobs, asked)
            names.update(columns(jobs, chosen), base=chosen)
            settings.stop = stop = jobs.eval_stop     # this request's own: a Stop pressed before does not count
            jobs.ensure_loaded()
            emit(None)
            try:
                for side in SIDES:
                    if names[side] is not None and not stop.is_set():
                        measuring = lambda d, t: emit(("measuring", (d, t)))        # noqa: E731
                        for text in jobs.ws.generate_stream(names[side], prompt, settings, measuring):
                            emit((side, text))
            except Stopped:                           # Stop while the chat template was rendered
                pass
            if stop.is_set():
                stopped.append(True)

    texts: dict[str, str] = {}
    for item in in_worker(work):
        if item is None:                              # the machine is ours: heads and empty panels
            yield LectureView(**heads(jobs, names["base"]), **panels(names, texts, "dense"),
                              lec_status="", lec_base=gr.update(choices=base_choices(jobs), value=names["base"]))
            continue
        if item[0] == "measuring":                    # a GPU measures the 2:4 kernels before a 2:4 answer
            yield LectureView(lec_status=measuring_note(*item[1]))
            continue
        side, texts[side] = item
        yield LectureView(**panels(names, texts, side))
    notes = "".join(f"⚠ {_plain_md(n)}.\n\n" for n in settings.notes)      # e.g. the chat template failed
    status = ("⏹ **Stopped**: the answers above are what was written before Stop." if stopped else
              "Highlighted: where a 2:4 answer departs from the dense one. Same prompt, greedy decoding.")
    yield LectureView(**heads(jobs, names.get("base")), **panels(names, texts, None), lec_status=notes + status)


# ---------------------------------------------------------------------------- layout

LECTURE = ["lec_base", "lec_prompt", "lec_max_new", "lec_chat", "lec_block"]


def build_lecture(jobs: JobManager, tab: gr.Tab | None = None):
    """The lecture mode, an accordion at the top of the Compare tab; its widgets by name."""
    base = default_base(jobs)
    first = heads(jobs, base)
    with gr.Accordion("Lecture mode: dense, 2:4 mask and 2:4 + recovery answer side by side", open=False,
                      elem_id="ps-lecture") as box:
        with gr.Row(equal_height=True, elem_classes="ps-lec-bar"):
            prompt = gr.Textbox(EXAMPLE_PROMPTS[0], label="Question for all three", show_label=False, lines=1,
                                max_lines=3, max_length=MAX_PROMPT, scale=6, container=False,
                                placeholder="a question for all three models", elem_id="ps-lec-prompt")
            chosen = gr.Dropdown(base_choices(jobs), value=base, label="2:4 mask", show_label=False, scale=3,
                                 container=False, allow_custom_value=True, elem_id="ps-lec-base")
            go = gr.Button("Ask all three", variant="primary", scale=2, min_width=120, elem_id="ps-lec-go")
            stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="ps-lec-stop")
        with gr.Accordion("Decoding: greedy, the same for all three", open=False, elem_id="ps-lec-decoding"):
            with gr.Row():
                max_new = gr.Slider(*GenerationSettings.LIMITS["max_new_tokens"], GenerationSettings.max_new_tokens,
                                    step=1, label="Max new tokens")
                chat = gr.Checkbox(True, label="Use the model's chat template")
                block = gr.Checkbox(False, label="Block repeats",
                                    info=f"no {LOOP_GUARD} tokens in a row twice in one answer")
        with gr.Row(equal_height=False, elem_classes="ps-lec-cols"):
            out = {}
            for side in SIDES:
                with gr.Column(min_width=0, elem_classes="ps-lec-col"):
                    out[f"lec_head_{side}"] = gr.HTML(first[f"lec_head_{side}"], elem_id=f"ps-lec-head-{side}")
                    out[f"lec_{side}"] = gr.HTML(_panel("", None, False), elem_id=f"ps-lec-{side}")
        status = gr.Markdown(elem_id="ps-lec-status")

    w = Widgets(lec_prompt=prompt, lec_base=chosen, lec_max_new=max_new, lec_chat=chat, lec_block=block,
                lec_status=status, **out)

    def on_ask(v, page):
        yield from generate_three(jobs, v["lec_base"], v["lec_prompt"], v["lec_max_new"], v["lec_chat"],
                                  v["lec_block"])

    def on_refresh(v, page):
        return refresh(jobs, v["lec_base"])

    def on_stop(v, page):
        notify(jobs.stop(), "info")

    # Heavy, but no queue of its own: the job manager answers "busy" at once while another holds the
    # model. Inputs arrive as sent (preprocess=False) and are checked in the handler (ui.inputs).
    w.listen([go.click, prompt.submit], on_ask, LECTURE, LectureView, api_name="lecture", concurrency_limit=None,
             show_progress="hidden", preprocess=False)
    w.listen(stop.click, on_stop, [], [], queue=False, api_visibility="private")
    triggers = [box.expand, chosen.input] + ([tab.select] if tab is not None else [])
    w.listen(triggers, on_refresh, ["lec_base"], LectureView, api_name="lecture_refresh", queue=False,
             show_progress="hidden", preprocess=False)
    return w
