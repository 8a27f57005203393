"""Learn tab: pick a model, data and hyper-parameters, start a run, watch it learn a 2:4 mask.

The form is generated from `RunConfig`, so every CLI flag has a widget and a new field shows
up here by itself. The charts are fed by polling the server-side job (ui.jobs): the Start
handler and the page-load handler both just follow the current job, which is why a reload
re-attaches to a running job and a second visitor sees the same run. Handlers answer with a
`LearnView` (the tab's outputs by name, ui.widgets).
"""
from __future__ import annotations

import os

import time
from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import torch

from proxsparse_core.runs import curves as plots
from proxsparse_core.config import PRESETS, RunConfig, default_preset, preset_note as measured_note
from proxsparse_core.data.text import HELD_OUT_SHARE
from proxsparse_core.method.learner import HELDOUT_WINDOWS
from proxsparse_core.results import DENSE
from proxsparse_core.errors import SettingError, UserError
from proxsparse_core.models.loading import BUNDLED, BUNDLED_LABEL
from proxsparse_core.progress import scoring_seconds

from . import inputs
from .feedback import esc, explain, fail, fmt_bytes, fmt_duration, guarded, in_request, notify
from .jobs import Busy, JobManager, LearnJob, off_thread, perplexity_phase, watch
from .widgets import SKIP, Widgets

FORM = [f.name for f in fields(RunConfig) if f.name != "data"]   # data has its own three widgets
DATA_MODES = ["built-in text", "upload a file", "HF dataset", "built-in + the model's own text"]
MODE_OF_DATA = {"builtin": DATA_MODES[0], "mix": DATA_MODES[3]}   # data settings a preset may name
KEEP_ON_PRESET = ("device", "dtype", "device_map", "max_memory", "trust_remote_code", "data_field")
POLL_S = 1.0                 # the live Learn tab redraws at most once a second: each frame redraws three charts
                             # in the browser, and twice a second took a 2-core laptop's time from the learning
                             # itself (bench/RESULTS.md 3d)
CUSTOM = "custom"            # the preset box when the settings are the user's own (or fit no preset)
GPU_PRESETS = {k for k, v in PRESETS.items() if v["gpu"]}     # made for a GPU: the demo model, 7B–14B


def preset_model(name: str) -> str | None:
    """The model a preset is made for; None for a preset that fits any model (scale-free)."""
    return PRESETS[name]["settings"].get("model")
CONFIRM_S = 120              # a second Start within this long goes ahead despite the CPU-only warning

LABELS = {
    "model": "Model", "device": "Device", "dtype": "Precision", "trust_remote_code": "Trust remote code",
    "device_map": "Multi-GPU placement", "max_memory": "Memory per device", "data_field": "Text field", "samples": "Calibration samples",
    "ctx": "Tokens per sample", "eval_ctx": "Perplexity window (tokens)", "eval_windows": "Perplexity windows",
    "lambda1": "λ1 · 2:4 regulariser", "lambda2": "λ2 · frozen-weight regulariser", "eps": "ε (λ2 term)",
    "lr": "Learning rate", "steps": "Steps", "batch": "Batch size", "warmup": "Warm-up share",
    "seed": "Seed", "grad_ckpt": "Gradient checkpointing", "train_all": "Train all parameters",
    "w0_offload": "Keep W0 on the CPU", "master_weights": "float32 master weights (bf16/fp16 models)", "layer_stats_every": "Per-layer stats every N steps",
    "cpu_autocast": "bf16 products when learning on a CPU that has them",
    "lambda_scale": "λ1 / lr scaling", "lr_schedule": "Learning-rate schedule", "loss": "Training objective",
    "score": "What ranks weights in a group",
}
FIELDS = {f.name: f for f in fields(RunConfig)}
MAIN = ("lambda1", "lambda2", "lr", "steps")            # shown open; the rest sit in "Advanced"
DATA = ("samples", "ctx")
MODEL = ("model", "device", "dtype")
INSPECT = ["model", "device", "dtype", "trust_remote_code", "device_map"]    # what Inspect model reads


# ---------------------------------------------------------------------------- plain handlers

def data_source(mode: str, upload, hf_spec: str) -> str:
    """The RunConfig.data string for the data widgets."""
    mode = inputs.one_of("Calibration data", mode, DATA_MODES)
    if mode == DATA_MODES[1]:
        path = inputs.upload(".txt or .jsonl file", getattr(upload, "name", upload))
        if not path:
            raise UserError("choose a .txt or .jsonl file to upload, or pick the built-in text")
        return path
    if mode == DATA_MODES[2]:
        spec = inputs.text("HF dataset", hf_spec).strip()
        if not spec:
            raise UserError("type an HF dataset, e.g. hf:wikitext:wikitext-2-raw-v1:train:text")
        return spec if spec.startswith("hf:") else "hf:" + spec
    if mode == DATA_MODES[3]:
        return "mix"        # half the built-in text, half text the model wrote itself (cached per model and seed)
    return "builtin"


