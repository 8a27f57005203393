"""Figures only the app shows: the one-group prox demo, a real weight block before/after 2:4, and
the measured 2:4 prefill speed-up.

The learning-run figures (loss, sparsity, per-layer heatmap) live in `proxsparse_core.runs.curves`,
because the export report draws them too.
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

KEPT, PRUNED, INPUT = "#1b7837", "#d6604d", "#bdbdbd"
PATH_COLOURS = ["#2166ac", "#4393c3", "#f4a582", "#d6604d"]


def spread_labels(ys: list[float], gap: float) -> list[float]:
    """Label heights near `ys` at least `gap` apart, in the same order (so no label hides another)."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = list(ys)
    for a, b in zip(order, order[1:]):
        out[b] = max(out[b], out[a] + gap)
    shift = (sum(out) - sum(ys)) / max(1, len(ys))      # centre the group on the true values again
    return [v - shift for v in out]


def prox_group_figure(z: list[float], w: list[float], kept: list[bool],
                      lambdas: list[float], path: list[list[float]], lam: float):
    """Left: the four weights before (grey) and after the prox (green = survives the 2:4 mask,
    red = dropped by it). Right: each weight's prox output as λ grows over the slider's whole
    range, with the chosen λ marked."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.12,
                        subplot_titles=("one group of 4 weights", "prox output as λ grows"))
    names = [f"w{i + 1}" for i in range(4)]
    fig.add_trace(go.Bar(x=names, y=z, name="input z", marker_color=INPUT, opacity=0.9, offsetgroup="z"), 1, 1)
    for label, colour, keep in (("prox output, kept", KEPT, True), ("prox output, dropped by the 2:4 mask", PRUNED, False)):
        ys = [v if k == keep else None for v, k in zip(w, kept)]
        fig.add_trace(go.Bar(x=names, y=ys, name=label, marker_color=colour, offsetgroup="w",
                             text=[f"{v:+.2f}" if v is not None else "" for v in ys], textposition="outside",
                             cliponaxis=False), 1, 1)
    for i in range(4):
        fig.add_trace(go.Scatter(x=lambdas, y=[p[i] for p in path], name=names[i], mode="lines",
                                 line=dict(color=PATH_COLOURS[i], width=2.5), showlegend=False,
                                 hovertemplate=f"{names[i]}: %{{y:+.3f}} at λ=%{{x:.2f}}<extra></extra>"), 1, 2)
    top = max(1e-6, max(abs(v) for v in z)) * 1.25
    for i, y in enumerate(spread_labels(path[-1], gap=0.12 * top)):
        fig.add_annotation(x=lambdas[-1], y=y, text=names[i], showarrow=False, xanchor="left",
                           font=dict(color=PATH_COLOURS[i]), row=1, col=2)
    fig.add_vline(x=lam, line=dict(color="#333", dash="dash"), row=1, col=2)
    fig.update_yaxes(range=[-top, top], zeroline=True, zerolinecolor="#888", row=1, col=1)
    fig.update_yaxes(range=[-top, top], zeroline=True, zerolinecolor="#888", row=1, col=2)
    fig.update_xaxes(title_text="λ", range=[lambdas[0], lambdas[-1]], row=1, col=2)
    fig.update_layout(template="plotly_white", height=380, barmode="group", bargap=0.25,
                      margin=dict(l=40, r=40, t=50, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.14, x=0))
    return fig


def weight_block_figure(title: str, panels: list[tuple[str, list[list[float | None]]]],
                        marks: tuple[int, list[tuple[int, int]], str] | None = None):
    """Heatmaps of the same weight block under several masks; pruned weights (None) are left
    blank, so they show as grey holes. Thin lines mark the groups of 4 along the input
    dimension. The colour range ignores the few largest weights so the rest stay visible.
    `marks` = (panel index, [(row, input)…], legend text) rings cells of one panel."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels],
                        horizontal_spacing=0.04, shared_yaxes=True)
    values = sorted(abs(v) for _, block in panels for row in block for v in row if v is not None)
    top = values[int(0.98 * (len(values) - 1))] if values else 1.0
    for c, (_, block) in enumerate(panels, 1):
        cols = len(block[0]) if block else 0
        fig.add_trace(go.Heatmap(z=block, zmin=-top, zmax=top, zmid=0, colorscale="RdBu",
                                 showscale=c == len(panels), xgap=0.5, ygap=0.5,
                                 colorbar=dict(thickness=10, title="weight"),
                                 hovertemplate="row %{y}, input %{x}: %{z:+.4f}<extra></extra>"), 1, c)
        for x in range(4, cols, 4):
            fig.add_vline(x=x - 0.5, line=dict(color="#444", width=1), row=1, col=c)
        fig.update_xaxes(title_text="input dimension →", showgrid=False, row=1, col=c)
    if marks is not None and marks[1]:
        panel, cells, text = marks
        fig.add_trace(go.Scatter(x=[c for _, c in cells], y=[r for r, _ in cells], mode="markers", name=text,
                                 marker=dict(symbol="square-open", size=9, color="#f59e0b", line=dict(width=2)),
                                 hoverinfo="skip", showlegend=True), 1, panel + 1)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_layout(template="plotly_white", height=400, plot_bgcolor="#9ca3af", margin=dict(l=40, r=20, t=70, b=40),
                      title=dict(text=title, x=0.01, font=dict(size=14)),
                      legend=dict(orientation="h", yanchor="top", y=-0.16, x=0))
    return fig


FASTER, SLOWER = "#1b7837", "#d6604d"


def speedup_figure(tokens: list[int], speedups: list[float], dense_ms: list[float], sparse_ms: list[float],
                   title: str = "2:4 prefill speed-up vs dense"):
    """Speed-up (dense time / 2:4 time) against prompt length, log-scaled; the 1.0× line marks
    where 2:4 stops being slower. Green points are faster than dense, red ones slower."""
    fig = go.Figure()
    fig.add_hline(y=1.0, line=dict(color="#555", dash="dash"), annotation_text="1.0× = dense speed",
                  annotation_position="bottom right")
    fig.add_trace(go.Scatter(
        x=tokens, y=speedups, mode="lines+markers+text", line=dict(color="#888", width=1.5),
        marker=dict(size=11, color=[FASTER if s >= 1 else SLOWER for s in speedups]),
        text=[f"{s:.2f}×" for s in speedups], textposition="top center", cliponaxis=False,
        customdata=list(zip(dense_ms, sparse_ms)), showlegend=False,
        hovertemplate="%{x} tokens: %{y:.2f}×<br>dense %{customdata[0]:.2f} ms, 2:4 %{customdata[1]:.2f} ms<extra></extra>"))
    top = max([1.2] + [s * 1.2 for s in speedups])
    low = min([0.8] + [s * 0.8 for s in speedups])
    fig.update_xaxes(type="log", title_text="prompt length (tokens)", tickvals=tokens, ticktext=[str(t) for t in tokens])
    fig.update_yaxes(title_text="speed-up (× dense)", range=[low, top])
    fig.update_layout(template="plotly_white", height=320, margin=dict(l=50, r=20, t=50, b=45),
                      title=dict(text=title, x=0.01, font=dict(size=14)))
    return fig
