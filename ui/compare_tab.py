"""Compare tab: dense and 2:4 generations side by side, and a held-out perplexity table.

Generation runs in a worker thread that holds the model for its whole duration (both models
share one set of weights, swapped in turn) and hands growing texts to the page through a
queue; the page marks where the two outputs first part ways. Perplexity rows are computed on
demand; one-shot baselines come from `proxsparse_core.baselines` when it is installed.
"""
from __future__ import annotations

import gradio as gr
import pandas as pd
import torch

from proxsparse_core.errors import Stopped, UserError
from proxsparse_core.evaluate import GenerationSettings, first_divergence
from proxsparse_core.baselines import METHODS
from proxsparse_core.results import DENSE, LEARNED, title

from .feedback import esc, guarded, notify
from .jobs import JobManager, in_worker

EXAMPLES = [
    "What is the capital of France?",
    "Explain in two sentences what a neural network is.",
    "Write a short poem about the sea.",
    "Give three tips for writing clean Python code.",
]
COLUMNS = ["method", "held-out perplexity", "× dense", "weights", "2:4 verified"]


def baseline_methods() -> list[str]:
    """The one-shot methods of the registry (proxsparse_core.baselines.METHODS)."""
    return list(METHODS)


def variant_choices(jobs: JobManager) -> list[tuple[str, str]]:
    return [(title(n), n) for n in jobs.ws.results]


# ---------------------------------------------------------------------------- generation

def settings_from_form(sample, temperature, top_p, max_new_tokens, chat) -> GenerationSettings:
    try:
        n = int(max_new_tokens)
        t, p = float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise UserError("max tokens, temperature and top-p must be numbers")
    if not 1 <= n <= 2048:
        raise UserError(f"max new tokens must be between 1 and 2048, got {n}")
    if sample and not (0 < t <= 10 and 0 < p <= 1):
        raise UserError("sampling needs 0 < temperature ≤ 10 and 0 < top-p ≤ 1")
    return GenerationSettings(max_new_tokens=n, do_sample=bool(sample), temperature=t, top_p=p,
                              chat=bool(chat))


def _panel(text: str, cut: int | None, streaming: bool) -> str:
    """Generated text with the part after the first divergence highlighted."""
    if cut is None or cut >= len(text):
        body = esc(text)
    else:
        body = esc(text[:cut]) + f'<mark class="ps-diff">{esc(text[cut:])}</mark>'
    cursor = '<span class="ps-cursor">▍</span>' if streaming else ""
    return f'<div class="ps-gen">{body or "<span class=ps-muted>…</span>"}{cursor}</div>'


def render_pair(dense: str, pruned: str, variant: str | None, streaming: str | None = None) -> tuple:
    """(dense panel, pruned panel, summary). `streaming` names the side still growing."""
    cut = None
    summary = ""
    if variant and pruned:
        i = first_divergence(dense, pruned)
        if streaming is None:
            if i == -1:
                summary = "✅ **Identical outputs.**"
            elif i == 0:
                summary = "The outputs differ from the very first character (highlighted)."
                cut = i
            else:
                words = len(dense[:i].split())
                summary = (f"The outputs agree on the first **{i} characters** (~{words} "
                           f"word{'s' if words != 1 else ''}) and then diverge (highlighted).")
                cut = i
        elif i < len(pruned):           # mark only what has really diverged so far
            cut = i
    elif not variant and streaming is None:
        summary = "No 2:4 result yet: start a run in the **Learn** tab (or compute a baseline below)."
    return (_panel(dense, cut, streaming == DENSE), _panel(pruned, cut, streaming == "pruned")
            if variant else '<div class="ps-gen ps-muted">no 2:4 model to show yet</div>', summary)