def form_value(name: str, v):
    """One widget value, checked against its field's type; messages name the widget's label."""
    label, kind = LABELS.get(name, name), type(FIELDS[name].default)
    if v is None or (isinstance(v, str) and not v.strip() and name in ("model", "device", "dtype")):
        raise UserError(f"{label} is empty")
    if kind is bool:
        return inputs.flag(label, v)
    if kind is int:
        return inputs.whole(label, v)
    if kind is float:
        return inputs.number(label, v)
    return inputs.text(label, v).strip()


def labelled(exc: UserError) -> str:
    """A RunConfig error in the words of the page: a SettingError ("lambda1 must be ≥ 0 …") names
    its setting, which becomes the widget's label ("λ1 · 2:4 regulariser must be ≥ 0 …"); any
    other error reads as it is."""
    if isinstance(exc, SettingError) and exc.setting in LABELS:
        return f"{LABELS[exc.setting]} {exc.problem}"
    return str(exc)


def config_from_form(values: dict, data: str = "builtin") -> RunConfig:
    """A validated RunConfig from widget values (names as in FORM)."""
    clean = {name: form_value(name, v) for name, v in values.items() if name in FIELDS}
    try:
        return RunConfig(**{**clean, "data": data}).validate()
    except UserError as exc:
        raise UserError(labelled(exc)) from None


def preset_values(name: str, current: dict) -> tuple[list, str]:
    """Widget values for a preset: its settings over the defaults, keeping the user's
    environment choices (device, precision, …); and the preset's note. "custom" leaves the
    form as it is."""
    if name == CUSTOM:
        return [gr.skip()] * len(FORM), preset_note(CUSTOM)
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}")
    cfg = RunConfig(**{k: current[k] for k in KEEP_ON_PRESET if k in current}).with_preset(name)
    return [getattr(cfg, f) for f in FORM], preset_note(name)


def preset_form(name: str, values: dict) -> dict:
    """The Preset dropdown changed: the form's new values, its data mode (built-in text, or built-in +
    the model's own text) and the preset's note, by widget name."""
    new, text = preset_values(name, values)
    mode = MODE_OF_DATA.get(PRESETS[name]["settings"].get("data"), SKIP) if name in PRESETS else SKIP
    return {**dict(zip(FORM, new)), "mode": mode, "preset_note": text}


def preset_note(name: str) -> str:
    if name not in PRESETS:
        return "*custom: your own settings (no preset fits the chosen model)*"
    note = f"*{esc(measured_note(name, torch.cuda.is_available()))}*"
    if name in GPU_PRESETS:
        model = esc(PRESETS[name]["settings"]["model"])
        note += ((f"\n\n⚠ **Needs a GPU** (model folder `{model}`)" if _on_disk(name)
                  else f"\n\n⚠ **Needs a GPU and a download** of `{model}`")
                 + ("; this machine has no GPU, so a run would take very long here." if not torch.cuda.is_available()
                    else "."))
    return note


def _on_disk(name: str) -> bool:
    """Whether a preset's model is a folder on this machine (no download)."""
    return os.path.isdir(os.path.expanduser(preset_model(name) or ""))


PRESET_WORDS = {"quick-demo": "short · CPU, offline", "bundled-quality": "best on a GPU"}


def preset_label(name: str) -> str:
    """A preset's line in the dropdown, short enough to show whole in the box (the preset's note
    says the rest): what it is for and where it runs."""
    model = preset_model(name)
    if model is None:
        return f"{name} — any model"
    if name in GPU_PRESETS:
        return f"{name} — GPU" + ("" if _on_disk(name) else " + download")
    return f"{name} — {PRESET_WORDS.get(name, 'CPU, offline')}"


def preset_choices() -> list[tuple[str, str]]:
    return [(preset_label(k), k) for k in PRESETS] + [("custom — your own settings", CUSTOM)]


def preset_for(cfg: RunConfig, preset: str | None) -> str:
    """The preset to show for settings `cfg`: `preset` when it is made for cfg's model, else custom."""
    if preset in PRESETS and preset_model(preset) in (None, cfg.model):
        return preset
    fits = matching_preset(cfg)          # e.g. the model-agnostic preset whose settings these are
    return fits if fits != CUSTOM and preset_model(fits) in (None, cfg.model) else CUSTOM


def matching_preset(cfg: RunConfig) -> str:
    """The preset whose every setting `cfg` has (a reloaded page's last run), else custom."""
    d = cfg.to_dict()
    return next((k for k, v in PRESETS.items() if all(d.get(f) == x for f, x in v["settings"].items())), CUSTOM)


class PresetView(NamedTuple):
    preset: Any = SKIP
    preset_note: Any = SKIP


