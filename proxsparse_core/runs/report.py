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
import math
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
LINE_COLOURS = ["#2166ac", "#1b7837", "#6b7280", "#b2182b", "#9467bd"]   # as in the app's loss chart


def nice_ticks(lo: float, hi: float, count: int = 5, whole: bool = False) -> list[float]:
    """About `count` round tick values (1, 2 or 5 × 10^k apart) covering lo…hi; whole numbers
    only when `whole` (training steps)."""
    span = max(hi - lo, 1e-12)
    raw = span / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if whole:
        step = max(1, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _label(v: float, percent: bool, whole: bool) -> str:
    if percent:
        return f"{100 * v:.0f}%"
    if whole:
        return f"{int(round(v)):,}"
    return f"{v:.4g}"


def svg_line_chart(series: dict[str, tuple[list, list]], title: str, xlabel: str, ylabel: str,
                   percent: bool = False, width: int = 700, height: int = 360,
                   colours: dict[str, str] | None = None, dashed: tuple = ()) -> str:
    """A small, dependency-free line chart as an SVG string (one polyline per series; a series
    with one point is drawn as a dot). The x axis counts steps: its ticks are whole numbers."""
    colours = colours or {}
    left, right, top, bottom = 64, 230, 36, 48
    pw, ph = width - left - right, height - top - bottom
    xs = [x for xv, _ in series.values() for x in xv]
    ys = [y for _, yv in series.values() for y in yv if y == y]   # y == y drops NaN
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui, Segoe UI, Helvetica, Arial, sans-serif" '
           f'font-size="12" fill="#374151">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14" font-weight="600" fill="#064e3b">{html.escape(title)}</text>']
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
    pad = 0 if percent else 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x):
        return left + (x - x0) / (x1 - x0) * pw

    def py(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#d1d5db"/>')
    for yv in nice_ticks(y0, y1, 5):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(yv):.1f}" y2="{py(yv):.1f}" stroke="#eef0f3"/>')
        out.append(f'<text x="{left - 6}" y="{py(yv) + 4:.1f}" text-anchor="end">{_label(yv, percent, False)}</text>')
    for xv in nice_ticks(x0, x1, 6, whole=True):
        out.append(f'<text x="{px(xv):.1f}" y="{top + ph + 16}" text-anchor="middle">{_label(xv, False, True)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">{html.escape(ylabel)}</text>')
    for k, (name, (xv, yv)) in enumerate(series.items()):
        c = colours.get(name, LINE_COLOURS[k % len(LINE_COLOURS)])
        dash = ' stroke-dasharray="6 4"' if name in dashed else ""
        pts = [(px(x), py(y)) for x, y in zip(xv, yv) if y == y]
        if len(pts) == 1:
            out.append(f'<circle cx="{pts[0][0]:.1f}" cy="{pts[0][1]:.1f}" r="3.5" fill="{c}"/>')
        elif pts:
            out.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}" fill="none" '
                       f'stroke="{c}" stroke-width="2.2"{dash}/>')
        out.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 30}" y1="{top + 10 + 18 * k}" '
                   f'y2="{top + 10 + 18 * k}" stroke="{c}" stroke-width="2.5"{dash}/>')
        out.append(f'<text x="{left + pw + 34}" y="{top + 14 + 18 * k}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def loss_svg(events: list[dict]) -> str:
    """The training objective (smoothed, as in the app), the held-out loss of the 2:4 model if
    stopped at that step, and the dense model's on the same tokens."""
    from proxsparse_core.runs.curves import smooth

    steps = [e["step"] for e in events]
    distill = bool(events) and events[-1].get("objective") == "distill"
    name = "KL to dense (training)" if distill else "training loss"
    series = {f"{name}, smoothed": (steps, smooth([e["lm_loss"] for e in events]))}
    if any(e.get("l2_term") for e in events):
        series["with λ2 term, smoothed"] = (steps, smooth([e["loss"] for e in events]))
    held = [(e["step"], e["heldout_loss_24"]) for e in events if e.get("heldout_loss_24") is not None]
    dense = next((e["heldout_loss_dense"] for e in events if e.get("heldout_loss_dense") is not None), None)
    if held:
        series["2:4 if stopped now (held-out)"] = ([s for s, _ in held], [v for _, v in held])
    if dense is not None:
        series["dense (held-out)"] = ([steps[0], steps[-1]], [dense, dense])
    colours = {f"{name}, smoothed": "#2166ac", "with λ2 term, smoothed": "#b2182b",
               "2:4 if stopped now (held-out)": "#1b7837", "dense (held-out)": "#6b7280"}
    return svg_line_chart(series, "Loss", "training step", "loss", colours=colours, dashed=("dense (held-out)",))


def sparsity_svg(events: list[dict]) -> str:
    """Share of groups already 2:4 in the learned weights, and the groups with 3 or 4 non-zeros,
    in the colours of the app's chart (green 2:4, orange 3 non-zeros, grey 4)."""
    from proxsparse_core.runs.curves import NNZ_COLOURS

    steps = [e["step"] for e in events]
    totals = [max(1, sum(e["nnz_hist"])) for e in events]
    series = {"≤ 2 non-zeros (2:4)": (steps, [e["share_24"] for e in events]),
              "3 non-zeros": (steps, [e["nnz_hist"][3] / t for e, t in zip(events, totals)]),
              "4 non-zeros": (steps, [e["nnz_hist"][4] / t for e, t in zip(events, totals)])}
    colours = {"≤ 2 non-zeros (2:4)": NNZ_COLOURS[0], "3 non-zeros": NNZ_COLOURS[3], "4 non-zeros": "#8c8c8c"}
    return svg_line_chart(series, "Groups of 4 in the learned weights", "training step", "share of groups",
                          percent=True, colours=colours)


def _interactive_plots(events: list[dict]) -> str:
    """The app's plotly charts as HTML fragments (plotly.js embedded once, so it works offline); ""
    where plotly is not installed (the core alone, e.g. on a GPU machine: the SVG charts stand)."""
    from proxsparse_core.runs.curves import loss_figure, sparsity_figure

    try:
        figures = (loss_figure(events), sparsity_figure(events))
    except ImportError:
        return ""
    parts = []
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------- documents
STYLE = """
body { font-family: system-ui, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2937; background: #f8fafc;
  max-width: 1040px; margin: 0 auto; padding: 24px 20px 60px; line-height: 1.5; }
header { padding: 6px 4px 14px; }
.title { font-size: 28px; font-weight: 800; letter-spacing: -0.5px; color: #064e3b; }
.title span { color: #10b981; font-weight: 600; }
.sub { font-size: 15px; color: #374151; }
h2 { color: #065f46; font-size: 18px; margin: 0 0 8px; }
section { background: #fff; border: 1px solid #e5e7eb; border-radius: 12px; padding: 14px 18px; margin: 14px 0; }
table { border-collapse: collapse; margin: 4px 0; font-size: 14px; }
td, th { border-bottom: 1px solid #eef0f3; padding: 5px 12px 5px 0; text-align: left; vertical-align: top; }
th { color: #6b7280; font-weight: 600; font-size: 12.5px; text-transform: uppercase; letter-spacing: 0.3px; }
td.k { color: #6b7280; white-space: nowrap; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; background: #f3f4f6;
  border-radius: 4px; padding: 1px 4px; }
.ok { color: #065f46; font-weight: 600; } .bad { color: #991b1b; font-weight: 600; }
.charts svg { max-width: 100%; height: auto; }
"""

LABELS = {"result": "result", "method": "method", "model_label": "model", "base_model": "loaded from",
          "model": "model details", "dtype": "precision", "status": "run status", "steps": "steps",
          "message": "run message", "verified": "2:4 verified", "verification": "verification",
          "weights_updated": "surviving weights updated", "data": "data", "calibration_tokens": "calibration tokens",
          "held_out_tokens": "held-out tokens", "python": "Python", "platform": "platform", "cuda": "CUDA",
          "gpu": "GPU", "created": "created", "proxsparse_studio_revision": "ProxSparse Studio revision",
          "command": "command", "layers": "layers", "weights": "weights", "kept": "kept weights",
          "sparsity": "sparsity"}


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _kv_table(d: dict, code: tuple = (), labels: dict | None = None) -> str:
    """A dict as a two-column table (nested dicts and lists one level down, readable). Keys are
    shown through `labels`, else as they are (the names the recipe and the CLI flags use)."""
    labels = labels or {}
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items()) or "—"
        elif isinstance(v, list):
            v = ", ".join(str(x) for x in v) or "—"
        if k in code:
            value = f"<code>{html.escape(str(v))}</code>"
        elif k == "verified" and isinstance(v, bool):
            value = '<span class="ok">yes</span>' if v else '<span class="bad">no</span>'
        else:
            value = _cell(v)
        rows.append(f'<tr><td class="k">{html.escape(labels.get(k, k))}</td><td>{value}</td></tr>')
    return f"<table>{''.join(rows)}</table>"


