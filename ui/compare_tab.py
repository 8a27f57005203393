"""Compare tab: dense and 2:4 generations side by side, and a held-out perplexity table.

Generation runs in a worker thread that holds the model for its whole duration (both models
share one set of weights, swapped in turn) and hands growing texts to the page through a
queue; the page marks where the two outputs first part ways. Prompts are capped in length and
the tab's Stop ends a generation after the current token, so one long request never holds the
machine for minutes. Perplexity rows are computed on demand; one-shot baselines come from
`proxsparse_core.baselines.oneshot`. Any 2:4 result can be recovered (its surviving weights updated with
the mask fixed, `proxsparse_core.recovery.recover`): the recovered model becomes a result of its own, with
a row in the table, an entry in the generation dropdown and in Export.

The perplexity table, a recovery and the speed-up are jobs (ui.jobs): each runs in a thread of
its own on the server, and the tab's panels follow the current or last job of each kind, so a
reloaded page (or a second tab) shows a running recovery with its progress and chart, then its
result. Generation stays a short streamed request under the same one-at-a-time rule. Handlers
read their widgets by name and answer with views (ui.widgets).
"""
from __future__ import annotations

import time

from typing import Any, NamedTuple

import gradio as gr
import torch

from proxsparse_core.runs import curves as plots
from proxsparse_core.errors import Stopped, UserError
from proxsparse_core.progress import Progress, eta_text
from proxsparse_core import measured
from proxsparse_core.inference.evaluate import EXAMPLE_PROMPTS, GenerationSettings, first_divergence
from proxsparse_core.baselines.oneshot import METHODS
from proxsparse_core.recovery.recover import (RECOVERY_LENGTHS, RECOVERY_METHODS, STAGE_TITLES, TEACHERS,
                                              RecoveryConfig, recovered_name)
from proxsparse_core.results import DENSE, LEARNED, is_recovered, method_of, title

from . import inputs
from .answers import (COLUMNS, LOOP_GUARD, MAX_PROMPT, answer_panel as _panel, _plain_md, baseline_methods,  # noqa: F401
                      like_with_like, measuring_note, perplexity_table, settings_from_form, unknown_result,
                      variant_choices)
from .feedback import esc, fmt_duration, notify
from .jobs import POLL_S, Job, JobManager, in_worker, watch
from .lecture import build_lecture
from .widgets import SKIP, Widgets


# ---------------------------------------------------------------------------- generation


class PairView(NamedTuple):
    """The generation panels, by widget name."""
    dense: Any = SKIP
    pruned: Any = SKIP
    summary: Any = SKIP


def render_pair(dense: str, pruned: str, variant: str | None, streaming: str | None = None) -> PairView:
    """(dense panel, pruned panel, summary). `streaming` names the side still growing. When the
    outputs differ from the first character, only the pruned side is marked: the dense output
    is the reference, and marking all of both would say nothing."""
    cut = None
    summary = ""
    done = variant and streaming is None
    if variant and pruned:
        i = first_divergence(dense, pruned)
        if streaming is None:
            if i == -1:
                summary = "✅ **Identical outputs.**"
            elif i == 0:
                summary = "The 2:4 model's output differs from the dense one from the very first character."
                cut = i
            else:
                words = len(dense[:i].split())
                summary = (f"The outputs agree on the first **{i} character{'s' if i != 1 else ''}** (~{words} "
                           f"word{'s' if words != 1 else ''}) and then diverge (highlighted).")
                cut = i
        elif i < len(pruned):           # mark only what has really diverged so far
            cut = i
    elif done:                          # the 2:4 model ended its answer at once
        summary = ("The 2:4 model **wrote nothing**: it ended its answer at once. Try another prompt, or recover "
                   "its weights (below) so that it answers again.")
    elif not variant and streaming is None:
        summary = "No 2:4 result yet: start a run in the **Learn** tab (or compute a baseline below)."
    dense_cut = cut if cut else None    # from the first character on: the pruned side alone
    return PairView(_panel(dense, dense_cut, streaming == DENSE),
                    _panel(pruned, cut, streaming == "pruned", "(no text)" if done else "…")
                    if variant else '<div class="ps-gen ps-muted">no 2:4 model to show yet</div>', summary)