def model_changed(model, preset) -> PresetView:
    """The model field changed: a preset made for another model no longer applies (→ custom)."""
    model = inputs.text(LABELS["model"], model).strip()
    if preset in PRESETS and preset_model(preset) not in (None, model):
        return PresetView(CUSTOM, preset_note(CUSTOM))
    return PresetView()


def gpu_warning(jobs: JobManager, cfg: RunConfig) -> str | None:
    """On a machine without a GPU, the first Start of a preset's 7B–14B model is held back with
    a warning; Start again (within CONFIRM_S) goes ahead."""
    if torch.cuda.is_available() or str(cfg.device).startswith(("cuda", "mps")):
        return None
    if not any(preset_model(k) == cfg.model for k in GPU_PRESETS):
        return None
    if time.time() - jobs.warned.get(cfg.model, 0.0) < CONFIRM_S:
        return None
    jobs.warned[cfg.model] = time.time()
    return (f"{cfg.model} is a 7B–14B model made for a GPU: this machine has none, the model must be "
            f"downloaded, and a run on the CPU would take days. Press Start again to start anyway.")


def held_out_words(share: float = HELD_OUT_SHARE) -> str:
    fraction = {0.2: "⅕", 0.25: "¼", 0.1: "⅒", 0.5: "½"}.get(round(share, 3))
    return f"{fraction} of it ({100 * share:.0f}%)" if fraction else f"{100 * share:.0f}% of it"


def _rate(events: list[dict]) -> float:
    recent = events[-5:]
    return len(recent) / max(1e-9, sum(e["t_step"] for e in recent)) if recent else 0.0


PHASE_MARK = {"done": "✓", "running": "▶", "waiting": "·", "skipped": "–"}


def phases_html(job: LearnJob) -> str:
    """What comes after the steps, each part with its own state and progress."""
    chips = []
    for p in job.phases:
        extra = ""
        if p.state == "running" and p.total:
            extra = (f' <i>{p.done} / {p.total} {p.unit}</i><span class="ps-minibar">'
                     f'<span style="width:{100 * p.done / p.total:.0f}%"></span></span>')
        elif p.state == "running":
            extra = " …"
        elif p.state == "done" and p.seconds >= 0.05:
            extra = f" <i>{p.seconds:.1f} s</i>"
        elif p.state == "skipped":
            extra = " <i>skipped</i>"
        chips.append(f'<span class="ps-phase ps-ph-{p.state}">{PHASE_MARK[p.state]} {esc(p.name)}{extra}</span>')
    return f'<div class="ps-phases"><span class="ps-phase-lead">after the steps:</span>{"".join(chips)}</div>'


LONG_RUN_S = 3600       # an ETA beyond this is said plainly: longer than a class period


def _on_gpu(job: LearnJob) -> bool:
    return str(job.cfg.device).startswith("cuda") or "cuda" in job.model_info


def evaluation_seconds(job: LearnJob) -> float | None:
    """How long the held-out perplexity after the steps still takes: for each model still to be
    measured (not the dense model when this app measured it before on these windows; a score read
    from the memo after a restart is counted until its instant phase has run), the running phase's
    own pace once it has one, else the learning steps' pace (progress.scoring_seconds: a forward pass
    per token at a third of a step's forward + backward) for this run's windows × tokens. 0 when
    nothing is left; None when no step was timed yet or the number of windows is not known yet."""
    known = perplexity_phase(DENSE) if job.state.get("dense_measured") else None
    left = [p for p in job.phases if p.unit == "windows" and p.state in ("waiting", "running") and p.name != known]
    total = 0.0
    for p in left:
        if p.state == "running" and p.done and p.total:
            total += (time.time() - p.started) * (p.total - p.done) / p.done
            continue
        per = scoring_seconds((e.get("t_fwd_bwd") for e in job.events), job.cfg.batch * job.cfg.ctx,
                              p.total or job.cfg.eval_windows, job.cfg.eval_ctx)
        if per is None:
            return None
        total += per
    return total


def eta_words(job: LearnJob, steps_left: float) -> tuple[str, float]:
    """The ETA shown while the steps run (the held-out perplexity after them included) and the
    seconds it stands for."""
    if not job.evaluate:
        return f" · ETA {fmt_duration(steps_left)}", steps_left
    after = evaluation_seconds(job)
    if after is None:
        return f" · ETA {fmt_duration(steps_left)} for the steps, then held-out perplexity", steps_left
    total = steps_left + after
    return (f" · ETA {fmt_duration(total)}: steps {fmt_duration(steps_left)} + held-out perplexity "
            f"≈ {fmt_duration(after)}"), total


def long_run_html(seconds: float) -> str:
    if seconds <= LONG_RUN_S:
        return ""
    return (f'<div class="ps-warn">⚠ At this pace the run needs {fmt_duration(seconds)} more on this machine: '
            f'longer than a class period. Stop keeps the mask learned so far (and still measures it); fewer '
            f'steps end sooner.</div>')