def _table(rows: list[list[str]], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


def _fmt_ppl(rows: list[dict]) -> list[list[str]]:
    return [[r["model"], f"{r['perplexity']:.3f}",
             "" if r["vs_dense"] is None else f"{r['vs_dense']:.2f}×"] for r in rows]


def report_html(metrics: dict, events: list[dict], svgs: dict[str, str], interactive: bool = True) -> str:
    """One self-contained page in the app's style: summary, perplexity table, plots, and the
    recipe, mask statistics and environment as tables."""
    title = f"ProxSparse report: {metrics.get('model_label', '')}"
    summary = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>",
             '<header><div class="title">ProxSparse <span>Studio</span> · report</div>'
             f'<div class="sub">{html.escape(str(metrics.get("model_label", "")))}: a 2:4 semi-structured '
             f'sparse model ({html.escape(str(metrics.get("method", "")))})</div></header>',
             f"<section><h2>Summary</h2>{_kv_table(summary, labels=LABELS)}</section>"]
    if metrics.get("perplexity"):
        parts.append("<section><h2>Held-out perplexity</h2>"
                     + _table(_fmt_ppl(ppl_rows(metrics["perplexity"])), ["model", "perplexity", "vs dense"])
                     + "</section>")
    if svgs:
        parts.append('<section class="charts"><h2>Learning curves</h2>'
                     + "".join(svgs[k] for k in ("loss", "sparsity") if k in svgs) + "</section>")
    charts = _interactive_plots(events) if interactive and events else ""
    if charts:
        parts += ["<section><h2>Interactive charts</h2>", charts, "</section>"]
    recipe = metrics.get("recipe")
    if recipe:
        config = recipe.get("config") or {}
        rest = {k: v for k, v in recipe.items() if k != "config"}
        parts.append("<section><h2>Recipe</h2>" + _kv_table(rest, code=("command",), labels=LABELS)
                     + "<h2 style='margin-top:12px'>Settings</h2>" + _kv_table(config) + "</section>")
    if metrics.get("mask_stats"):
        parts.append(f"<section><h2>Mask</h2>{_kv_table(metrics['mask_stats'], labels=LABELS)}</section>")
    if metrics.get("environment"):
        env = dict(metrics["environment"])
        packages = env.pop("packages", {}) or {}
        parts.append("<section><h2>Environment</h2>" + _kv_table(env, labels=LABELS)
                     + ("<h2 style='margin-top:12px'>Packages</h2>" + _table(sorted(packages.items()), ["package", "version"])
                        if packages else "") + "</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _front_matter(source: str) -> list[str]:
    is_hub_id = "/" in source and not source.startswith(("/", ".", "~", "bundled:"))
    return (["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- pruning", "- sparsity", "- 2:4", "- semi-structured-sparsity", "- proxsparse"]
            + ([f"base_model: {source}"] if is_hub_id else []) + ["---"])


def _left_dense_lines(left) -> list[str]:
    """The card's warning about weights in the decoder blocks that no mask covers (none: no line)."""
    if not isinstance(left, dict) or not left.get("tensors"):
        return []
    names = [str(n) for n in left["tensors"]]
    shown = ", ".join(f"`{n}`" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    share = left.get("share_of_block_weights")
    if isinstance(share, (int, float)) and not isinstance(share, bool):
        share = f" ({share:.{0 if share >= 0.01 else 1}%} of the decoder blocks' weights)"
    else:
        share = ""
    return ["", f"**Not 2:4:** {len(names)} weight tensors inside the decoder blocks{share} are not linear "
                f"layers this studio prunes and are stored as they were: {shown}."]


def _what_and_use(metrics: dict, artefacts: str, source: str) -> list[str]:
    """What the model is (the verified 2:4 pattern, whose weights survive) and how to load it."""
    method = metrics.get("method") or "proxsparse"
    who = "ProxSparse learns" if method == "proxsparse" else f"{method} chooses"
    kept = (f"The surviving weights are exactly the original weights (W0 · mask): {who} *which* weights to keep, "
            "never their values." if not metrics.get("weights_updated") else
            "This method also updated the surviving weights, so they differ from the original model.")
    return [
        "", f"# {metrics.get('model_label', 'model')}: 2:4 semi-structured sparse ({metrics.get('method')})", "",
        f"Every prunable linear layer of the decoder blocks ({metrics.get('mask_stats', {}).get('layers', '?')} "
        "layers) keeps at most 2 non-zero weights in every group of 4 consecutive input weights, "
        "the pattern NVIDIA sparse tensor cores accelerate. Embeddings, `lm_head` and norms are dense.",
        *_left_dense_lines(metrics.get("left_dense")),
        "", kept, "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('path/to/this/folder')",
        "tokenizer = AutoTokenizer.from_pretrained('path/to/this/folder')", "```", "",
        "The weights are stored dense (zeros included), so the files are as large as the original model. "
        "A speed-up needs 2:4 kernels on an NVIDIA GPU: with ProxSparse Studio installed, "
        "`from proxsparse_core.inference.decode24 import load_for_generation` then "
        "`model, tokenizer, _ = load_for_generation('path/to/this/folder')` loads it for token-by-token "
        "generation that reads only the kept weights (where that is faster than dense); "
        "`torch.sparse.to_sparse_semi_structured` serves long prompts, and on small matrices it can be "
        "slower than dense.",
        "", "## Re-create from the original model and the mask file", "",
        f"`{artefacts}/masks.npz` holds the masks alone (1 bit per weight). With the original model:", "",
        "```python", "from proxsparse_core.export import load_with_masks",
        f"lm = load_with_masks({source!r}, '{artefacts}/masks.npz')", "```", "",
    ]


def _how_made_and_how_good(metrics: dict, artefacts: str) -> list[str]:
    """Recovery, agreement with dense, the perplexity table and the command that remakes it."""
    lines = []
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
    ppl = metrics.get("perplexity") or {}
    if ppl:
        lines += ["## Held-out perplexity", "", "| model | perplexity | vs dense |", "|---|---|---|"]
        lines += [f"| {r[0]} | {r[1]} | {r[2]} |" for r in _fmt_ppl(ppl_rows(ppl))]
        lines += ["", f"Data: {metrics.get('data', '?')}, {metrics.get('held_out_tokens', '?')} held-out tokens.", ""]
    recipe = metrics.get("recipe") or {}
    if recipe.get("command"):
        lines += ["## Reproduce", "", "```", recipe["command"], "```", ""]
        lines += [("λ1 is used as is (not multiplied by the learning rate). "
                   if (metrics.get("method") or "proxsparse") == "proxsparse" else "")
                  + f"Full settings: `{artefacts}/recipe.json`.", ""]
    return lines


def model_card(metrics: dict, artefacts: str, files: list[str] | None = None) -> str:
    """README.md of an exported folder: what it is, how to load it, how it was made, how good it is.
    It states the 2:4 pattern as a fact, so it is written only for a verified result
    (metrics["verified"] is True): anything else is a ValueError, never a card that claims 2:4.
    `files`: the names written in `artefacts` (the Files section lists only those)."""
    if metrics.get("verified") is not True:
        raise ValueError("a model card is written only for a result whose 2:4 pattern was verified "
                         f"({metrics.get('verification', 'no verification in the metrics')})")
    source = metrics.get("base_model", "")
    lines = _front_matter(source) + _what_and_use(metrics, artefacts, source) + _how_made_and_how_good(metrics, artefacts)
    listed = [("report.html", "metrics, perplexity table, loss and sparsity plots, environment"),
              ("loss.svg", "the loss plot as an image"), ("sparsity.svg", "the sparsity plot as an image"),
              ("metrics.json", "every figure above"), ("recipe.json", "the settings that remake it"),
              ("masks.npz", "the 2:4 masks, 1 bit per weight")]
    lines += ["## Files", ""] + [f"- `{artefacts}/{name}`: {what}" for name, what in listed
                                 if files is None or name in files]
    lines += ["", "Made with ProxSparse Studio (ProxSparse: arXiv 2502.00258). The base model's license applies.", ""]
    return "\n".join(lines)


def write_report(folder: Path, metrics: dict, events) -> list[str]:
    """Write metrics.json and report.html into `folder`, and loss.svg, sparsity.svg and events.jsonl
    when there are learning events (a result with no steps gets no empty charts)."""
    folder = Path(folder)
    evs = event_dicts(events)
    svgs = {"loss": loss_svg(evs), "sparsity": sparsity_svg(evs)} if evs else {}   # no steps: no empty charts
    files = {"metrics.json": json.dumps(metrics, indent=2, default=str),
             "report.html": report_html(metrics, evs, svgs)}
    if evs:
        files.update({"loss.svg": svgs["loss"], "sparsity.svg": svgs["sparsity"],
                      "events.jsonl": "".join(json.dumps(e) + "\n" for e in evs)})
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return sorted(files)

