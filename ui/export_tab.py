"""Export tab: write a 2:4 result as a Hugging Face folder on this machine, and download its small
artefacts (model card, masks, recipe, report) as one zip.

Exports go under one root folder (`$PROXSPARSE_EXPORTS`, default `./exports`); the folder name a
visitor types is sanitised so nothing is written outside it. The export itself is atomic (see
`proxsparse_core.runs.export`): Stop, a full disk or an error leave no half-written folder.

The zip offered for download is written to one folder the app owns (created on first use,
removed when the app exits) and replaces the previous one there: Gradio serves a copy from its
own cache, so downloads do not leave a temporary folder each.

An export is a job (ui.jobs): it runs in a thread of its own on the server and the tab follows
it, drawing the typed progress that `export_result` reports (its stage, step done of all); a
reloaded page re-attaches to a running export and shows the last one's result afterwards.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from proxsparse_core.errors import UserError
from proxsparse_core.progress import Progress
from proxsparse_core.runs.export import bundle, export_result, safe_name, target_in
from proxsparse_core.results import LEARNED, title

from . import inputs
from .feedback import esc, fmt_bytes, notify
from .jobs import Job, JobManager, watch
from .widgets import SKIP, Widgets

_downloads: Path | None = None


def export_root() -> Path:
    return Path(os.environ.get("PROXSPARSE_EXPORTS", "exports")).expanduser().resolve()


def downloads_dir() -> Path:
    """The app's one folder for download zips: created on first use, removed at exit."""
    global _downloads
    if _downloads is None or not _downloads.is_dir():
        _downloads = Path(tempfile.mkdtemp(prefix="proxsparse-downloads-"))
        atexit.register(shutil.rmtree, _downloads, ignore_errors=True)
    return _downloads


def download_zip(folder: Path) -> Path:
    """Zip an export's small artefacts into the downloads folder, replacing the zip offered before."""
    where = downloads_dir()
    dest = where / f"{folder.name}-artefacts.zip"
    for old in where.glob("*.zip"):
        if old != dest:
            old.unlink(missing_ok=True)
    return bundle(folder, dest)


def result_choices(jobs: JobManager) -> list[tuple[str, str]]:
    return [(title(n), n) for n in jobs.ws.results]


def default_name(jobs: JobManager, result: str | None) -> str:
    label = jobs.ws.lm.label if jobs.ws.lm is not None else "model"
    return safe_name(f"{label}-{result or LEARNED}-2to4-{time.strftime('%Y%m%d-%H%M%S')}")


def _events_for(jobs: JobManager, result: str) -> list[dict] | None:
    """The curve of the result: its learning run's (or its recovery's) events, also when it was
    opened from a saved run; None for a result without one (a one-shot baseline)."""
    events = jobs.curves.get(result)
    return list(events) if events else None


def export_request(result, folder_name, overwrite, evaluate) -> tuple[str, str, bool, bool]:
    """The checked values of an Export request (each message names its widget)."""
    return (inputs.text("Result to export", result), inputs.text("Folder name", folder_name).strip(),
            inputs.flag("Replace an existing folder of that name", overwrite),
            inputs.flag("Measure perplexity for the report", evaluate))