def headline_html(job: LearnJob) -> str:
    """The run's result first: "dense 16.98 · ProxSparse 41.39 (×2.44)", held-out perplexity as
    measured after the steps (each number as soon as it is known)."""
    ppl = job.perplexity
    dense = ppl.get(DENSE)
    pruned = next((v for k, v in ppl.items() if k != DENSE), None)
    if dense is None and pruned is None:
        return ""
    value = lambda v: f"<b>{v:.2f}</b>" if v is not None else '<span class="ps-muted">…</span>'  # noqa: E731
    ratio = f' <span class="ps-ratio">(×{pruned / dense:.2f})</span>' if dense and pruned is not None else ""
    return (f'<div class="ps-headline" id="ps-headline"><span class="ps-hl-lead">held-out perplexity</span> '
            f'dense {value(dense)} · ProxSparse {value(pruned)}{ratio}'
            f'<span class="ps-hl-hint">lower is better</span></div>')


def extraction_html(job: LearnJob) -> str:
    """One line on how the mask was read out: the groups the prox made 2:4 by the last step, and
    the rest forced to 2:4 when the mask was extracted."""
    r = job.result
    if r is None or not getattr(r, "steps_done", 0) or job.active:
        return ""
    rank = "|w|·‖x‖" if job.cfg.score == "activation" else "|w|"
    share = 100 * r.learned_share_24
    return (f'<div class="ps-explain">{share:.1f}% of groups were 2:4 by the last step; the other '
            f'{100 - share:.1f}% were forced to 2:4 at extraction (each keeps its two largest {rank}), so the '
            f'mask is exactly 2:4 either way.</div>')


def progress_html(job: LearnJob | None, note: str = "") -> str:
    """Status badge, progress bar with ETA, and speed/memory figures; once measured, the held-out
    perplexities first."""
    if job is None:
        return (f'<div class="ps-progress"><span class="ps-badge ps-idle">ready</span> '
                f'Press <b>Start</b> to learn a 2:4 mask with these settings.{_note(note)}</div>')
    total = job.cfg.steps
    done = job.events[-1]["step"] if job.events else 0
    pct = 100.0 * done / max(1, total)
    head = f"step <b>{done} / {total}</b> · {pct:.0f}%"
    stats = ""
    if job.events:
        last = job.events[-1]
        stats = (f"{_rate(job.events):.2f} steps/s · {last['tokens_per_s']:,.0f} tokens/s · "
                 f"{'GPU peak' if _on_gpu(job) else 'process'} memory {fmt_bytes(last['mem_bytes'])} · "
                 f"per step: fwd+bwd {last['t_fwd_bwd']:.2f}s, AdamW {last['t_opt']:.2f}s, prox {last['t_prox']:.2f}s")
    warn = ""
    if job.active:
        current = job.current_phase
        if job.status == "running" and job.events and not job.stop.is_set():
            words, seconds = eta_words(job, job.events[-1]["eta"])
            head += words
            warn = long_run_html(seconds)
        elif job.status == "loading":
            head = "loading the model and data …"
        if current is not None:
            head += f" · {esc(current.name)} …"
            after = evaluation_seconds(job) if job.evaluate and current.unit == "windows" else None
            head += f" · about {fmt_duration(after)} left" if after else ""
        elif job.stop.is_set() and job.status == "running":
            head += " · stopping after this step"
    else:
        head += f" · {esc(job.message)}" if job.message else ""
    return (f'<div class="ps-progress">{headline_html(job)}<div class="ps-head"><span class="ps-badge '
            f'ps-{job.status}">{job.status}</span> {head}</div>{warn}'
            f'<div class="ps-bar"><div style="width:{pct:.1f}%"></div></div>'
            f'<div class="ps-stats">{stats}</div>{phases_html(job)}{extraction_html(job)}{_note(note)}</div>')


def _note(note: str) -> str:
    return f'<div class="ps-note">{esc(note)}</div>' if note else ""


def info_markdown(job: LearnJob | None) -> str:
    if job is None:
        return ""
    lines = []
    if job.model_info:
        lines.append(f"**Model** · {esc(job.model_info)}")
    if job.data_info:
        lines.append(f"**Data** · {esc(job.data_info)}")
    if job.verification:
        steps = (f"learned in {job.result.steps_done} of {job.cfg.steps} steps · "
                 if job.result is not None else "")
        lines.append(f"**Mask** · {steps}{esc(job.verification)}")
    if job.perplexity:
        ppl = job.perplexity
        text = " · ".join(f"{k} **{v:.2f}**" for k, v in ppl.items())
        if "dense" in ppl and job.name in ppl:
            text += f" (×{ppl[job.name] / ppl['dense']:.2f})"
        lines.append(f"**Held-out perplexity** · {text} — more rows in the Compare tab")
    if job.state.get("saved"):
        lines.append(f"**Run folder** · {esc(job.state['saved'])}")
    if not job.active and job.status == "failed":
        lines.append(f"**Error** · {esc(job.message)}")
    return "\n\n".join(lines)


