"""The take-home report of a pruning result: metrics, perplexity table, loss and sparsity plots,
environment and versions, and the model card README of an exported folder.

The plots come twice: as SVG images drawn here (no browser, no extra package: they render on
a fresh offline machine and on GitHub), and as interactive plotly charts in report.html, built by
the same `plots.py` figures the app shows.
"""
from __future__ import annotations

import html
import importlib.metadata
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "numpy", "gradio", "plotly")


# ---------------------------------------------------------------------------------- facts
def environment() -> dict:
    """What produced the result: Python, OS, device, package versions and the code revision."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "packages": versions, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "created": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    rev = _git_revision()
    if rev:
        env["proxsparse_studio_revision"] = rev
    return env


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def event_dicts(events) -> list[dict]:
    """StepEvents (from a live run) or dicts (from events.jsonl) as plain dicts."""
    return [e.to_dict() if hasattr(e, "to_dict") else dict(e) for e in events or []]


def ppl_rows(ppl: dict, dense: str = "dense") -> list[dict]:
    """Perplexity table, dense first, with the ratio to dense when dense was measured."""
    order = sorted(ppl, key=lambda n: (n != dense, n))
    base = ppl.get(dense)
    return [{"model": n, "perplexity": ppl[n], "vs_dense": (ppl[n] / base) if base else None}
            for n in order]


# ---------------------------------------------------------------------------------- SVG plots
def svg_line_chart(series: dict[str, tuple[list, list]], title: str, xlabel: str, ylabel: str,
                   percent: bool = False, width: int = 640, height: int = 360) -> str:
    """A small, dependency-free line chart as an SVG string (one polyline per series)."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
    left, right, top, bottom = 64, 150, 36, 48
    pw, ph = width - left - right, height - top - bottom
    xs = [x for xv, _ in series.values() for x in xv]
    ys = [y for _, yv in series.values() for y in yv if y == y]   # y == y drops NaN
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>']
    if not xs or not ys:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#666">'
                   'no steps recorded</text></svg>')
        return "\n".join(out)
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if percent:
        y0, y1 = min(0.0, y0), max(1.0, y1)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def px(x):
        return left + (x - x0) / (x1 - x0) * pw

    def py(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for i in range(5):                                           # grid and tick labels
        yv = y0 + (y1 - y0) * i / 4
        xv = x0 + (x1 - x0) * i / 4
        label = f"{100 * yv:.0f}%" if percent else f"{yv:.3g}"
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(yv):.1f}" y2="{py(yv):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{py(yv) + 4:.1f}" text-anchor="end">{label}</text>')
        out.append(f'<text x="{px(xv):.1f}" y="{top + ph + 16}" text-anchor="middle">{xv:.4g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">{html.escape(ylabel)}</text>')
    for k, (name, (xv, yv)) in enumerate(series.items()):
        c = colours[k % len(colours)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xv, yv) if y == y)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        out.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 30}" y1="{top + 10 + 18 * k}" '
                   f'y2="{top + 10 + 18 * k}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{left + pw + 34}" y="{top + 14 + 18 * k}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def loss_svg(events: list[dict]) -> str:
    steps = [e["step"] for e in events]
    label = "KL to the dense model" if events and events[-1].get("objective") == "distill" else "LM loss"
    series = {label: (steps, [e["lm_loss"] for e in events])}
    if any(e.get("l2_term") for e in events):
        series["LM loss + λ2·L2"] = (steps, [e["loss"] for e in events])
    return svg_line_chart(series, "Calibration loss", "step", "loss")


def sparsity_svg(events: list[dict]) -> str:
    """Share of groups already 2:4 in the learned weights, and the groups with 3 or 4 non-zeros."""
    steps = [e["step"] for e in events]
    totals = [max(1, sum(e["nnz_hist"])) for e in events]
    series = {"≤ 2 non-zeros (2:4)": (steps, [e["share_24"] for e in events]),
              "3 non-zeros": (steps, [e["nnz_hist"][3] / t for e, t in zip(events, totals)]),
              "4 non-zeros": (steps, [e["nnz_hist"][4] / t for e, t in zip(events, totals)])}
    return svg_line_chart(series, "Groups of 4 in the learned weights", "step", "share of groups",
                          percent=True)


def _interactive_plots(events: list[dict]) -> str:
    """The app's plotly charts as HTML fragments (plotly.js embedded once, so it works offline)."""
    from .plots import loss_figure, sparsity_figure

    parts = []
    for i, fig in enumerate((loss_figure(events), sparsity_figure(events))):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------- documents
