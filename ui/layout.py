"""The whole page: a header and the tabs (Learn, Compare, How 2:4 works, Export, Saved runs).
Theme and CSS are passed to `launch()`, as Gradio 6 expects, with the server's limits: uploads
of at most MAX_UPLOAD (refused by Gradio before they are stored), and temporary files (uploads,
download copies) removed once they are a day old."""
from __future__ import annotations

import os
from pathlib import Path

import gradio as gr
import torch

from proxsparse_core.config import RunConfig, default_preset

from .compare_tab import build_compare_tab
from .explain_tab import build_explain_tab
from .feedback import readable_requests
from .inputs import MAX_UPLOAD_MB
from .export_tab import build_export_tab
from .jobs import JobManager
from .learn_tab import build_learn_tab
from .runs_panel import LABELS as RUNS_LABELS, build_runs_panel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MAX_UPLOAD = f"{MAX_UPLOAD_MB}mb"   # a calibration text file is a few MB; anything larger is refused
CACHE_CLEANUP = (3600, 86400)       # every hour, delete this app's temporary files older than a day
THEME = gr.themes.Soft(primary_hue="emerald", secondary_hue="slate", neutral_hue="slate",
                       font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                       font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])


def css() -> str:
    return (ASSETS / "style.css").read_text()


def machine_summary() -> str:
    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        where = f"{torch.cuda.device_count()} × {', '.join(sorted(names))}"
    else:
        where = f"CPU only ({os.cpu_count()} cores)"
    return f"{where} · torch {torch.__version__.split('+')[0]} · gradio {gr.__version__}"


def _header() -> str:
    return f"""
<div class="ps-header">
  <div class="ps-title">ProxSparse <span>Studio</span></div>
  <div class="ps-sub">Learn which half of an LLM's weights to drop: a 2:4 sparsity mask chosen by the
  model's own loss (ProxSparse, ICML 2025), compared against one-shot pruning.</div>
  <div class="ps-machine">{machine_summary()}</div>
</div>"""


def build_app(jobs: JobManager | None = None, defaults: RunConfig | None = None,
              preset: str | None = None) -> gr.Blocks:
    """The page; `preset` (default: this machine's, config.default_preset) preselected in the Learn tab."""
    jobs = jobs or JobManager()
    preset = preset or default_preset()
    defaults = defaults or RunConfig().with_preset(preset)
    with gr.Blocks(title="ProxSparse Studio", delete_cache=CACHE_CLEANUP) as demo:
        gr.HTML(_header())
        with gr.Tabs():
            with gr.Tab("Learn a 2:4 mask", id="learn"):
                learn = build_learn_tab(jobs, demo, defaults, preset)
            with gr.Tab("Compare", id="compare", elem_id="ps-tab-compare") as compare:
                compared = build_compare_tab(jobs, compare, demo)
            with gr.Tab("How 2:4 works", id="explain", elem_id="ps-tab-explain") as explain:
                build_explain_tab(jobs, explain)
            with gr.Tab("Export", id="export", elem_id="ps-tab-export") as export:
                build_export_tab(jobs, export, demo)
            with gr.Tab(RUNS_LABELS["tab"], id="runs", elem_id="ps-tab-runs") as runs:
                build_runs_panel(jobs, runs, demo, learn, compared)
    demo.jobs = jobs
    return readable_requests(demo)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, **kw):
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=share, theme=THEME, css=css(),
                       footer_links=["api", "settings"], max_file_size=MAX_UPLOAD, **kw)