def _last_layer_share(events: list[dict]):
    for e in reversed(events):
        if e.get("layer_share"):
            return e["layer_share"]
    return None


class LearnView(NamedTuple):
    """What the Learn tab shows for a job, by widget name (SKIP: left as it is)."""
    progress: Any = SKIP
    loss_plot: Any = SKIP
    sparsity_plot: Any = SKIP
    heatmap: Any = SKIP
    log: Any = SKIP
    info: Any = SKIP


def render(job: LearnJob | None, note: str = "", sent: dict | None = None) -> LearnView:
    """Everything the Learn tab shows for a job: progress, three charts, log, info. With `sent` (what
    this page was last sent, kept by `follow`), a chart, the log or the info that has not changed
    since is SKIP: neither built again nor drawn again in the browser (the heatmap changes every few
    steps, no chart while the perplexity is measured; on a 2-core machine every redraw is taken from
    the learning)."""
    shown = job.shown if job else None     # a failed Start keeps the last run's curves on screen
    events = list(shown.events) if shown else []
    layer_names = shown.layer_names if shown else []
    run = id(shown), len(events)

    def part(name: str, key, build):
        if sent is None:
            return build()
        if name in sent and sent[name] == key:
            return SKIP
        sent[name] = key
        return build()

    final = tuple(sorted(shown.perplexity.items())) if shown else ()
    totals = tuple(p.total for p in shown.phases) if shown else ()
    shares = next((i for i in range(len(events) - 1, -1, -1) if events[i].get("layer_share")), None)
    log = "\n".join(reversed(job.log[-200:])) if job else ""
    info = info_markdown(job)
    return LearnView(progress_html(job, note),
                     part("loss", (run, final, totals), lambda: loss_chart(job, events)),
                     part("sparsity", run, lambda: plots.sparsity_figure(events)),
                     part("heatmap", (id(shown), len(layer_names), shares),
                          lambda: plots.layer_heatmap(layer_names, _last_layer_share(events))),
                     part("log", log, lambda: log), part("info", info, lambda: info))


