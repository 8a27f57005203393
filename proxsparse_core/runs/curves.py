"""Plotly figures of a learning run, built from the plain event dicts the learner emits.

The app streams them live and the export report saves them, so the signatures stay simple:
lists of `StepEvent.to_dict()` in, a `plotly.graph_objects.Figure` out. Plotly is imported
inside each function so that `proxsparse_core` does not need it unless a figure is drawn.
Nothing here computes anything about the method; it only arranges numbers for the eye.
"""
from __future__ import annotations

import math
import re
from collections import Counter

NNZ_COLOURS = ["#1b7837", "#5aae61", "#a6dba0", "#f4a582", "#bababa"]  # 0,1,2 kept-2 greens; 3 orange; 4 grey
NNZ_LABELS = ["0 non-zeros", "1 non-zero", "2 non-zeros", "3 non-zeros", "4 non-zeros"]


def _layout(fig, title: str, height: int = 340, **kw):
    fig.update_layout(title=dict(text=title, x=0.02, font=dict(size=15)), template="plotly_white",
                      height=height, margin=dict(l=55, r=20, t=45, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0, font=dict(size=11)),
                      hovermode="x unified", **kw)
    return fig


def _step_axis(fig, steps: list[int]):
    """Steps are whole numbers: no 1.5 on the axis of a short run."""
    fig.update_xaxes(title_text="training step", tickformat="d", **({"dtick": 1} if steps[-1] <= 12 else {}))


def _waiting(fig, text: str):
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color="#888"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


SMOOTH_SPAN = 10   # steps in the moving average of the training curve


def smooth(values: list[float], span: int = SMOOTH_SPAN) -> list[float]:
    """Exponential moving average over about `span` steps, bias-corrected so the first points
    are not pulled towards zero."""
    alpha, avg, out = 2 / (span + 1), 0.0, []
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


LOSS_AXIS = "next-token loss (lower is better)"


LOSS_TITLE = "Loss: training, and the 2:4 model if you stopped now"
RECOVERY_TITLE = "Recovery: KL divergence to the dense model, per fine-tuning step"