def _table(rows: list[list[str]], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


def _fmt_ppl(rows: list[dict]) -> list[list[str]]:
    return [[r["model"], f"{r['perplexity']:.3f}",
             "" if r["vs_dense"] is None else f"{r['vs_dense']:.2f}×"] for r in rows]


def report_html(metrics: dict, events: list[dict], svgs: dict[str, str], interactive: bool = True) -> str:
    """One self-contained page: summary, perplexity table, SVG plots, interactive plots, facts."""
    title = f"ProxSparse report: {metrics.get('model_label', '')}"
    summary = [[k, v] for k, v in metrics.items() if not isinstance(v, (dict, list))]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}pre{background:#f6f6f6;padding:8px;overflow-x:auto}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>", _table(summary, ["metric", "value"])]
    if metrics.get("perplexity"):
        parts += ["<h2>Held-out perplexity</h2>",
                  _table(_fmt_ppl(ppl_rows(metrics["perplexity"])), ["model", "perplexity", "vs dense"])]
    parts.append("<h2>Learning curves</h2>")
    parts += [svgs[k] for k in ("loss", "sparsity") if k in svgs]
    if interactive and events:
        parts += ["<h2>Interactive charts</h2>", _interactive_plots(events)]
    for key in ("recipe", "environment", "mask_stats", "verification"):
        if metrics.get(key) is not None:
            parts += [f"<h2>{key.replace('_', ' ').capitalize()}</h2>",
                      f"<pre>{html.escape(json.dumps(metrics[key], indent=2, default=str))}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def model_card(metrics: dict, artefacts: str) -> str:
    """README.md of an exported folder: what it is, how to load it, how it was made, how good it is."""
    source = metrics.get("base_model", "")
    is_hub_id = "/" in source and not source.startswith(("/", ".", "~", "bundled:"))
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- pruning", "- sparsity", "- 2:4", "- semi-structured-sparsity", "- proxsparse"]
    if is_hub_id:
        front.append(f"base_model: {source}")
    front.append("---")
    ppl = metrics.get("perplexity") or {}
    method = metrics.get("method") or "proxsparse"
    learned = method == "proxsparse"
    lines = front + [
        "", f"# {metrics.get('model_label', 'model')}: 2:4 semi-structured sparse ({metrics.get('method')})", "",
        f"Every prunable linear layer of the decoder blocks ({metrics.get('mask_stats', {}).get('layers', '?')} "
        "layers) keeps at most 2 non-zero weights in every group of 4 consecutive input weights, "
        "the pattern NVIDIA sparse tensor cores accelerate. Embeddings, `lm_head` and norms are dense.",
        "",
        (("The surviving weights are exactly the original weights (W0 · mask): ProxSparse learns "
          "*which* weights to keep, never their values." if learned else
          f"The surviving weights are exactly the original weights (W0 · mask): {method} chooses "
          "*which* weights to keep, never their values.") if not metrics.get("weights_updated") else
         "This method also updated the surviving weights, so they differ from the original model."),
        "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('path/to/this/folder')",
        "tokenizer = AutoTokenizer.from_pretrained('path/to/this/folder')", "```", "",
        "The weights are stored dense (zeros included), so the files are as large as the original model. "
        "A speed-up needs semi-structured sparse kernels, e.g. "
        "`torch.sparse.to_sparse_semi_structured` on an NVIDIA GPU (compute capability ≥ 8.0); on "
        "small matrices those kernels can be slower than dense.",
        "", "## Re-create from the original model and the mask file", "",
        f"`{artefacts}/masks.npz` holds the masks alone (1 bit per weight). With the original model:", "",
        "```python", "from proxsparse_core.export import load_with_masks",
        f"lm = load_with_masks({source!r}, '{artefacts}/masks.npz')", "```", "",
    ]
    if metrics.get("weights_updated"):
        lines += ["Because this method updated weights, the mask file reproduces the sparsity pattern "
                  "but not the updated values.", ""]
    if metrics.get("weights_note"):            # a recovered result: say how its weights were changed
        lines += ["## Recovery", "", metrics["weights_note"], ""]
        if metrics.get("recover_command"):
            lines += ["From the run folder of the mask (see Reproduce below):", "", "```",
                      metrics["recover_command"], "```", ""]
    if metrics.get("top1_agreement_with_dense") is not None:
        lines += [f"On the held-out text this model picks the same next token as the dense model at "
                  f"{100 * metrics['top1_agreement_with_dense']:.1f}% of positions.", ""]
    if ppl:
        lines += ["## Held-out perplexity", "", "| model | perplexity | vs dense |", "|---|---|---|"]
        lines += [f"| {r[0]} | {r[1]} | {r[2]} |" for r in _fmt_ppl(ppl_rows(ppl))]
        lines += ["", f"Data: {metrics.get('data', '?')}, {metrics.get('held_out_tokens', '?')} held-out tokens.", ""]
    recipe = metrics.get("recipe") or {}
    if recipe.get("command"):
        lines += ["## Reproduce", "", "```", recipe["command"], "```", ""]
        lines += [("λ1 is used as is (not multiplied by the learning rate). " if learned else "")
                  + f"Full settings: `{artefacts}/recipe.json`.", ""]
    lines += ["## Files", "",
              f"- `{artefacts}/report.html`: metrics, perplexity table, loss and sparsity plots, environment",
              f"- `{artefacts}/loss.svg`, `{artefacts}/sparsity.svg`: the plots as images",
              f"- `{artefacts}/metrics.json`, `{artefacts}/recipe.json`, `{artefacts}/masks.npz`", "",
              "Made with ProxSparse Studio (ProxSparse: arXiv 2502.00258). The base model's license applies.", ""]
    return "\n".join(lines)


def write_report(folder: Path, metrics: dict, events) -> list[str]:
    """Write loss.svg, sparsity.svg, metrics.json, events.jsonl and report.html into `folder`."""
    folder = Path(folder)
    evs = event_dicts(events)
    svgs = {"loss": loss_svg(evs), "sparsity": sparsity_svg(evs)}
    files = {"loss.svg": svgs["loss"], "sparsity.svg": svgs["sparsity"],
             "metrics.json": json.dumps(metrics, indent=2, default=str),
             "report.html": report_html(metrics, evs, svgs)}
    if evs:
        files["events.jsonl"] = "".join(json.dumps(e) + "\n" for e in evs)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return sorted(files)