def generate_pair(jobs: JobManager, variant, prompt, sample, temperature, top_p, max_new_tokens, chat):
    """Stream the dense model's completion, then the chosen 2:4 model's, same settings."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise UserError("type a prompt (or click an example) first")
    settings = settings_from_form(sample, temperature, top_p, max_new_tokens, chat)
    if variant not in jobs.ws.results:
        variant = LEARNED if LEARNED in jobs.ws.results else next(iter(jobs.ws.results), None)

    def work(emit):
        with jobs.claim("generating text"):
            jobs.ensure_loaded()
            for side, name in ((DENSE, DENSE), ("pruned", variant)):
                if name is not None:
                    for text in jobs.ws.generate_stream(name, prompt, settings):
                        emit((side, text))

    texts = {DENSE: "", "pruned": ""}
    for side, text in in_worker(work):
        texts[side] = text
        yield render_pair(texts[DENSE], texts["pruned"], variant, streaming=side)
    yield render_pair(texts[DENSE], texts["pruned"], variant)


# ---------------------------------------------------------------------------- perplexity

def perplexity_table(jobs: JobManager) -> pd.DataFrame:
    """Rows for every result with a known perplexity: dense first, then learned, then baselines."""
    ws = jobs.ws
    order = [DENSE, LEARNED] + baseline_methods()
    names = [n for n in order if n in ws.ppl] + [n for n in ws.ppl if n not in order]
    rows = []
    dense = ws.ppl.get(DENSE)
    for n in names:
        r = ws.results.get(n)
        weights = "original" if n == DENSE else ("updated" if r is not None and r.weights is not None
                                                 else "original × mask")
        rows.append([title(n), round(ws.ppl[n], 3),
                     f"{ws.ppl[n] / dense:.2f}×" if dense else "", weights,
                     "—" if n == DENSE else {True: "✓", False: "✗"}.get(jobs.verified.get(n), "?")])
    return pd.DataFrame(rows, columns=COLUMNS)


def compute_perplexities(jobs: JobManager, methods, progress=None, on_row=None):
    """Perplexity of dense, every existing result and each selected baseline (pruned first when
    missing), one row at a time (`on_row(name)` after each). Stop keeps the finished rows."""
    jobs.eval_stop.clear()
    report = progress or (lambda frac, desc="": None)
    done_msg = "all rows computed"
    with jobs.claim("computing perplexities") as ws:
        jobs.ensure_loaded()
        names = [DENSE] + list(ws.results) + [m for m in methods or [] if m not in ws.results]
        try:
            for i, n in enumerate(names):
                def share(done, total, i=i):           # progress within this row's slice of the bar
                    return (i + done / max(total, 1)) / len(names)
                if n not in ws.results and n != DENSE:
                    report(share(0, 1), f"pruning with {n} …")
                    ws.prune(n, jobs.cfg, progress=lambda d, t: report(share(d, 2 * t), f"pruning with {n}"),
                             stop=jobs.eval_stop)
                if n != DENSE:
                    jobs.verified[n] = ws.verify(n).ok
                report(share(0, 1), f"perplexity of {n}")
                ws.perplexity(n, stop=jobs.eval_stop, progress=lambda d, t: report(share(d, t), f"perplexity of {n}"))
                if on_row:
                    on_row(n)
        except Stopped:
            done_msg = "stopped; the rows already computed are kept"
    data = ws.data
    return perplexity_table(jobs), (f"{done_msg}. {data.held_out.shape[0]} held-out windows × "
                                    f"{data.held_out.shape[1]} tokens of {data.source}; the same token ids "
                                    f"for every row (lower is better).")


def stream_perplexities(jobs: JobManager, methods, progress=None):
    """compute_perplexities for the page: the table grows row by row while the rest is computed."""
    def work(emit):
        emit(("done", compute_perplexities(jobs, methods, lambda f, desc="": emit(("progress", f, desc)),
                                           lambda n: emit(("row", n)))))

    for kind, *rest in in_worker(work):
        if kind == "progress" and progress:
            progress(*rest)
        elif kind == "row":
            yield perplexity_table(jobs), f"{title(rest[0])}: done; computing the next row …"
        elif kind == "done":
            yield rest[0]


def measure_speedup(jobs: JobManager, prompt: str = "", figure: bool = False):
    """Time the loaded model's real prefill, dense vs 2:4 (the learned mask if there is one, else
    top-2 magnitude), at the prompt's length and at long synthetic lengths (CUDA only; says why
    not elsewhere). The workspace's model keeps its dense weights: the 2:4 weights are swapped in
    for the measurement and the layers restored after. Returns the HTML text, or (text, plot or
    None) with figure=True."""
    from proxsparse_core import sparse_infer
    from proxsparse_core.masks import swapped

    ok, why = sparse_infer.status()
    if not ok or jobs.ws.lm is None:
        text = esc(why if not ok else "load a model first (Learn tab)") + \
            ". The learned mask is still valid; it just runs as dense weights with zeros here."
        return (text, None) if figure else text
    with jobs.claim("measuring 2:4 speed") as ws:
        lm = ws.lm
        if LEARNED in ws.results:
            source, weights = "the learned mask", ws.variant(LEARNED)
        else:
            source = "top-2 magnitude (no learned mask yet)"
            weights = swapped(lm.prunable, sparse_infer.top2_weights(ws.originals), ws.originals)
        prompt = (prompt or "").strip()
        ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"] if prompt else None
        n = int(ids.shape[1]) if ids is not None else 0
        counts = sparse_infer.lengths_to_measure(n, lm.max_positions)
        prompts = {n: ids} if n and n in counts else None
        with weights:
            rows, done, skipped = sparse_infer.prefill_speedup(lm.model, lm.prunable, counts, prompts=prompts)
    text = sparse_infer.describe(rows, done, skipped, lm.prunable, sparse_infer.status()[1])
    text = f"2:4 weights from {source}" + (f"; the prompt is {n} tokens" if n else "") + ".\n" + text
    html = "<pre>" + esc(text) + "</pre>"
    if not figure:
        return html
    from .figures import speedup_figure
    done_rows = [r for r in rows if r.speedup is not None]
    fig = speedup_figure([r.tokens for r in done_rows], [r.speedup for r in done_rows],
                         [r.dense_ms for r in done_rows], [r.sparse_ms for r in done_rows]) if done_rows else None
    return html, fig


# ---------------------------------------------------------------------------- layout

def build_compare_tab(jobs: JobManager, tab: gr.Tab):
    gr.Markdown("Same prompt, same decoding settings: the dense model first, then the 2:4 model. "
                "Highlighted text starts where the two outputs first differ.")
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], lines=2, elem_id="ps-prompt")
            gr.Examples(EXAMPLES, prompt, label="Example prompts")
        with gr.Column(scale=2):
            variant = gr.Dropdown(variant_choices(jobs), label="2:4 model", info="learned mask or a baseline",
                                  allow_custom_value=True)   # choices change as results arrive
            with gr.Accordion("Decoding", open=False):
                sample = gr.Checkbox(False, label="Sample (off = greedy)")
                temperature = gr.Slider(0.05, 2.0, 0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, 0.9, step=0.05, label="Top-p")
                chat = gr.Checkbox(True, label="Use the model's chat template")
            max_new = gr.Slider(8, 256, 64, step=8, label="Max new tokens")
            go = gr.Button("Generate both", variant="primary", elem_id="ps-generate")
    with gr.Row(equal_height=True):
        with gr.Column():
            gr.Markdown("**Dense**")
            dense_out = gr.HTML(_panel("", None, False), elem_id="ps-dense")
        with gr.Column():
            gr.Markdown("**2:4 pruned**")
            pruned_out = gr.HTML(_panel("", None, False), elem_id="ps-pruned")
    summary = gr.Markdown(elem_id="ps-divergence")

    gr.Markdown("### Held-out perplexity")
    methods = baseline_methods()
    quick = methods if torch.cuda.is_available() else [m for m in methods if METHODS[m].cpu_default]
    with gr.Row():
        chosen = gr.CheckboxGroup([(title(m), m) for m in methods], value=quick, label="One-shot baselines to add",
                                  info="same calibration samples as the learned mask; on a CPU Wanda takes "
                                       "minutes and SparseGPT longer")
        with gr.Column(min_width=200):
            table_btn = gr.Button("Compute perplexities", variant="primary", elem_id="ps-ppl")
            stop_btn = gr.Button("Stop", variant="stop", size="sm")
    table = gr.Dataframe(perplexity_table(jobs), headers=COLUMNS, interactive=False, elem_id="ps-table")
    table_note = gr.Markdown()

    gr.Markdown("### 2:4 speed on this machine")
    with gr.Row():
        speed_note = gr.Markdown("Sparse tensor cores run 2:4 products on NVIDIA GPUs (compute capability "
                                 "8.0+). This times the model's real prefill, dense vs 2:4, at the prompt's "
                                 "length and at 2 K, 8 K and 16 K tokens (as far as the model allows).")
        speed_btn = gr.Button("Measure 2:4 speed-up", size="sm", elem_id="ps-speed")
    speed_plot = gr.Plot(visible=False, show_label=False, elem_id="ps-speed-plot")

    def on_generate(v, p, s, t, tp, mx, c):
        yield from guarded(3)(generate_pair)(jobs, v, p, s, t, tp, mx, c)

    def on_table(m, progress=gr.Progress()):
        yield from guarded(2)(stream_perplexities)(jobs, m, lambda frac, desc="": progress(frac, desc=desc))

    def on_stop():
        jobs.eval_stop.set()
        notify("stopping after the current window …", "info")

    def on_speed(p):
        text, fig = measure_speedup(jobs, p, figure=True)
        return text, (gr.update(value=fig, visible=True) if fig is not None else gr.update(visible=False))

    def on_select():
        choices = variant_choices(jobs)
        value = LEARNED if LEARNED in jobs.ws.results else (choices[0][1] if choices else None)
        return gr.update(choices=choices, value=value), perplexity_table(jobs)

    go.click(on_generate, [variant, prompt, sample, temperature, top_p, max_new, chat],
             [dense_out, pruned_out, summary], api_name="generate", concurrency_id="model",
             show_progress="hidden")
    table_btn.click(on_table, chosen, [table, table_note], api_name="perplexity", concurrency_id="model",
                    show_progress_on=table)
    stop_btn.click(on_stop, None, None, queue=False, api_name="stop_eval")
    speed_btn.click(guarded(2)(on_speed), prompt, [speed_note, speed_plot], api_name="speedup",
                    concurrency_id="model")
    tab.select(on_select, None, [variant, table], api_name="refresh_compare", queue=False)