def loss_figure(events: list[dict], title: str = LOSS_TITLE, probe: tuple[int, int] | None = None,
                final: dict | None = None):
    """The training objective per step (raw and smoothed), and on held-out text the loss of the
    model you would get if you stopped now (W0 under the current top-2 mask) against the dense
    model's (a reference line). A distillation run's KL to the dense model, and the λ2 term when
    it is on, go on a second axis: they are not next-token losses.

    The held-out lines are a quick probe of a few short windows, not the windows of the final
    perplexity, so their gap is not the result's: `probe` = (windows, tokens) names its size in
    the legend, and `final` = {"dense": ppl, "pruned": ppl, "windows": n, "tokens": t} puts the
    final perplexities, as losses (ln ppl) on the same axis, at the last step."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    _layout(fig, title)
    if not events:
        return _waiting(fig, "the loss appears here after the first step")
    steps = [e["step"] for e in events]
    distill = events[-1].get("objective") == "distill"
    name = "KL to dense (training)" if distill else "training loss"
    raw = [e["lm_loss"] for e in events]
    fig.add_trace(go.Scatter(x=steps, y=raw, name=f"{name}, per step", mode="lines", opacity=0.3,
                             line=dict(color="#2166ac", width=1)), secondary_y=distill)
    fig.add_trace(go.Scatter(x=steps, y=smooth(raw), name=f"{name}, smoothed", mode="lines",
                             line=dict(color="#2166ac", width=2.5)), secondary_y=distill)
    held = [(e["step"], e["heldout_loss_24"]) for e in events if e.get("heldout_loss_24") is not None]
    dense = next((e["heldout_loss_dense"] for e in events if e.get("heldout_loss_dense") is not None), None)
    size = (f" ({probe[0]} window{'s' * (probe[0] != 1)} × {probe[1]} tokens)" if probe else "")
    if dense is not None:
        fig.add_trace(go.Scatter(x=[steps[0], steps[-1]], y=[dense, dense],
                                 name=f"dense model, held-out probe{size}" if probe else "dense model, held-out",
                                 mode="lines",
                                 line=dict(color="#6b7280", width=1.5, dash="dash"),
                                 hovertemplate="dense: %{y:.3f}<extra></extra>"), secondary_y=False)
    if held:
        fig.add_trace(go.Scatter(x=[s for s, _ in held], y=[v for _, v in held], mode="lines+markers",
                                 name="2:4 model if stopped now, same probe" if probe else
                                 "2:4 model if stopped now, held-out", line=dict(color="#1b7837", width=2.5),
                                 marker=dict(size=7)), secondary_y=False)
    _final_marks(fig, final or {}, steps[-1])
    if any(e.get("l2_term") for e in events):
        fig.add_trace(go.Scatter(x=steps, y=[e["l2_term"] for e in events], name="λ2 term",
                                 line=dict(color="#b2182b", width=2, dash="dot")), secondary_y=True)
    right = [t for t, on in (("KL divergence to the dense model", distill),
                             ("λ2 · frozen-weight term", any(e.get("l2_term") for e in events))) if on]
    if right:
        fig.update_yaxes(title_text=" · ".join(right), secondary_y=True, showgrid=False)
    fig.update_yaxes(title_text=LOSS_AXIS, secondary_y=False)
    _step_axis(fig, steps)
    return fig


def _final_marks(fig, final: dict, step: int):
    """The final held-out perplexities as losses (ln ppl) at the last step, with their windows."""
    import plotly.graph_objects as go

    dense, pruned = final.get("dense"), final.get("pruned")
    where = f"{final['windows']} windows × {final['tokens']} tokens" if final.get("windows") else "all windows"
    for name, ppl, colour, place in (("dense", dense, "#374151", "bottom left"), ("2:4", pruned, "#1b7837", "top left")):
        if not ppl or ppl <= 0:
            continue
        extra = f" (×{ppl / dense:.2f})" if name == "2:4" and dense else ""
        fig.add_trace(go.Scatter(x=[step], y=[math.log(ppl)], mode="markers+text", text=[f"{ppl:.2f}{extra}"],
                                 textposition=place, cliponaxis=False,
                                 name=f"final {name}: perplexity {ppl:.2f}{extra} = loss {math.log(ppl):.2f}, "
                                      f"{where}",
                                 marker=dict(symbol="diamond", size=11, color=colour, line=dict(color="#fff", width=1)),
                                 hovertemplate=f"final {name}, {where}: perplexity {ppl:.2f}<extra></extra>"),
                      secondary_y=False)


def sparsity_figure(events: list[dict]):
    """How the weights move towards 2:4: the share of groups of 4 that hold 0…4 non-zeros (stacked,
    greens = already 2:4) and, as a line, the share that is already 2:4."""
    import plotly.graph_objects as go

    fig = _layout(go.Figure(), "Groups of 4 weights by non-zeros")
    if not events:
        return _waiting(fig, "the 2:4 share appears here after the first step")
    steps = [e["step"] for e in events]
    totals = [max(1, sum(e["nnz_hist"])) for e in events]
    for k in (2, 1, 0, 3, 4):   # greens at the bottom so their top edge is the 2:4 share
        share = [100 * e["nnz_hist"][k] / t for e, t in zip(events, totals)]
        if k < 2 and not any(share):
            continue
        fig.add_trace(go.Scatter(x=steps, y=share, name=NNZ_LABELS[k], stackgroup="nnz", mode="lines",
                                 line=dict(width=0.5, color=NNZ_COLOURS[k]), fillcolor=NNZ_COLOURS[k],
                                 hovertemplate="%{y:.1f}%"))
    fig.add_trace(go.Scatter(x=steps, y=[100 * e["share_24"] for e in events], name="already 2:4",
                             mode="lines", line=dict(color="#00441b", width=2.5, dash="dash"),
                             hovertemplate="%{y:.1f}%"))
    fig.update_yaxes(title_text="share of groups of 4 weights", range=[0, 100], ticksuffix="%")
    _step_axis(fig, steps)
    return fig


_BLOCK = re.compile(r"\.(\d+)\.(.+)$")


def _grid(layer_names: list[str]):
    """(row labels, column labels, cell of each layer) when names look like <blocks>.<i>.<path>. The
    experts of a mixture-of-experts block (<path> ending in an expert number, e.g. experts.down.7)
    share one cell per projection: the heatmap shows their mean."""
    cells, kinds, rows = [], [], []
    for n in layer_names:
        m = _BLOCK.search(n)
        if m is None:
            return None
        parts = m.group(2).split(".")
        kind = f"{parts[-2]} (experts)" if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
        cells.append((int(m.group(1)), kind))
        if kind not in kinds:
            kinds.append(kind)
        if int(m.group(1)) not in rows:
            rows.append(int(m.group(1)))
    if any(n > 1 and not k.endswith("(experts)") for (_, k), n in Counter(cells).items()):
        return None
    return sorted(rows), kinds, cells


def layer_heatmap(layer_names: list[str], layer_share: list[float] | None):
    """Share of groups already 2:4 in every prunable layer: projection (rows) × decoder block
    (columns), so a 30-block model stays a compact strip."""
    import plotly.graph_objects as go

    grid = _grid(layer_names or [])
    rows = len(grid[1]) if grid else 1
    fig = _layout(go.Figure(), "Already 2:4, per layer", height=max(220, 120 + 26 * rows))
    fig.update_layout(hovermode="closest")
    if not layer_names or not layer_share:
        return _waiting(fig, "per-layer shares appear every few steps")
    if grid is None:   # unknown naming: one row, one cell per layer in model order
        z = [[100 * s for s in layer_share]]
        text = [layer_names]
        x, y = list(range(len(layer_names))), ["layers"]
    else:
        blocks, kinds, cells = grid
        total, count, label = {}, {}, {}
        for name, cell, s in zip(layer_names, cells, layer_share):
            total[cell] = total.get(cell, 0.0) + 100 * s
            count[cell] = count.get(cell, 0) + 1
            label[cell] = name if count[cell] == 1 else f"{name.rpartition('.')[0]}.* (mean of {count[cell]} experts)"
        z = [[None] * len(blocks) for _ in kinds]
        text = [[""] * len(blocks) for _ in kinds]
        for (b, k), n in count.items():
            z[kinds.index(k)][blocks.index(b)] = total[(b, k)] / n
            text[kinds.index(k)][blocks.index(b)] = label[(b, k)]
        x, y = [str(b) for b in blocks], kinds
    # colours span the observed range (in steps of 5%), so late in a run, when every layer is
    # above 90%, the layers that lag behind still stand out
    low = min(v for row in z for v in row if v is not None)
    fig.add_trace(go.Heatmap(z=z, x=x, y=y, text=text, zmin=min(95, 5 * (low // 5)), zmax=100, colorscale="Greens",
                             colorbar=dict(title="2:4 %", ticksuffix="%", thickness=12),
                             hovertemplate="%{text}<br>%{z:.1f}% of groups already 2:4<extra></extra>",
                             xgap=1, ygap=1))
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False, type="category", title_text="decoder block" if grid else "layer")
    return fig
