"""Export tab: write a 2:4 result as a Hugging Face folder on this machine, and download its small
artefacts (model card, masks, recipe, report) as one zip.

Exports go under one root folder (`$PROXSPARSE_EXPORTS`, default `./exports`); the folder name a
visitor types is sanitised so nothing is written outside it. The export itself is atomic (see
`proxsparse_core.runs.export`): Stop, a full disk or an error leave no half-written folder.

The zip offered for download is written to one folder the app owns (created on first use,
removed when the app exits) and replaces the previous one there: Gradio serves a copy from its
own cache, so downloads do not leave a temporary folder each.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

from proxsparse_core.errors import UserError
from proxsparse_core.runs.export import bundle, export_result, safe_name, target_in
from proxsparse_core.results import LEARNED, title

from . import inputs
from .feedback import esc, fmt_bytes, from_page, guarded, notify
from .jobs import JobManager

STAGES = ("measuring dense", "measuring", "writing the pruned model", "writing masks", "exported")
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
    """The learning curve of the learned mask (the last run's events), if that run made it."""
    job = jobs.job
    if result == LEARNED and job is not None and job.result is not None and job.result.steps_done:
        return list(job.events)
    return None


def run_export(jobs: JobManager, result: str, folder_name: str, overwrite: bool, evaluate: bool,
               stop: threading.Event, progress=None, shown_name: str | None = None) -> tuple[str, str]:
    """Export `result` to <root>/<folder_name> and zip its small artefacts for download. An empty
    folder name means `shown_name`, the automatic name the page shows (else a fresh one).
    Returns (markdown summary, path of the zip)."""
    say = progress or (lambda frac, desc="": None)
    result = inputs.text("Result to export", result)
    folder_name = inputs.text("Folder name", folder_name).strip()
    overwrite = inputs.flag("Replace an existing folder of that name", overwrite)
    evaluate = inputs.flag("Measure perplexity for the report", evaluate)

    def stage(text: str):
        i = next((k for k, s in enumerate(STAGES) if text.startswith(s)), 0)
        say(i / len(STAGES), desc=text)
    with jobs.claim("exporting") as ws:       # a running job is reported as busy, not as "nothing"
        if not ws.results:
            raise UserError("nothing to export yet: learn a mask in the Learn tab (or compute a "
                            "baseline in the Compare tab) first")
        if result not in ws.results:
            raise UserError(f"no result named {result!r}; pick one from the list")
        target = target_in(export_root(), folder_name or shown_name or default_name(jobs, result))
        stop.clear()
        res = export_result(ws, result, target, events=_events_for(jobs, result), evaluate=evaluate,
                            overwrite=overwrite, stop=stop, progress=stage)
        zip_path = download_zip(res.folder)     # under the claim: one export replaces its zip at a time
    return summary_markdown(res), str(zip_path)


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
    return "\n".join(lines)


def build_export_tab(jobs: JobManager, tab: gr.Tab | None = None):
    """The tab's content; `tab` (the enclosing gr.Tab) refreshes the result list when selected."""
    stop = threading.Event()
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

    def on_export(r, n, ow, ev, auto, evt: gr.EventData, progress=gr.Progress()):
        return guarded(2)(run_export)(jobs, r, n, ow, ev, stop, progress, auto, page=from_page(evt))

    def on_result(r):
        fresh = default_name(jobs, r if isinstance(r, str) else None)
        return gr.update(placeholder=fresh), fresh

    def on_stop():
        stop.set()
        notify("stopping the export: nothing will be left half-written", "info")

    def on_select():
        choices = result_choices(jobs)
        value = LEARNED if LEARNED in jobs.ws.results else (choices[0][1] if choices else None)
        fresh = default_name(jobs, value)
        return gr.update(choices=choices, value=value), gr.update(placeholder=fresh), fresh

    # no queue of its own: the job manager answers "busy" at once; inputs are checked in run_export
    go.click(on_export, [result, name, overwrite, evaluate, shown_name], [status, download],
             api_name="export", concurrency_limit=None, preprocess=False
             ).then(on_result, result, [name, shown_name], api_visibility="private", queue=False)  # next name
    result.input(on_result, result, [name, shown_name], api_visibility="private", queue=False)
    stop_btn.click(on_stop, None, None, queue=False, api_name="stop_export")
    if tab is not None:
        tab.select(on_select, None, [result, name, shown_name], api_name="refresh_export", queue=False)