def generate_pair(jobs: JobManager, variant, prompt, sample, temperature, top_p, max_new_tokens, chat,
                  block_repeats=False):
    """Stream the dense model's completion, then the chosen 2:4 model's, same settings (PairView
    frames). A short request, not a job: it holds the machine under the one-at-a-time rule, and
    Stop (any tab's, `jobs.stop()`) ends it after the current token and keeps what was generated."""
    prompt = inputs.text("Prompt", prompt, MAX_PROMPT).strip()
    if not prompt:
        raise UserError("type a prompt (or click an example) first")
    asked = inputs.text("2:4 model", variant).strip() or None
    settings = settings_from_form(sample, temperature, top_p, max_new_tokens, chat, block_repeats)
    chosen: list = [None]         # the result shown on the right, decided once the machine is ours
    stopped = []
    rates: dict = {}              # on a GPU: side → (tokens, seconds) decoded after its first streamed piece
    kernels: list = [None]        # how the 2:4 side used the 2:4 kernels (Workspace.last_decoding)
    gpu: list = [False]           # speeds are measured and shown on a GPU only (speed_line)

    def work(emit):
        with jobs.claim("generating text"):       # busy first: a running job may be making results
            if asked is None:     # none chosen: the learned mask, else the first result (else dense only)
                chosen[0] = jobs.default_result()
            elif asked in jobs.ws.results:
                chosen[0] = asked
            else:
                raise UserError(unknown_result(jobs, asked))
            variant = chosen[0]
            settings.stop = stop = jobs.eval_stop     # this request's own: a Stop pressed before does not count
            jobs.ensure_loaded()
            gpu[0] = jobs.ws.on_cuda
            try:
                for side, name in ((DENSE, DENSE), ("pruned", variant)):
                    if name is not None and not stop.is_set():
                        first, text = None, ""
                        measuring = (lambda d, t: emit(("measuring", (d, t)))) if side == "pruned" else None
                        for text in jobs.ws.generate_stream(name, prompt, settings, measuring):
                            emit((side, text))
                            first = first or (text, time.perf_counter())
                        if gpu[0] and first is not None:      # decoding speed: the tokens after the first piece
                            tok = jobs.ws.lm.tokenizer
                            rates[side] = (count_tokens(tok, text) - count_tokens(tok, first[0]),
                                           time.perf_counter() - first[1])
                        if side == "pruned":
                            kernels[0] = jobs.ws.last_decoding
            except Stopped:                         # Stop while the chat template was rendered
                pass
            if stop.is_set():
                stopped.append(True)

    texts = {DENSE: "", "pruned": ""}
    for side, text in in_worker(work):
        if side == "measuring":            # a GPU measures the 2:4 kernels before the 2:4 answer
            yield PairView(summary=measuring_note(*text))
            continue
        texts[side] = text
        yield render_pair(texts[DENSE], texts["pruned"], chosen[0], streaming=side)
    dense, pruned, summary = render_pair(texts[DENSE], texts["pruned"], chosen[0])
    summary = "⏹ **Stopped**: the text above is what was generated before Stop." if stopped else summary
    notes = "".join(f"⚠ {_plain_md(n)}.\n\n" for n in settings.notes)      # e.g. the chat template failed
    yield PairView(dense, pruned, notes + summary + speed_line(rates, kernels[0]))


def count_tokens(tokenizer, text: str) -> int:
    """New tokens in a generated text (its own tokens, no special ones)."""
    return len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0


def speed_line(rates: dict, kernels=None) -> str:
    """"dense 31.2 tokens/s · 2:4 40.9 tokens/s" from side → (tokens, seconds) decoded after the first
    streamed piece (the prompt's prefill and the first token's start-up left out), and how the 2:4
    side ran: `kernels` (decode24.FastGeneration) counts its layers that ran one-token products on
    the 2:4 kernel; with none, it generated as a dense model (zeros multiplied too). Shown on a GPU
    only: on a CPU the two sides share the cores with whatever else runs (a run folder being
    written, the browser), which made the same computation look far faster on one side
    (bench/RESULTS.md 3d)."""
    parts = [f"{label} {n / s:.1f} tokens/s" for side, label in ((DENSE, "dense"), ("pruned", "2:4"))
             if side in rates for n, s in [rates[side]] if n and s > 0]
    if not parts:
        return ""
    how = ""
    if "pruned" in rates and kernels is not None:    # None: the 2:4 answer did not run to its end
        if kernels.kernel_layers:
            how = (f"; the 2:4 model ran {kernels.kernel_layers} of its "
                   f"{len(kernels.converted) + len(kernels.skipped)} pruned layers on the 2:4 kernel (the others "
                   "were not faster there)")
        else:
            if not kernels.triton:
                why = "Triton, which the 2:4 kernel needs, is not installed"
            elif not kernels.converted:
                why = "the 2:4 kernel takes bf16/fp16 weights and these are not"
            else:
                why = "no layer was faster on the 2:4 kernel"
            how = f"; the 2:4 model generated as a dense one, zeros multiplied too: {why}"
    return f"\n\n⏱ {' · '.join(parts)} (decoding, after the first token{how})."


# ---------------------------------------------------------------------------- perplexity


def compute_perplexities(jobs: JobManager, methods, progress=None, on_row=None, on_task=None):
    """Perplexity of dense, every existing result and each selected baseline (pruned first when
    missing), one row at a time (`on_row(name)` after each). Stop keeps the finished rows.
    Progress is per task and never goes back: `progress(share of this task, description)`, and
    `on_task(name, stage, done, total)` with stage waiting, pruning, perplexity or done. Blocking;
    the page runs it as a job (start_perplexities)."""
    report = progress or (lambda frac, desc="": None)
    task = on_task or (lambda name, stage, done=0, total=0: None)
    done_msg = "all rows computed"
    with jobs.claim("computing perplexities") as ws:
        stop = jobs.eval_stop                       # this job's own (a Stop pressed before does not count)
        jobs.ensure_loaded()
        names = [DENSE] + list(ws.results) + [m for m in methods or [] if m not in ws.results]
        for n in names:
            task(n, "waiting")
        try:
            for n in names:
                def tell(stage, what, unit, n=n):
                    def update(d, t):
                        task(n, stage, d, t)
                        report(d / max(t, 1), f"{what} {n}: {d} / {t} {unit}")
                    return update
                if n not in ws.results and n != DENSE:
                    tell("pruning", "pruning with", "blocks")(0, 1)
                    ws.prune(n, jobs.cfg, progress=tell("pruning", "pruning with", "blocks"), stop=stop)
                if n != DENSE:
                    jobs.verified[n] = ws.verify(n).ok
                windows = ws.data.held_out.shape[0]
                tell("perplexity", "perplexity of", "windows")(0, windows)
                ws.perplexity(n, stop=stop, progress=tell("perplexity", "perplexity of", "windows"))
                task(n, "done")
                if n != DENSE:                      # a new baseline is saved as a run; a saved one gets its row
                    saved = jobs.save_result(n)
                    done_msg += f"; {saved}" if saved.startswith("⚠") else ""
                if on_row:
                    on_row(n)
        except Stopped:
            done_msg = "stopped; the rows already computed are kept"
    data = ws.data
    return perplexity_table(jobs), (f"{done_msg}. {data.held_out.shape[0]} held-out windows × "
                                    f"{data.held_out.shape[1]} tokens of {data.source}; the same token ids "
                                    f"for every row (lower is better)"
                                    + ("; bf16 matrix products on this CPU." if ws.scoring == "bf16" else "."))