def run_export(jobs: JobManager, result: str, folder_name: str, overwrite: bool, evaluate: bool,
               stop: threading.Event | None = None, progress=None, shown_name: str | None = None,
               on_progress=None) -> tuple[str, str]:
    """Export `result` to <root>/<folder_name> and zip its small artefacts for download. An empty
    folder name means `shown_name`, the automatic name the page shows (else a fresh one).
    Returns (markdown summary, path of the zip). Progress goes to `on_progress(Progress)` and, as
    (share done, description), to `progress`. `stop`: an event of the caller's (cleared first);
    by default the job's own. Blocking; the page runs it as a job (start_export)."""
    result, folder_name, overwrite, evaluate = export_request(result, folder_name, overwrite, evaluate)

    def tell(report: Progress):
        if progress:
            progress(report.fraction or 0.0, desc=report.message)
        if on_progress:
            on_progress(report)
    with jobs.claim("exporting") as ws:       # a running job is reported as busy, not as "nothing"
        if stop is None:
            stop = jobs.eval_stop
        else:
            stop.clear()
        if not ws.results:
            raise UserError("nothing to export yet: learn a mask in the Learn tab (or compute a "
                            "baseline in the Compare tab) first")
        if result not in ws.results:
            raise UserError(f"no result named {result!r}; pick one from the list")
        target = target_in(export_root(), folder_name or shown_name or default_name(jobs, result))
        res = export_result(ws, result, target, events=_events_for(jobs, result), evaluate=evaluate,
                            overwrite=overwrite, stop=stop, progress=tell)
        zip_path = download_zip(res.folder)     # under the claim: one export replaces its zip at a time
    return summary_markdown(res), str(zip_path)


class ExportView(NamedTuple):
    """What the tab shows for an export, by widget name."""
    status: Any = SKIP
    download: Any = SKIP


def start_export(jobs: JobManager, result, folder_name, overwrite, evaluate, shown_name: str | None = None) -> Job:
    """An export as a job: `job.progress` is export_result's typed progress, `job.result` the
    finished ExportView (summary, zip)."""
    args = export_request(result, folder_name, overwrite, evaluate)     # bad values: at once

    def work(job: Job):
        job.report(Progress("starting", 0, 0, "checking the 2:4 pattern …"))
        summary, zip_path = run_export(jobs, *args, shown_name=shown_name, on_progress=job.report)
        job.result = ExportView(summary, zip_path)
    return jobs.start("export", "exporting", work, stop_note="— nothing will be left half-written")


def progress_markdown(job: Job) -> str:
    """A running export: its stage's message, and steps done of all as a bar and a count (from the
    typed progress, never from its words)."""
    p = job.progress
    if p is None:
        return "⏳ starting the export …"
    text = f"⏳ **{esc(p.message)}**"
    if p.total:
        width = 20
        filled = round(width * p.done / p.total)
        text += f"  \n`{'█' * filled}{'░' * (width - filled)}` step {min(p.done + 1, p.total)} of {p.total}"
    if job.stop.is_set():
        text += "  \n⏹ stopping: nothing will be left half-written …"
    return text


def export_view(job: Job) -> ExportView:
    if job.active:            # the zip of an earlier export leaves while this one is written
        return ExportView(status=progress_markdown(job), download=None)
    if job.status == "finished":
        summary, zip_path = job.result
        return ExportView(summary, zip_path if Path(zip_path).is_file() else SKIP)
    if job.status == "stopped":
        return ExportView(status=f"⏹ **Stopped**: {esc(job.message)}")
    return ExportView(status=f"⚠ {esc(job.message)}")


def follow_export(job: Job):
    for _ in watch(job):
        yield export_view(job)


def stream_export(jobs: JobManager, result, folder_name, overwrite, evaluate, shown_name: str | None = None):
    """Start an export job and follow it (ExportView frames); a failed one is raised as its one line."""
    job = start_export(jobs, result, folder_name, overwrite, evaluate, shown_name)
    yield from follow_export(job)
    if job.status == "failed":
        raise UserError(job.message)


def attach_export(jobs: JobManager):
    """Page load: the current or last export, live while it runs, then its result."""
    job = jobs.last("export")
    if job is None:
        yield ExportView()
        return
    yield from follow_export(job)


def summary_markdown(res) -> str:
    m = res.metrics
    size = sum((res.folder / f).stat().st_size for f in res.files)
    lines = [f"**Exported** {esc(m['result'])} to `{res.folder}` ({len(res.files)} files, {fmt_bytes(size)}).",
             "", f"{'✓' if m['verified'] else '✗'} {esc(m['verification'])}", ""]
    if m.get("perplexity"):
        lines += ["| model | held-out perplexity |", "|---|---|"]
        lines += [f"| {esc(k)} | {v:.3f} |" for k, v in m["perplexity"].items()]
        lines.append("")
    lines += ["Load it with `AutoModelForCausalLM.from_pretrained(\"" + str(res.folder) + "\")`; "
              "`proxsparse/masks.npz` re-creates it from the original model "
              "(`proxsparse_core.export.load_with_masks`)."]
    if m.get("weights_updated"):
        lines += ["", "The zip below holds the masks, recipe and report, not the updated weights: to show this "
                      "result on another machine, copy the whole folder and open it there (Saved runs → Open "
                      "folder)."]
    return "\n".join(lines)


