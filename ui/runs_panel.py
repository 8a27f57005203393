"""Saved runs tab: every result the app makes is a run folder (the CLI's format) under one runs
folder; this tab lists them and opens any run or export folder back into the studio — the app's own,
one the CLI wrote, one made on a GPU machine and copied over (a path on this machine, or a zip).

Opening is a job (ui.jobs) like every long task: it reads and checks the files (runs.library), loads
the model the run names when another one is loaded (Trust remote code as this server allows it),
puts the result in the workspace under a name of its own (reopen.open_saved: never replacing a result),
verifies its 2:4 pattern and restores what the run recorded: its curve (the Learn tab, or the recovery
chart), its perplexity rows (Compare), its place in the result lists of Compare and Export. A reloaded
page re-attaches to it. Handlers answer with views by widget name (ui.widgets).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import pandas as pd

from proxsparse_core.config import RunConfig
from proxsparse_core.errors import UserError
from proxsparse_core.method.learner import LearnResult
from proxsparse_core.progress import Progress
from proxsparse_core.reopen import mask_of_recovered, open_saved, restore_mask_scores, restore_scores
from proxsparse_core.results import DENSE, LEARNED, is_recovered, method_of, title
from proxsparse_core.runs.curves import loss_figure
from proxsparse_core.runs.library import extract_zip, list_runs, read_saved

from . import inputs
from .feedback import esc
from .compare_tab import recovery_progress_html
from .jobs import Job, JobManager, LearnJob, watch
from .learn_tab import LearnView, remove_upload, render
from .widgets import SKIP, Widgets

LABELS = {
    "tab": "Saved runs",
    "intro": "Every result the app makes — a learned mask (finished or stopped), a one-shot baseline of the "
             "perplexity table, a recovery — is saved here as a run folder, the same files `python -m "
             "proxsparse_core learn --out DIR` writes. Open one to bring back its mask or recovered weights, "
             "its curves (Learn tab), its perplexity rows (Compare) and its place in Compare and Export. Any "
             "run or export folder opens: the CLI's, or one made on a GPU machine and copied here.",
    "table": "Saved runs (newest first)",
    "choice": "Saved run",
    "open": "Open",
    "refresh": "Refresh the list",
    "path": "Run or export folder on this machine",
    "path_info": "a folder with recipe.json and masks.npz (learn/prune/recover --out), or an export folder",
    "open_path": "Open folder",
    "zip": f"…or upload a zip of one (at most {inputs.MAX_UPLOAD_MB} MB)",
}
COLUMNS = ["saved run", "result", "model", "steps", "held-out perplexity", "× dense", "saved"]


# ---------------------------------------------------------------------------- the list

def runs_frame(jobs: JobManager, runs: list | None = None) -> pd.DataFrame:
    """The table of saved runs; `runs` is a listing already read (list_runs), else it is read now."""
    rows = []
    for r in list_runs(jobs.runs_dir) if runs is None else runs:
        steps = "" if r.steps is None else f"{r.steps}" + (f" ({r.status})" if r.status == "stopped" else "")
        rows.append([r.path.name, r.title if not r.problem else f"⚠ {r.problem}", r.model, steps,
                     "" if r.perplexity is None else round(r.perplexity, 3),
                     f"{r.perplexity / r.dense:.2f}×" if r.perplexity and r.dense else "",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)) if r.created else ""])
    return pd.DataFrame(rows, columns=COLUMNS)


def run_choices(jobs: JobManager, runs: list | None = None) -> list[tuple[str, str]]:
    return [(f"{r.path.name} · {r.title}", str(r.path))
            for r in (list_runs(jobs.runs_dir) if runs is None else runs) if not r.problem]


def list_update(jobs: JobManager, current: str | None = None) -> dict:
    """The list, its note and the run picker, read again. The picker keeps `current` while that run is
    still listed, else shows the newest run: a value chosen when the page was built would otherwise stay
    on a run that was newest then, and Open would open it while the table shows newer ones above.
    The folders are read once for both, so the table and the picker list the same runs."""
    runs = list_runs(jobs.runs_dir)
    choices = run_choices(jobs, runs)
    paths = [p for _, p in choices]
    value = current if current in paths else (paths[0] if paths else None)
    return {"runs_table": runs_frame(jobs, runs), "runs_choice": gr.update(choices=choices, value=value),
            "runs_note": list_note(jobs)}


def list_note(jobs: JobManager) -> str:
    return f"Run folders are saved in `{esc(str(jobs.runs_dir))}` (`app.py --runs-dir`, or `$PROXSPARSE_RUNS`)."


# ---------------------------------------------------------------------------- opening (a job)

def _already_open(jobs: JobManager, path: Path) -> str | None:
    where = Path(path).resolve()
    return next((n for n, p in jobs.saved.items() if n in jobs.ws.results and Path(p).resolve() == where), None)


def _load(jobs: JobManager, job: Job, opened) -> RunConfig:
    """Load the model and data the run names (the model only when another one is loaded). Data this
    machine cannot read (a dataset offline) gives way to the built-in text, except where the result is
    rebuilt from its own calibration samples."""
    cfg = opened.folder.cfg
    try:
        jobs.ensure_loaded(cfg)
        return cfg
    except UserError as exc:
        if cfg.data in ("", "builtin") or opened.folder.rebuilds_weights:
            raise
        plain = RunConfig(**{**cfg.to_dict(), "data": "builtin", "data_field": RunConfig.data_field})
        try:
            jobs.ensure_loaded(plain.validate())
        except UserError:
            raise exc from None
        job.say(f"its calibration text could not be read here ({exc}): the built-in text is used")
        return plain


def _learned_run(jobs: JobManager, opened, name: str, cfg: RunConfig, verification: str) -> LearnJob:
    """The opened learning run as the Learn tab shows a finished one: its curves, steps, check and perplexity."""
    ws, m = jobs.ws, opened.metrics
    status = m.get("status") if m.get("status") in ("finished", "stopped") else "finished"
    steps = m.get("steps") if isinstance(m.get("steps"), int) else opened.events[-1]["step"]
    job = LearnJob(0, cfg=cfg, evaluate=False, name=name)
    job.events, job.layer_names = list(opened.events), list(ws.lm.prunable.names)
    job.model_info = ws.lm.describe()
    job.data_info = f"{ws.data.source}: opened from a saved run"
    job.result = LearnResult(status, str(m.get("message") or status), steps, ws.results[name].masks,
                             job.layer_names)
    job.verification = verification
    job.perplexity = {n: ws.ppl[n] for n in (DENSE, name) if n in ws.ppl}
    for p in job.phases:
        p.state = "done"
    job.status, job.finished = status, time.time()
    job.message = f"opened from {opened.path}"
    job.state["saved"] = f"opened from {opened.path}"
    job.log = [f"opened {title(name)} from {opened.path}"]
    return jobs.record(job)


def _recovery_run(jobs: JobManager, opened, name: str) -> Job:
    """The opened recovery as the recovery panel shows an ended one: its fine-tuning curve."""
    status = opened.metrics.get("status") if opened.metrics.get("status") in ("finished", "stopped") else "finished"
    job = Job(0, kind="recover", what="recovering weights", status=status, events=list(opened.events),
              result=name, message=f"opened from {opened.path}", finished=time.time())
    job.progress = Progress("done", 1, 1, title(name))
    job.state["share"] = 1.0
    return jobs.record(job)


def start_open(jobs: JobManager, path=None, upload=None) -> Job:
    """Open a run or export folder (`path`), or the run a zip holds (`upload`, unpacked into the runs
    folder first), as a job. Its progress is typed (stages unzip, read, load, result, verify);
    `job.result` is the opened result's name; `job.state["learn"]` the Learn tab's view of it, if it
    is a learned mask with a curve."""
    if not path and not upload:
        raise UserError("choose a saved run, type a folder, or upload a zip first")

    def work(job: Job):
        ws, where = jobs.ws, path
        if upload:
            job.report(Progress("unzip", 0, 0, "checking and unpacking the zip …"))
            where = extract_zip(upload, jobs.runs_dir)
            remove_upload(str(upload))
            job.say(f"unpacked into {where}")
        job.report(Progress("read", 0, 0, "reading its recipe, masks, curve and metrics …"))
        opened = read_saved(where)
        for note in opened.notes:
            job.say(note)
        same = _already_open(jobs, opened.path)
        if same is not None:
            job.result, job.message = same, f"{title(same)} is open already (from {opened.path})"
            return "finished"
        job.report(Progress("load", 0, 0, f"loading {opened.folder.cfg.model} and its data …"))
        cfg = _load(jobs, job, opened)

        def blocks(done, total):
            job.report(Progress("result", done, total, f"rebuilding its updated weights: block {done}/{total}",
                                "blocks"))
        job.report(Progress("result", 0, 0, "putting its result in place …"))
        name, note = open_saved(ws, opened, blocks, job.stop)
        job.say(note)
        job.report(Progress("verify", 0, 0, "verifying the 2:4 pattern …"))
        check = ws.verify(name)
        jobs.verified[name] = check.ok
        job.say(str(check))
        job.say(restore_scores(ws, opened, name) if cfg is opened.folder.cfg else
                "no perplexity rows restored: they were measured on its own calibration text")
        jobs.saved[name] = opened.path
        if is_recovered(name):       # opened on its own: its mask alone answers in the lecture's middle column
            found = mask_of_recovered(ws, name, opened.tag)
            if found and found[1]:
                jobs.verified[found[0]] = ws.verify(found[0]).ok
                jobs.saved[found[0]] = opened.path          # read from that folder; nothing new is written
                if cfg is opened.folder.cfg:
                    restore_mask_scores(ws, opened, found[0])
                job.say(f"its mask on the original weights is {title(found[0])} too (mask only, for comparison)")
        if opened.events:
            jobs.curves[name] = list(opened.events)
            if method_of(name) == LEARNED:
                job.state["learn"] = _learned_run(jobs, opened, name, cfg, str(check))
            elif is_recovered(name):
                job.state["recovery"] = _recovery_run(jobs, opened, name)
        job.result = name
        job.message = f"Opened {title(name)} from {opened.path}"
    return jobs.start("open", "opening a saved run", work, stop_note="(a rebuild ends after the current block)")


class OpenView(NamedTuple):
    """What opening shows, by widget name: its status and the list; once a learned run is open, the
    Learn tab's progress card, charts, log and info (LearnView's names)."""
    runs_status: Any = SKIP
    runs_table: Any = SKIP
    runs_choice: Any = SKIP
    progress: Any = SKIP
    loss_plot: Any = SKIP
    sparsity_plot: Any = SKIP
    heatmap: Any = SKIP
    log: Any = SKIP
    info: Any = SKIP
    rec_progress: Any = SKIP
    rec_loss: Any = SKIP


def status_markdown(job: Job) -> str:
    if job.active:
        p = job.progress
        text = f"⏳ **{esc(p.message if p is not None else 'starting …')}**"
        if p is not None and p.total:
            text += f"  \n`{'█' * round(20 * p.done / p.total)}{'░' * (20 - round(20 * p.done / p.total))}`"
        return text
    if job.status == "failed":
        return f"⚠ {esc(job.message)}"
    if job.status == "stopped":
        return f"⏹ **Stopped**: {esc(job.message)}"
    notes = "".join(f"\n- {esc(line)}" for line in job.log if line.startswith(("the run used", "its calibration",
                                                                                "no perplexity rows")))
    where = ("Its curves are in the **Learn** tab, " if job.state.get("learn") is not None
             else "Its fine-tuning curve is in the recovery chart of **Compare**, " if job.state.get("recovery")
             else "")
    return (f"✓ **{esc(job.message)}**\n\n{where}its perplexity rows in **Compare**; it can be "
            f"compared, recovered and exported like any result.{notes}")


def open_view(jobs: JobManager, job: Job) -> OpenView:
    if job.active:
        return OpenView(runs_status=status_markdown(job))
    runs = list_runs(jobs.runs_dir)
    view = OpenView(status_markdown(job), runs_frame(jobs, runs), gr.update(choices=run_choices(jobs, runs)))
    learned = job.state.get("learn")
    if learned is not None and learned is jobs.job:          # the Learn tab shows it (unless a run started since)
        view = view._replace(**render(learned)._asdict())
    recovery = job.state.get("recovery")
    if recovery is not None and recovery is jobs.last("recover"):     # and the recovery chart
        view = view._replace(rec_progress=recovery_progress_html(recovery), rec_loss=loss_figure(recovery.events))
    return view


def follow_open(jobs: JobManager, job: Job):
    for _ in watch(job):
        yield open_view(jobs, job)


def stream_open(jobs: JobManager, path=None, upload=None):
    """Open as a job and follow it (OpenView frames); a failed one is raised as its one line."""
    path = inputs.text(LABELS["path"], path).strip() if path is not None else None
    upload = inputs.upload(LABELS["zip"], getattr(upload, "name", upload)) if upload else None
    job = start_open(jobs, path or None, upload)
    yield from follow_open(jobs, job)
    if job.status == "failed":
        raise UserError(job.message)


def attach_open(jobs: JobManager):
    """Page load: the current or last opening, live while it runs, then its result."""
    job = jobs.last("open")
    if job is None:
        yield OpenView()
        return
    yield from follow_open(jobs, job)


# ---------------------------------------------------------------------------- layout

def build_runs_panel(jobs: JobManager, tab: gr.Tab | None = None, demo: gr.Blocks | None = None,
                     learn: Widgets | None = None, compare: Widgets | None = None):
    """The tab's content. `tab` refreshes the list when selected, `demo` re-attaches a reloaded page
    to an opening; `learn` and `compare` (those tabs' widgets) show an opened run's curves at once."""
    gr.Markdown(LABELS["intro"])
    note = gr.Markdown(list_note(jobs), elem_id="ps-runs-where")
    runs = list_runs(jobs.runs_dir)
    table = gr.Dataframe(runs_frame(jobs, runs), headers=COLUMNS, interactive=False, elem_id="ps-runs-table",
                         label=LABELS["table"])
    with gr.Row():
        choice = gr.Dropdown(run_choices(jobs, runs), label=LABELS["choice"], allow_custom_value=True, scale=4,
                             elem_id="ps-runs-choice")
        with gr.Column(scale=1, min_width=160):
            open_btn = gr.Button(LABELS["open"], variant="primary", elem_id="ps-runs-open")
            refresh = gr.Button(LABELS["refresh"], size="sm", elem_id="ps-runs-refresh")
    with gr.Row():
        path = gr.Textbox(label=LABELS["path"], info=LABELS["path_info"], scale=4, elem_id="ps-runs-path",
                          placeholder="/path/to/runs/demo")
        open_path = gr.Button(LABELS["open_path"], scale=1, min_width=160, elem_id="ps-runs-open-path")
    upload = gr.File(label=LABELS["zip"], file_types=[".zip"], type="filepath", height=90, elem_id="ps-runs-zip")
    status = gr.Markdown(elem_id="ps-runs-status")
    w = Widgets(runs_table=table, runs_choice=choice, runs_path=path, runs_zip=upload, runs_status=status,
                runs_note=note)
    outputs = [n for n in OpenView._fields if n.startswith("runs_")]
    for other, names in ((learn, LearnView._fields), (compare, ("rec_progress", "rec_loss"))):
        if other is not None:
            for n in names:
                w.add(n, other[n])
            outputs += list(names)

    def shown(frames, names=outputs):          # the view's fields this page has widgets for
        for frame in frames:
            yield {k: v for k, v in frame._asdict().items() if k in names}

    def on_open(v, page):
        yield from shown(stream_open(jobs, v["runs_choice"]))

    def on_open_path(v, page):
        yield from shown(stream_open(jobs, v["runs_path"]))

    def on_upload(v, page):
        if v["runs_zip"]:
            yield from shown(stream_open(jobs, upload=v["runs_zip"]))

    def on_refresh(v, page):                   # the user's pick stays while it is listed
        return list_update(jobs, v["runs_choice"])

    def on_tab(v, page):                       # the tab opened: the newest run is picked
        return list_update(jobs)

    # heavy, but no queue of their own: the job manager answers "busy" at once while another job runs
    w.listen(open_btn.click, on_open, ["runs_choice"], outputs, api_name="open_run", concurrency_limit=None,
             show_progress="hidden", preprocess=False)
    w.listen(open_path.click, on_open_path, ["runs_path"], outputs, api_name="open_folder",
             concurrency_limit=None, show_progress="hidden", preprocess=False)
    w.listen(upload.upload, on_upload, ["runs_zip"], outputs, api_name="open_zip", concurrency_limit=None,
             show_progress="hidden", preprocess=False)
    w.listen(refresh.click, on_refresh, ["runs_choice"], ["runs_table", "runs_choice", "runs_note"],
             api_name="list_runs", queue=False)
    if tab is not None:
        w.listen(tab.select, on_tab, [], ["runs_table", "runs_choice", "runs_note"], api_visibility="private",
                 queue=False)
    if demo is not None:
        w.listen(demo.load, lambda v, page: shown(attach_open(jobs), ["runs_status"]), [], ["runs_status"],
                 stream=True, api_visibility="private", concurrency_limit=None, show_progress="hidden")
    return w