TASK_MARK = {"waiting": "·", "pruning": "▶", "perplexity": "▶", "done": "✓"}
TASK_UNIT = {"pruning": "blocks", "perplexity": "windows"}


def tasks_markdown(tasks: dict) -> str:
    """One line per row being computed: its stage and its own progress (which never goes back).
    `tasks` maps a result's name to its Progress (or to a tuple (stage, done, total))."""
    lines = []
    for name, task in tasks.items():
        stage, done, total = (task.stage, task.done, task.total) if isinstance(task, Progress) else task
        text = f"{TASK_MARK.get(stage, '·')} **{esc(title(name))}**"
        if stage in TASK_UNIT and total:
            text += f" — {stage} {done} / {total} {TASK_UNIT[stage]} ({100 * done / total:.0f}%)"
        elif stage == "done":
            text += " — done"
        else:
            text += " — waiting"
        lines.append(text)
    return "  \n".join(lines)


class TableView(NamedTuple):
    """The perplexity table and the note under it, by widget name."""
    table: Any = SKIP
    table_note: Any = SKIP


def start_perplexities(jobs: JobManager, methods: list[str]) -> Job:
    """The perplexity table as a job: `job.state["tasks"]` holds each row's Progress, `job.events`
    the table as it stood after each row, `job.result` the final TableView."""
    def work(job: Job):
        tasks = job.state.setdefault("tasks", {})

        def on_task(name, stage, done=0, total=0):
            old = tasks.get(name)
            if old is not None and old.stage == stage:
                done = max(done, old.done)                # never goes back
            tasks[name] = Progress(stage, done, total, title(name), TASK_UNIT.get(stage, ""))
            job.touch()

        def on_row(name):
            job.events.append(perplexity_table(jobs))
        table, note = compute_perplexities(jobs, methods, on_row=on_row, on_task=on_task)
        job.result, job.message = TableView(table, note), note
        return "stopped" if note.startswith("stopped") else "finished"
    return jobs.start("perplexity", "computing perplexities", work,
                      stop_note="after the current window; the rows already computed are kept")


def table_view(jobs: JobManager, job: Job, table=None, live: bool | None = None) -> TableView:
    """What the table and its note show for a perplexity job (`table`: a row-by-row snapshot)."""
    tasks = tasks_markdown(job.state.get("tasks", {}))
    live = job.active if live is None else live
    if live:
        head = "⏹ stopping after the current window …\n\n" if job.stop.is_set() else ""
        return TableView(perplexity_table(jobs) if table is None else table, head + tasks)
    if job.status == "failed":
        return TableView(perplexity_table(jobs), f"⚠ {esc(job.message)}\n\n{tasks}")
    fair = like_with_like(jobs)
    return TableView(perplexity_table(jobs), job.message + ("\n\n" + fair if fair else "") + "\n\n" + tasks)


def follow_perplexities(jobs: JobManager, job: Job, shown: int = 0, poll: float = POLL_S):
    """TableView frames of a perplexity job until it ends: one for each row as it arrives (the
    table grows row by row and is never covered), one when a row's progress moves, the final one
    last. `shown`: rows the page has seen already."""
    for _ in watch(job, poll):
        ended = not job.active
        tables = list(job.events)
        for table in tables[shown:]:
            yield table_view(jobs, job, table, live=True)
        if not ended and len(tables) == shown:
            yield table_view(jobs, job)
        shown = len(tables)
        if ended:
            yield table_view(jobs, job)


def stream_perplexities(jobs: JobManager, methods):
    """Start the perplexity table as a job and follow it (TableView frames); a failed job is
    raised as its one line."""
    methods = inputs.some_of("One-shot baselines to add", methods, baseline_methods())
    job = start_perplexities(jobs, methods)
    yield from follow_perplexities(jobs, job)
    if job.status == "failed":
        raise UserError(job.message)


def attach_perplexities(jobs: JobManager):
    """Page load: the current or last perplexity job's table and note (nothing before the first)."""
    job = jobs.last("perplexity")
    if job is None:
        yield TableView()
        return
    yield from follow_perplexities(jobs, job, shown=len(job.events))


# ---------------------------------------------------------------------------- 2:4 speed