def probe_size(cfg: RunConfig, windows: int | None = None) -> tuple[int, int]:
    """(windows, tokens) of the learner's "if stopped now" probe: its first HELDOUT_WINDOWS held-out
    windows, each cut to ctx/2 tokens (at least 16, at most a window), as ProxSparseLearner takes them."""
    count = HELDOUT_WINDOWS if not windows else min(HELDOUT_WINDOWS, windows)
    return count, min(cfg.eval_ctx, max(cfg.ctx // 2, 16))


def loss_chart(job: LearnJob | None, events: list[dict]):
    """The loss chart of the run whose events are shown: its held-out probe named with its size, and
    the final perplexities (with their windows) at the last step once they are measured."""
    shown = getattr(job, "shown", job)          # the run whose curves are drawn
    if shown is None or not events:
        return plots.loss_figure(events)
    phases = [p for p in shown.phases if p.unit == "windows" and p.total]
    windows = phases[0].total if phases else None
    ppl = shown.perplexity
    pruned = next((v for k, v in ppl.items() if k != DENSE), None)
    final = (dict(dense=ppl.get(DENSE), pruned=pruned, windows=windows, tokens=shown.cfg.eval_ctx)
             if ppl else None)
    return plots.loss_figure(events, probe=probe_size(shown.cfg, windows), final=final)


CHART_NOTE = ("The training loss can *rise*: each step the prox (λ1) pulls every group of 4 further towards 2:4. "
              "What improves is the green line, the 2:4 model if stopped now (a quick probe of short held-out "
              "windows; ◆ final, all windows).")


def follow(job: LearnJob, note: str = "", poll: float = POLL_S):
    """Yield render(job) whenever it changes, until the job ends: the first frame and the last one
    whole (an API client reads the last), the others with only what changed."""
    sent: dict = {}
    for _ in watch(job, poll):
        yield render(job, note, sent if job.active else None)


def start_run(jobs: JobManager, mode, upload, hf_spec, evaluate, *values, page: bool = False):
    """Start a run with the form's values and stream it. If another run holds the machine, say
    so and show that run instead; bad settings are reported (`fail`) and nothing starts."""
    try:
        if len(values) != len(FORM):
            raise UserError(f"the form has {len(FORM)} settings, got {len(values)}")
        evaluate = inputs.flag("Measure held-out perplexity after learning", evaluate)
        cfg = config_from_form(dict(zip(FORM, values)), data_source(mode, upload, hf_spec))
        warning = gpu_warning(jobs, cfg)
        if warning:
            yield LearnView(progress=progress_html(jobs.job, warning))
            notify(warning)
            return
        job = jobs.start_learning(cfg, evaluate=evaluate)
    except Busy as exc:   # learning, recovery, perplexity, export, … holds the machine
        message = str(exc)
        api = in_request() and not page
        running = jobs.job if jobs.learning else None
        if running is not None and not api:       # the page watches the other run live
            notify(message)                       # Start pressed again says so (trigger_mode "multiple")
            yield render(running, "A run is already using the machine; you are watching it live (Stop ends it).")
            frames = follow(running)
            next(frames, None)                    # the same state again: the note stays until the run moves
            yield from frames
            return
        # otherwise the card says so once, and the request ends as refused: an API client gets
        # the busy message as its error, never a finished card of an earlier run
        note = (f"Another run is using the machine: {message}" if running is not None else message)
        yield LearnView(progress=progress_html(running or jobs.job, note))
        fail(message, page=page)
        return
    except Exception as exc:  # noqa: BLE001 - bad settings: one line, the page stays as it is
        message = explain(exc)
        yield LearnView(progress=progress_html(jobs.job, message))
        fail(message, page=page)        # a toast; an API client gets it as the response's error
        return
    yield from follow(job)


def attach(jobs: JobManager):
    """Page load: show (and keep streaming) the current or last job."""
    if jobs.job is None:
        yield render(None)
        return
    yield from follow(jobs.job)


LAST_RUN = FORM + ["mode", "upload", "hf_spec", "preset", "preset_note"]


def last_run_form(jobs: JobManager) -> dict:
    """Page load: the form shows the settings of the current or last run (so a reload, or a second
    visitor, sees what is running), or stays as it is when nothing has run yet. By widget name
    (LAST_RUN): the settings, the data mode, the uploaded file and the HF dataset widgets, then the
    preset box (the preset those settings are, else custom) and its note."""
    if jobs.job is None:
        return {}
    cfg = jobs.job.cfg
    values = {n: getattr(cfg, n) for n in FORM}
    values["model"] = gr.update(choices=model_choices(cfg.model), value=cfg.model)
    if cfg.data in MODE_OF_DATA:
        values["mode"] = MODE_OF_DATA[cfg.data]
    elif cfg.data.startswith("hf:"):
        values.update(mode=DATA_MODES[2], hf_spec=cfg.data)
    else:   # an uploaded file: offered again while it still exists
        values["mode"] = DATA_MODES[1]
        if Path(cfg.data).is_file():
            values["upload"] = cfg.data
    preset = matching_preset(cfg)
    return {**values, "preset": preset, "preset_note": preset_note(preset)}


def form_of_last_run(jobs: JobManager) -> list:
    """last_run_form as a list in the order of LAST_RUN (SKIP where a widget stays as it is)."""
    values = last_run_form(jobs)
    return [values.get(n, SKIP) for n in LAST_RUN]


def forget_upload(jobs: JobManager, new, old: str | None) -> str | None:
    """The data file widget changed: delete the file it held before (a copy in Gradio's upload
    folder) unless the current or last run reads it, so replaced uploads do not pile up.
    Returns the new path. (Gradio files uploads by content and name, so a second page that
    uploaded the very same file loses it too; starting a run then asks for it again.)"""
    try:
        new = inputs.upload("upload", new)
    except UserError:
        new = None
    if old and old != new and old not in data_in_use(jobs):
        remove_upload(old)
    return new


def data_in_use(jobs: JobManager) -> set[str]:
    return {cfg.data for cfg in (jobs.cfg, jobs.job.cfg if jobs.job else None) if cfg is not None}


def remove_upload(path: str):
    """Delete a file only if it lies in Gradio's upload folder (never a user's own file), and
    its folder when that is left empty."""
    from gradio.utils import get_upload_folder

    root, p = Path(get_upload_folder()).resolve(), Path(path).resolve()
    if not p.is_relative_to(root) or p == root:
        return
    p.unlink(missing_ok=True)
    if p.parent != root:
        try:
            p.parent.rmdir()              # Gradio keeps each upload in a folder of its own
        except OSError:
            pass


def clear_note(jobs: JobManager):
    """The progress card without a message under it; a running job's own stream keeps it fresh."""
    return SKIP if jobs.learning else progress_html(jobs.job)


def stop_run(jobs: JobManager) -> str:
    """Stop, whatever runs (learning, a recovery, the perplexity table, an export, generation)."""
    return jobs.stop()


@guarded(1)
def inspect_model(jobs: JobManager, model, device, dtype, trust_remote_code, device_map) -> str:
    """Load the chosen model (no learning) to show its size, device, precision and prunable layers."""
    chosen = dict(model=inputs.text(LABELS["model"], model).strip() or BUNDLED,
                  device=inputs.text(LABELS["device"], device).strip() or "auto",
                  dtype=inputs.text(LABELS["dtype"], dtype).strip() or "auto",
                  trust_remote_code=inputs.flag(LABELS["trust_remote_code"], trust_remote_code),
                  device_map=inputs.text(LABELS["device_map"], device_map).strip())
    cfg = jobs.check_remote_code(RunConfig(**{**(jobs.cfg or RunConfig()).to_dict(), **chosen}))
    with jobs.claim("loading a model"):
        lm = off_thread(jobs.ensure_loaded, cfg)        # not in Gradio's long-lived thread (off_thread)
    return f"**Model** · {esc(lm.describe())}"


# ---------------------------------------------------------------------------- layout

def model_choices(current: str) -> list[tuple[str, str]]:
    return [(BUNDLED_LABEL, BUNDLED)] + ([(current, current)] if current != BUNDLED else [])


def _widget(name: str, value, remote_code_allowed: bool = False):
    f = FIELDS[name]
    label, info = LABELS.get(name, name), f.metadata["help"]
    if name == "trust_remote_code" and not remote_code_allowed:
        return gr.Checkbox(value=False, label=label, interactive=False,
                           info="unavailable: this server was started without --allow-remote-code")
    if name == "model":
        return gr.Dropdown(choices=model_choices(value), value=value, allow_custom_value=True, label=label,
                           info="the bundled offline model, or type a Hugging Face id or a local folder")
    if name == "device":
        return gr.Dropdown(["auto", "cpu", "cuda", "mps"], value=value, allow_custom_value=True,
                           label=label, info="auto: CUDA, then MPS, then CPU")
    if name == "dtype":
        return gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value=value, label=label,
                           info="auto: bf16 on GPUs that support it, else fp32")
    if name == "device_map":
        return gr.Dropdown([("one device", ""), ("spread over all GPUs (accelerate)", "auto")],
                           value=value, label=label)
    if f.metadata.get("choices"):
        return gr.Dropdown(list(f.metadata["choices"]), value=value, label=label, info=info)
    if isinstance(f.default, bool):
        return gr.Checkbox(value=value, label=label, info=info)
    if isinstance(f.default, (int, float)) and "hi" in f.metadata:   # bounds: declared once, on the field
        lo, hi, _ = RunConfig.bounds(name)
        return gr.Number(value=value, precision=0 if isinstance(f.default, int) else None, minimum=lo, maximum=hi,
                         label=label, info=info)
    if isinstance(f.default, int):
        return gr.Number(value=value, precision=0, label=label, info=info)
    if isinstance(f.default, float):
        return gr.Number(value=value, label=label, info=info)
    return gr.Textbox(value=value, label=label, info=info)


def build_learn_tab(jobs: JobManager, demo: gr.Blocks, defaults: RunConfig, preset: str | None = None):
    """The tab; returns its widgets by name. `preset` is shown only when it is made for `defaults.model`
    (else "custom")."""
    widgets: dict[str, gr.components.Component] = {}
    preset = preset_for(defaults, preset or default_preset())

    def add(names):
        for n in names:
            widgets[n] = _widget(n, getattr(defaults, n), jobs.allow_remote_code)

    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=340, elem_classes="ps-panel"):
            with gr.Row(elem_classes="ps-actions"):     # sticky: reachable however far the form scrolls
                start = gr.Button("Start", variant="primary", elem_id="ps-start")
                stop = gr.Button("Stop", variant="stop", elem_id="ps-stop")
            # the preset first: it sets everything below. No info line, so at 1280×720 the box stays in the
            # upper half of the screen and its list opens downwards (each option says CPU or GPU, the note the rest)
            preset_box = gr.Dropdown(preset_choices(), value=preset, label="Preset", elem_id="ps-preset")
            note = gr.Markdown(preset_note(preset), elem_classes="ps-note")
            gr.Markdown("#### 1 · Model")
            add(MODEL[:1])
            with gr.Row():
                add(MODEL[1:])
            with gr.Row():
                inspect_btn = gr.Button("Inspect model", size="sm", variant="secondary")
            model_info = gr.Markdown(elem_classes="ps-info")
            gr.Markdown("#### 2 · Calibration data")
            mode = gr.Radio(DATA_MODES, value=MODE_OF_DATA.get(defaults.data, DATA_MODES[0]), label="Text", show_label=False,
                            info=f"built-in: Python's own documentation (offline); {held_out_words()} is held out "
                                 f"for perplexity, never learned from")
            upload = gr.File(label=f".txt or .jsonl file (at most {inputs.MAX_UPLOAD_MB} MB)", type="filepath",
                             file_types=[".txt", ".jsonl"], visible=False, height=90)
            last_upload = gr.State(None)        # this page's previous upload, removed when replaced
            hf_spec = gr.Textbox(label="HF dataset", visible=False,
                                 placeholder="hf:NAME[:CONFIG[:SPLIT[:FIELD]]]  e.g. hf:wikitext:wikitext-2-raw-v1")
            with gr.Row():
                add(DATA)
            gr.Markdown("#### 3 · ProxSparse")
            with gr.Row():
                add(MAIN[:2])
            with gr.Row():
                add(MAIN[2:])
            with gr.Accordion("Advanced", open=False):
                evaluate = gr.Checkbox(value=True, label="Measure held-out perplexity after learning")
                add([n for n in FORM if n not in MODEL + DATA + MAIN])
        with gr.Column(scale=8, elem_classes="ps-charts"):     # sticky: the charts stay in view
            progress = gr.HTML(progress_html(None), elem_id="ps-progress")
            with gr.Row():
                loss = gr.Plot(plots.loss_figure([]), show_label=False, elem_id="ps-loss")
                sparsity = gr.Plot(plots.sparsity_figure([]), show_label=False, elem_id="ps-sparsity")
            gr.Markdown(CHART_NOTE, elem_classes="ps-note", elem_id="ps-chart-note")
            heatmap = gr.Plot(plots.layer_heatmap([], None), show_label=False, elem_id="ps-heatmap")
            info = gr.Markdown(elem_classes="ps-info", elem_id="ps-info")
            log_box = gr.Textbox(label="Log (newest first)", lines=5, max_lines=5, autoscroll=False, interactive=False,
                                 elem_id="ps-log")

    w = Widgets(start=start, stop=stop, model_info=model_info, mode=mode, upload=upload, last_upload=last_upload,
                hf_spec=hf_spec, preset=preset_box, preset_note=note, evaluate=evaluate, progress=progress,
                loss_plot=loss, sparsity_plot=sparsity, heatmap=heatmap, info=info, log=log_box, **widgets)

    def on_start(v, page):
        yield from start_run(jobs, v["mode"], v["upload"], v["hf_spec"], v["evaluate"], *[v[n] for n in FORM],
                             page=page)

    def on_inspect(v, page):
        return {"model_info": inspect_model(jobs, *[v[n] for n in INSPECT], page=page)}

    def on_stop(v, page):
        notify(stop_run(jobs), "info")

    def on_mode(v, page):
        return {"upload": gr.update(visible=v["mode"] == DATA_MODES[1]),
                "hf_spec": gr.update(visible=v["mode"] == DATA_MODES[2])}

    def on_preset(v, page):
        return preset_form(v["preset"], {n: v[n] for n in FORM})

    def on_model(v, page):
        return model_changed(v["model"], v["preset"])

    def on_forget(v, page):
        return {"last_upload": forget_upload(jobs, v["upload"], v["last_upload"])}

    # Observers of the one job: no concurrency limit, or a second page would wait for the first.
    # Inputs arrive as sent (preprocess=False) and are checked by the handlers (ui.inputs), so a
    # bad value from an API client gets a message naming its widget instead of a silent failure.
    # trigger_mode "multiple": Start pressed again while a run goes reaches the server, which says it is busy
    w.listen(start.click, on_start, ["mode", "upload", "hf_spec", "evaluate"] + FORM, LearnView, api_name="start",
             concurrency_limit=None, show_progress="hidden", preprocess=False, trigger_mode="multiple")
    w.listen(demo.load, lambda v, page: attach(jobs), [], LearnView, stream=True, api_name="attach",
             concurrency_limit=None, show_progress="hidden")
    w.listen(demo.load, lambda v, page: last_run_form(jobs), [], LAST_RUN, api_visibility="private", queue=False,
             show_progress="hidden")
    w.listen(stop.click, on_stop, [], [], api_name="stop", queue=False)
    w.listen(mode.change, on_mode, ["mode"], ["upload", "hf_spec"], api_visibility="private", queue=False)
    w.listen(preset_box.input, on_preset, ["preset"] + FORM, FORM + ["mode", "preset_note"], api_visibility="private")
    w.listen(widgets["model"].input, on_model, ["model", "preset"], PresetView,
             api_visibility="private", queue=False)
    # an edited setting clears a message about the old one (Start checks everything again)
    w.listen([c.input for c in w(FORM + ["mode", "hf_spec", "evaluate"])],
             lambda v, page: {"progress": clear_note(jobs)}, [], ["progress"], api_visibility="private", queue=False,
             show_progress="hidden")
    # heavy, but no queue of its own: the job manager answers "busy" at once while another runs
    w.listen(inspect_btn.click, on_inspect, INSPECT, ["model_info"], api_name="inspect_model", concurrency_limit=None,
             preprocess=False)
    w.listen(upload.change, on_forget, ["upload", "last_upload"], ["last_upload"], api_visibility="private",
             queue=False, preprocess=False)
    return w