def build_export_tab(jobs: JobManager, tab: gr.Tab | None = None, demo: gr.Blocks | None = None):
    """The tab's content; `tab` (the enclosing gr.Tab) refreshes the result list when selected, and
    `demo` re-attaches a reloaded page to the current or last export."""
    gr.Markdown("Write the 2:4 model as a normal Hugging Face folder (safetensors, config, tokenizer) "
                "with a model card, the masks alone (1 bit per weight), the recipe that reproduces the "
                f"run, and a report. Folders are created under `{export_root()}`; nothing is ever "
                "half-written or overwritten without your say.")
    with gr.Row():
        with gr.Column(scale=3):
            result = gr.Dropdown(result_choices(jobs), label="Result to export", allow_custom_value=True,
                                 info="the learned mask or a one-shot baseline", elem_id="ps-export-result")
            name = gr.Textbox(label="Folder name", placeholder="leave empty for an automatic name",
                              info=f"created inside {export_root()}; left empty, the grey name is the one written",
                              elem_id="ps-export-name")
            shown_name = gr.State(None)    # the automatic name in the placeholder: the one an empty box writes
            with gr.Row():
                evaluate = gr.Checkbox(True, label="Measure perplexity for the report")
                overwrite = gr.Checkbox(False, label="Replace an existing folder of that name")
        with gr.Column(scale=2, min_width=220):
            go = gr.Button("Export", variant="primary", elem_id="ps-export")
            stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="ps-export-stop")
            download = gr.File(label="Masks, recipe and report (zip)", interactive=False,
                               elem_id="ps-export-zip")
    status = gr.Markdown(elem_id="ps-export-status")
    w = Widgets(result=result, name=name, shown_name=shown_name, evaluate=evaluate, overwrite=overwrite,
                download=download, status=status)

    def on_export(v, page):
        yield from stream_export(jobs, v["result"], v["name"], v["overwrite"], v["evaluate"], v["shown_name"])

    def on_result(v, page):
        fresh = default_name(jobs, v["result"] if isinstance(v["result"], str) else None)
        return {"name": gr.update(placeholder=fresh), "shown_name": fresh}

    def on_stop(v, page):
        notify(jobs.stop(), "info")

    def on_select(v, page):
        choices = result_choices(jobs)
        value = jobs.default_result()
        fresh = default_name(jobs, value)
        return {"result": gr.update(choices=choices, value=value), "name": gr.update(placeholder=fresh),
                "shown_name": fresh}

    # no queue of its own: the job manager answers "busy" at once; inputs are checked in export_request
    export = w.listen(go.click, on_export, ["result", "name", "overwrite", "evaluate", "shown_name"], ExportView,
                      api_name="export", concurrency_limit=None, show_progress="hidden", preprocess=False)
    w.listen(export.then, on_result, ["result"], ["name", "shown_name"], api_visibility="private",
             queue=False)  # the next export gets a new name
    w.listen(result.input, on_result, ["result"], ["name", "shown_name"], api_visibility="private", queue=False)
    w.listen(stop_btn.click, on_stop, [], [], queue=False, api_name="stop_export")
    if tab is not None:
        w.listen(tab.select, on_select, [], ["result", "name", "shown_name"], api_name="refresh_export", queue=False)
    if demo is not None:
        w.listen(demo.load, lambda v, page: attach_export(jobs), [], ExportView, stream=True,
                 api_visibility="private", concurrency_limit=None, show_progress="hidden")