class SpeedView(NamedTuple):
    speed_note: Any = SKIP
    speed_plot: Any = SKIP


def measure_speedup(jobs: JobManager, prompt: str = "", figure: bool = False):
    """Time the loaded model's real prefill, dense vs 2:4 (the learned mask if there is one, else
    top-2 magnitude), at the prompt's length and at long synthetic lengths (CUDA only; says why
    not elsewhere). The workspace's model keeps its dense weights: the 2:4 weights are swapped in
    for the measurement and the layers restored after. Returns the HTML text, or (text, plot or
    None) with figure=True. Blocking; the page runs it as a job (start_speedup)."""
    from proxsparse_core.inference import sparse24 as sparse_infer
    from proxsparse_core.sparsity.masks import swapped

    why = speedup_unavailable(jobs)
    if why:
        return (why, None) if figure else why
    with jobs.claim("measuring 2:4 speed") as ws:
        lm = ws.lm
        learned = jobs.default_result()
        if learned is not None and method_of(learned) == LEARNED:
            source, weights = f"the learned mask ({title(learned)})", ws.variant(learned)
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


def speedup_unavailable(jobs: JobManager) -> str:
    """Why the speed-up cannot be measured here ("" when it can)."""
    from proxsparse_core.inference import sparse24 as sparse_infer

    ok, why = sparse_infer.status()
    if ok and jobs.ws.lm is not None:
        return ""
    return (esc(why if not ok else "load a model first (Learn tab)") +
            ". The learned mask is still valid; it just runs as dense weights with zeros here.")


def speed_view(html: str, fig) -> SpeedView:
    return SpeedView(html, gr.update(value=fig, visible=True) if fig is not None else gr.update(visible=False))


def start_speedup(jobs: JobManager, prompt: str) -> Job:
    def work(job: Job):
        job.report(Progress("measuring", 0, 0, "timing the prefill, dense vs 2:4 …"))
        job.result = speed_view(*measure_speedup(jobs, prompt, figure=True))
    return jobs.start("speedup", "measuring 2:4 speed", work,
                      stop_note="(it cannot be cut short: it ends by itself within a minute or so)")


def follow_speedup(job: Job):
    for _ in watch(job):
        if job.active:
            yield SpeedView(speed_note="⏳ " + esc(job.progress or "starting …"))
        elif job.status == "failed":
            yield SpeedView(speed_note="⚠ " + esc(job.message))
        else:
            yield job.result


def stream_speedup(jobs: JobManager, prompt):
    """Measure the speed-up as a job and follow it (SpeedView frames); at once where it cannot run."""
    prompt = inputs.text("Prompt", prompt, MAX_PROMPT)
    why = speedup_unavailable(jobs)
    if why:
        yield speed_view(why, None)
        return
    job = start_speedup(jobs, prompt)
    yield from follow_speedup(job)
    if job.status == "failed":
        raise UserError(job.message)


def attach_speedup(jobs: JobManager):
    job = jobs.last("speedup")
    if job is None:
        yield SpeedView()
        return
    yield from follow_speedup(job)


# ---------------------------------------------------------------------------- recovery

RECOVERY_LABELS = {"both": "both: weight update, then fine-tune",
                   "obs": "weight update only (OBS, block by block)",
                   "finetune": "fine-tune by distillation from the dense model"}
TEACHER_LABELS = {"stored": "stored: top-64 per position, read once (up to 20,000 samples)",
                  "live": "live: the dense model runs beside it, full distribution (any length)"}

_LENGTH_NOTE = {"long": ", for a GPU", "deep": ", live teacher + fresh text, for a GPU"}


def _range(name: str) -> tuple:
    """(lowest, highest) of a recovery setting: RecoveryConfig declares them, the sliders show them."""
    return RecoveryConfig.bounds(name)[:2]


def _length_label(name: str) -> str:
    """A recovery length's radio label: its size from recovery.RECOVERY_LENGTHS, its measured times
    (if any were recorded) from bench/measured.json."""
    d = RECOVERY_LENGTHS[name]
    times = "; ".join(t for t in (measured.describe(f"recover:{name}:{w}") for w in ("cpu", "gpu")) if t)
    return (f"{name}{_LENGTH_NOTE.get(name, '')}: {d['steps']:,} steps × {d['batch']} "
            f"sample{'s' * (d['batch'] > 1)}" + (f" ({times})" if times else ""))


RECOVERY_LENGTH_LABELS = {k: _length_label(k) for k in RECOVERY_LENGTHS}
RENDER_EVERY_S = 0.25         # the live view redraws at most this often (the last state always)


def recoverable_choices(jobs: JobManager) -> list[tuple[str, str]]:
    """Results whose survivors can be recovered: every 2:4 result that is not itself recovered."""
    return [(title(n), n) for n in jobs.ws.results if not is_recovered(n)]


def _recovery_stages_line(job: Job) -> str:
    """The recovery's stages in order, those done ticked, the running one in bold, the skipped ones
    (text already cached) left out: what the ETA in all still counts."""
    order, seen = job.state.get("stages") or [], job.state.get("seen") or []
    current = job.progress.stage if job.progress is not None and job.active else None
    parts = []
    last_seen = max((order.index(s) for s in seen if s in order), default=-1)
    for stage in order:
        if stage in seen and stage != current:
            parts.append(f"✓ {esc(STAGE_TITLES.get(stage, stage))}")
        elif stage == current:
            parts.append(f"<b>{esc(STAGE_TITLES.get(stage, stage))}</b>")
        elif order.index(stage) > last_seen:
            parts.append(esc(STAGE_TITLES.get(stage, stage)))
    return " → ".join(parts)


def recovery_progress_html(job: Job | None) -> str:
    """Status badge, the stage's message with its count and ETAs (this stage; the whole recovery,
    stages still to come and the perplexity after included), its own progress bar, the stages in order
    and the last distillation loss of a recovery job (its typed progress: nothing is read from the words)."""
    if job is None:
        return ('<div class="ps-progress"><span class="ps-badge ps-idle">ready</span> Pick a result and '
                'press <b>Recover</b>.</div>')
    status, p = job.status, job.progress
    ev = job.events[-1] if job.events else None
    share = job.state.get("share", 0.0)
    head = esc(p.message if p is not None else "starting …")
    if job.active and p is not None:
        eta = eta_text(p)
        head += f" · {esc(eta)}" if eta else ""
    stats = ""
    if ev is not None:
        stats = (f"KL to the dense model {ev['lm_loss']:.4f} · {ev['tokens_per_s']:,.0f} tokens/s · "
                 f"{ev['t_step']:.2f} s/step · fine-tuning for {fmt_duration(ev['elapsed'])}")
    if job.active and job.stop.is_set():
        head += " · stopping after this step"
    stages = _recovery_stages_line(job) if job.active else ""
    note = f'<div class="ps-note">{esc(job.message)}</div>' if job.message and not job.active else ""
    return (f'<div class="ps-progress"><div class="ps-head"><span class="ps-badge ps-{status}">{status}</span> '
            f'{head}</div><div class="ps-bar"><div style="width:{100 * share:.1f}%"></div></div>'
            + (f'<div class="ps-stats">stages: {stages}</div>' if stages else "")
            + f'<div class="ps-stats">{stats}</div>{note}</div>')


def recovery_config(method, steps, samples=RecoveryConfig.samples, batch=RecoveryConfig.batch,
                    lr=RecoveryConfig.lr, teacher=RecoveryConfig.teacher, text=RecoveryConfig.text) -> RecoveryConfig:
    method = inputs.one_of("Recovery", method, RECOVERY_METHODS)
    steps = inputs.whole("Fine-tuning steps", steps, *RecoveryConfig.bounds("steps")[:2])
    samples = inputs.whole("Fine-tuning samples", samples, *RecoveryConfig.bounds("samples")[:2])
    batch = inputs.whole("Samples per step", batch, *RecoveryConfig.bounds("batch")[:2])
    lr = inputs.number("Fine-tuning learning rate", lr, *RecoveryConfig.bounds("lr")[:2])
    teacher = inputs.one_of("Teacher", teacher, TEACHERS)
    text = inputs.whole("Fresh text (tokens)", text, *RecoveryConfig.bounds("text")[:2])
    return RecoveryConfig(method=method, steps=steps, samples=samples, batch=batch, lr=lr, teacher=teacher,
                          text=text).validate()


def recovery_length(length) -> "LengthView":
    """(steps, samples, samples per step, learning rate, teacher, fresh text) of a named recovery
    length (recovery.RECOVERY_LENGTHS), by the names of the widgets it sets."""
    d = RECOVERY_LENGTHS[inputs.one_of("Recovery length", length, list(RECOVERY_LENGTHS))]
    return LengthView(d["steps"], d["samples"], d["batch"], d["lr"], d["teacher"], d["text"])


def recovery_request(jobs: JobManager, name, method, steps, samples=RecoveryConfig.samples,
                     batch=RecoveryConfig.batch, lr=RecoveryConfig.lr, teacher=RecoveryConfig.teacher,
                     text=RecoveryConfig.text) -> tuple[str, RecoveryConfig]:
    """The checked (result name, RecoveryConfig) of a Recover request; busy first, then the names."""
    name = inputs.text("Result to recover", name).strip()
    rcfg = recovery_config(method, steps, samples, batch, lr, teacher, text)
    jobs.refuse_if_busy()             # a running job may be making the results checked below
    if not jobs.ws.results:
        raise UserError("nothing to recover yet: learn a mask in the Learn tab (or compute a baseline "
                        "above) first")
    if not name:
        raise UserError("pick a result to recover from the list")
    if name not in jobs.ws.results:
        raise UserError(unknown_result(jobs, name))
    if is_recovered(name):
        raise UserError(f"{title(name)} is already recovered; pick the result it came from")
    on_cpu = jobs.ws.lm.model.get_input_embeddings().weight.device.type == "cpu"
    if rcfg.method != "obs" and on_cpu and (rcfg.text or rcfg.steps * rcfg.batch > 10_000):
        notify(f"this recovery reads {rcfg.steps * rcfg.batch:,} samples"
               + (f" after writing {rcfg.text:,} tokens of fresh text" if rcfg.text else "")
               + ": a GPU job, hours on this CPU. Stop ends it and keeps the last good weights", "warning")
    return name, rcfg


def start_recovery(jobs: JobManager, name: str, rcfg: RecoveryConfig) -> Job:
    """Recover the survivors of result `name` (recovery.recover) as a job. Its progress is typed, one
    progress.Timeline over every stage (Workspace.recovery_timeline): fresh-text or chat-turns (tokens),
    samples, obs (blocks), teacher (samples), finetune (steps, with the learning curve in `job.events`),
    perplexity (held-out windows), done — each report with its count, the stage's ETA and the ETA of the
    whole recovery. Stop ends it after the current step and keeps the last good weights; the recovered
    result then gets its perplexity rows (skipped when Stop was pressed). `job.result`: the recovered
    result's name, or None."""
    new = jobs.ws.unique_name(recovered_name(name))     # a second recovery of one result is a result of its own

    def work(job: Job):
        ws = jobs.ws

        def tell(progress: Progress):
            if progress.fraction is not None:
                job.state["share"] = progress.fraction      # a stage without a count keeps the bar
            if progress.stage not in job.state["seen"]:
                job.state["seen"] = [*job.state["seen"], progress.stage]
            job.report(progress)

        def on_event(ev):
            job.events.append(ev.to_dict())

        timeline = ws.recovery_timeline(name, rcfg, tell, (DENSE, name, new))
        job.state.update(stages=list(timeline.order), seen=[])
        tell(Progress("starting", 0, 0, "starting …"))
        res = ws.recover(name, rcfg, on_event, job.stop, timeline=timeline)
        message = res.message
        made = res.pruning is not None
        if made:
            jobs.verified[new] = ws.verify(new).ok
            try:
                ws.score_recovery((DENSE, name, new), timeline, job.stop)
            except Stopped:
                message += "; perplexity skipped (Stop): press Compute perplexities for its row"
            job.state["share"] = 1.0
        if made:                       # saved as a run folder, with its fine-tuning curve
            jobs.curves[new] = list(job.events)
            message += f"; {jobs.save_result(new, events=job.events)}"
        job.result, job.message = (new if made else None), message
        job.report(Progress("done", 1, 1, title(new) if made else "nothing was recovered"))
        return res.status
    return jobs.start("recover", "recovering weights", work,
                      stop_note="after the current step; the last good weights are kept")


class RecoveryView(NamedTuple):
    """What a recovery shows, by widget name: its panel and chart; once it ends, the table and the
    2:4 model list (with the recovered result)."""
    rec_progress: Any = SKIP
    rec_loss: Any = SKIP
    table: Any = SKIP
    variant: Any = SKIP
    table_note: Any = SKIP


def recovery_view(jobs: JobManager, job: Job, choose: bool = True) -> RecoveryView:
    view = RecoveryView(recovery_progress_html(job), plots.loss_figure(list(job.events), plots.RECOVERY_TITLE))
    if job.active:
        return view
    choices = variant_choices(jobs)
    made = job.result is not None and job.result in jobs.ws.results
    table_job = jobs.last("perplexity")     # the table's own note (windows, tokens), then the like-with-like line
    fair = like_with_like(jobs)
    note = "\n\n".join(x for x in ((table_job.message if table_job is not None else ""), fair) if x)
    return view._replace(table=perplexity_table(jobs), table_note=note,
                         variant=gr.update(choices=choices, value=job.result) if made and choose
                         else gr.update(choices=choices))


def follow_recovery(jobs: JobManager, job: Job, choose: bool = True, poll: float = RENDER_EVERY_S):
    """RecoveryView frames of a recovery job until it ends (the final one with the table and the
    2:4 model list; `choose`: pick the recovered result there)."""
    for _ in watch(job, poll):
        yield recovery_view(jobs, job, choose)


def recover_result(jobs: JobManager, name, method, steps, samples=RecoveryConfig.samples,
                   batch=RecoveryConfig.batch, lr=RecoveryConfig.lr, teacher=RecoveryConfig.teacher,
                   text=RecoveryConfig.text):
    """Start a recovery job and follow it: RecoveryView frames (progress HTML, loss figure,
    perplexity table, generation-dropdown update). Bad settings are raised at once; a failed job
    is raised as its one line after its last frame."""
    job = start_recovery(jobs, *recovery_request(jobs, name, method, steps, samples, batch, lr, teacher, text))
    yield from follow_recovery(jobs, job)
    if job.status == "failed":
        raise UserError(job.message)


def attach_recovery(jobs: JobManager):
    """Page load: the current or last recovery, live while it runs, then its result."""
    job = jobs.last("recover")
    if job is None:
        yield RecoveryView()
        return
    yield from follow_recovery(jobs, job, choose=False)


class LengthView(NamedTuple):
    """The widgets a recovery length sets."""
    rec_steps: Any = SKIP
    rec_samples: Any = SKIP
    rec_batch: Any = SKIP
    rec_lr: Any = SKIP
    rec_teacher: Any = SKIP
    rec_text: Any = SKIP


# ---------------------------------------------------------------------------- layout

GENERATE = ["variant", "prompt", "sample", "temperature", "top_p", "max_new", "chat", "block_repeats"]
RECOVER = ["rec_choice", "rec_method", "rec_steps", "rec_samples", "rec_batch", "rec_lr", "rec_teacher", "rec_text"]


def build_compare_tab(jobs: JobManager, tab: gr.Tab, demo: gr.Blocks | None = None):
    build_lecture(jobs, tab)                    # at the top: three answers side by side for a projector
    gr.Markdown("Same prompt, same decoding settings: the dense model first, then the 2:4 model. "
                "Highlighted text starts where the two outputs first differ.")
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", value=EXAMPLE_PROMPTS[0], lines=2, max_length=MAX_PROMPT,
                                elem_id="ps-prompt", info=f"up to {MAX_PROMPT:,} characters")
            gr.Examples(EXAMPLE_PROMPTS, prompt, label="Example prompts")
        with gr.Column(scale=2):
            variant = gr.Dropdown(variant_choices(jobs), label="2:4 model", info="learned mask or a baseline",
                                  allow_custom_value=True)   # choices change as results arrive
            with gr.Accordion("Decoding", open=False):      # closed, with the length: the answers stay in view
                max_new = gr.Slider(*GenerationSettings.LIMITS["max_new_tokens"], GenerationSettings.max_new_tokens,
                                    step=1, label="Max new tokens")
                sample = gr.Checkbox(False, label="Sample (off = greedy)")
                temperature = gr.Slider(*GenerationSettings.LIMITS["temperature"], GenerationSettings.temperature,
                                        step=0.05, label="Temperature")
                top_p = gr.Slider(*GenerationSettings.LIMITS["top_p"], GenerationSettings.top_p, step=0.05,
                                  label="Top-p")
                chat = gr.Checkbox(True, label="Use the model's chat template")
                block = gr.Checkbox(False, label="Block repeats", elem_id="ps-block-repeats",
                                    info=f"no {LOOP_GUARD} tokens in a row twice in one answer: stops the loops "
                                         "of small and 2:4 models under greedy decoding (off = plain greedy)")
            with gr.Row():
                go = gr.Button("Generate both", variant="primary", elem_id="ps-generate")
                gen_stop = gr.Button("Stop", variant="stop", elem_id="ps-generate-stop", min_width=80)
    with gr.Row(equal_height=False, elem_classes="ps-outputs"):     # both panels start at the top
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
    table_note = gr.Markdown(elem_id="ps-table-note")

    gr.Markdown("### 2:4 speed on this machine")
    with gr.Row():
        speed_note = gr.Markdown("Sparse tensor cores run 2:4 products on NVIDIA GPUs (compute capability "
                                 "8.0+). This times the model's real prefill, dense vs 2:4, at the prompt's "
                                 "length and at 2 K, 8 K and 16 K tokens (as far as the model allows).")
        speed_btn = gr.Button("Measure 2:4 speed-up", size="sm", elem_id="ps-speed")
    speed_plot = gr.Plot(visible=False, show_label=False, elem_id="ps-speed-plot")

    # ------------------------------------------------------------------ recovery
    gr.Markdown("### Recover the surviving weights")
    gr.Markdown("A 2:4 mask fixes *which* weights stay. Recovery keeps that mask exactly and changes the "
                "surviving weights so the 2:4 model behaves more like the dense one. **Weight update** "
                "re-solves each layer's survivors so its outputs on the calibration text change as little as "
                "possible (SparseGPT's update with this mask held fixed; seconds on a GPU). **Fine-tune** "
                "trains the survivors to match the dense model's next-token distributions on the "
                "calibration text (distillation; the loss below is the KL divergence to the dense model). "
                "The recovered model gets its own row in the table above, and appears in the 2:4 model "
                "list and in Export. Stop ends it after the current step and keeps the last good weights. "
                "What to expect: recovery turns loops into on-topic sentences, but facts are fragile at 2:4, "
                "above all in small models (the bundled 135 M model loses capital cities and authors), and "
                "not all of them come back.")
    recoverable = recoverable_choices(jobs)
    with gr.Row():
        with gr.Column(scale=2, min_width=260):
            rec_choice = gr.Dropdown(recoverable, value=LEARNED if LEARNED in jobs.ws.results else None,
                                     label="Result to recover", allow_custom_value=True,
                                     info="the learned mask or any baseline computed above",
                                     elem_id="ps-recover-result")
            rec_method = gr.Radio([(RECOVERY_LABELS[m], m) for m in ("both", "obs", "finetune")], value="both",
                                  label="Recovery")
            rec_length = gr.Radio([(RECOVERY_LENGTH_LABELS[k], k) for k in RECOVERY_LENGTHS], value="standard",
                                  label="Length", elem_id="ps-recover-length",
                                  info="sets the sliders below and the teacher, fresh text and learning rate. Longer "
                                       "lengths read more text and recover more; what each gave on the bundled model "
                                       "is in bench/RESULTS.md")
            rec_steps = gr.Slider(*_range("steps"), RecoveryConfig.steps, step=1, label="Fine-tuning steps",
                                  elem_id="ps-recover-steps",
                                  info="the first time on a model, writing its own text adds a little; "
                                       "times: the Length labels above")
            rec_samples = gr.Slider(*_range("samples"), RecoveryConfig.samples, step=50,
                                    label="Fine-tuning samples", elem_id="ps-recover-samples",
                                    info="drawn like the run's calibration samples (0 = exactly the run's)")
            rec_batch = gr.Slider(*_range("batch"), RecoveryConfig.batch, step=1, label="Samples per step",
                                  elem_id="ps-recover-batch",
                                  info="each fine-tuning step reads this many samples; on a CPU its time grows about "
                                       "in proportion, a GPU has room for several at once")
            with gr.Accordion("Teacher, fresh text, learning rate", open=False, elem_id="ps-recover-more"):
                rec_teacher = gr.Radio([(TEACHER_LABELS[t], t) for t in TEACHERS], value=RecoveryConfig.teacher,
                                       label="Teacher", elem_id="ps-recover-teacher",
                                       info="how fine-tuning knows the dense model's answer at every position")
                rec_text = gr.Slider(*_range("text"), RecoveryConfig.text, step=50_000,
                                     label="Fresh text (tokens)", elem_id="ps-recover-text",
                                     info="text the dense model writes first (answers to varied instructions and free "
                                          "text, cached per model and seed); the samples are then drawn over it and the "
                                          "calibration text together. A GPU job")
                rec_lr = gr.Number(RecoveryConfig.lr, minimum=_range("lr")[0], maximum=_range("lr")[1],
                                   label="Fine-tuning learning rate", elem_id="ps-recover-lr",
                                   info="relative to each layer's weight scale rms(W0); warm-up, then cosine decay")
            with gr.Row():
                rec_go = gr.Button("Recover", variant="primary", elem_id="ps-recover")
                rec_stop = gr.Button("Stop", variant="stop", elem_id="ps-recover-stop", min_width=80)
        with gr.Column(scale=3):
            rec_progress = gr.HTML(recovery_progress_html(None), elem_id="ps-recover-progress")
            rec_loss = gr.Plot(plots.loss_figure([], plots.RECOVERY_TITLE), show_label=False, elem_id="ps-recover-loss")

    w = Widgets(prompt=prompt, variant=variant, sample=sample, temperature=temperature, top_p=top_p, chat=chat,
                block_repeats=block, max_new=max_new, dense=dense_out, pruned=pruned_out, summary=summary,
                baselines=chosen, table=table, table_note=table_note, speed_note=speed_note, speed_plot=speed_plot,
                rec_choice=rec_choice, rec_method=rec_method, rec_length=rec_length, rec_steps=rec_steps,
                rec_samples=rec_samples, rec_batch=rec_batch, rec_lr=rec_lr, rec_teacher=rec_teacher,
                rec_text=rec_text, rec_progress=rec_progress, rec_loss=rec_loss)

    def on_generate(v, page):
        yield from generate_pair(jobs, *[v[n] for n in GENERATE])

    def on_table(v, page):
        yield from stream_perplexities(jobs, v["baselines"])

    def on_speed(v, page):
        yield from stream_speedup(jobs, v["prompt"])

    def on_recover(v, page):
        yield from recover_result(jobs, *[v[n] for n in RECOVER])

    def on_length(v, page):
        return recovery_length(v["rec_length"])

    def on_stop(v, page):
        notify(jobs.stop(), "info")

    def on_select(v, page):
        choices = variant_choices(jobs)
        value = jobs.default_result()
        return {"variant": gr.update(choices=choices, value=value), "table": perplexity_table(jobs)}

    def on_select_recoverable(v, page):
        choices = recoverable_choices(jobs)
        learned = [n for _, n in choices if method_of(n) == LEARNED]      # the newest learned mask first
        value = learned[-1] if learned else (choices[0][1] if choices else None)
        return {"rec_choice": gr.update(choices=choices, value=value)}

    # Heavy events have no queue of their own (concurrency_limit=None): the job manager answers
    # "busy" at once while another one holds the model, instead of a silent wait. Inputs arrive
    # as sent (preprocess=False) and are checked in the handlers (ui.inputs).
    w.listen(go.click, on_generate, GENERATE, PairView, api_name="generate", concurrency_limit=None,
             show_progress="hidden", preprocess=False)
    # the page scrolls the two answers into view (at 1280×720 they start near the bottom edge)
    go.click(None, js="() => document.querySelector('.ps-outputs')?.scrollIntoView({block: 'nearest'})",
             api_visibility="private")
    # progress is the note's per-row lines, never an overlay: rows stay visible as they arrive
    w.listen(table_btn.click, on_table, ["baselines"], TableView, api_name="perplexity", concurrency_limit=None,
             show_progress="hidden", preprocess=False)
    w.listen(speed_btn.click, on_speed, ["prompt"], SpeedView, api_name="speedup", concurrency_limit=None,
             preprocess=False)
    w.listen(rec_go.click, on_recover, RECOVER, RecoveryView, api_name="recover", concurrency_limit=None,
             show_progress="hidden", preprocess=False)
    w.listen(rec_length.input, on_length, ["rec_length"], LengthView, api_visibility="private", queue=False)
    # every Stop stops whatever runs (generation, the table, a recovery, the speed-up, learning, an export)
    w.listen(stop_btn.click, on_stop, [], [], queue=False, api_name="stop_eval")
    w.listen(gen_stop.click, on_stop, [], [], queue=False, api_visibility="private")
    w.listen(rec_stop.click, on_stop, [], [], queue=False, api_name="stop_recover")
    w.listen(tab.select, on_select, [], ["variant", "table"], api_name="refresh_compare", queue=False)
    w.listen(tab.select, on_select_recoverable, [], ["rec_choice"], api_visibility="private", queue=False)
    if demo is not None:          # a reloaded page (or a second tab) follows the current or last jobs
        for attach, view in ((attach_perplexities, TableView), (attach_recovery, RecoveryView),
                             (attach_speedup, SpeedView)):
            w.listen(demo.load, lambda v, page, attach=attach: attach(jobs), [], view, stream=True,
                     api_visibility="private", concurrency_limit=None, show_progress="hidden")
    return w
