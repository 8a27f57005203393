"""How 2:4 works: the prox on one group of four weights, a real weight block before and after
pruning, and why the pattern can run faster on sparse tensor cores. Pictures over prose.

The numbers all come from `proxsparse_core` (prox_groups, objective, mask_2to4); this module
only arranges them. The weight block is read straight from the bundled model's safetensors
file, so the tab works without loading the model and while a run is learning; once a mask has
been learned, the layers are those of the model it was learned for (its W0, kept by the
workspace), with the learned mask next to magnitude's.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import torch

from proxsparse_core.errors import UserError
from proxsparse_core.sparsity.masks import mask_2to4
from proxsparse_core.models.loading import bundled_folder
from proxsparse_core.method.prox import objective, prox_groups
from proxsparse_core.results import LEARNED, method_of

from . import inputs
from .feedback import from_page, guarded
from .figures import prox_group_figure, weight_block_figure
from .jobs import JobManager, off_thread

BLOCK_ROWS, BLOCK_COLS = 16, 32
DEFAULT_GROUP = (0.9, -0.7, 0.5, 0.3)
Z_RANGE = (-1.5, 1.5)        # the sliders' ranges, which the handler also enforces for API calls
LAMBDA_RANGE = (0.0, 5.0)
LAMBDA_STEP = 0.05
PATH_POINTS = 101            # λ values on the "prox output as λ grows" curve, over the slider's range


def prox_one(z: torch.Tensor, lam: float) -> torch.Tensor:
    """The prox of one group z ([1, 4]), with ties settled by position: where weights have the same
    |z|, the largest outputs go to the first of them. The prox treats equal weights alike, so any
    order of their outputs is an equally good answer; which one the solver returns can change from
    one λ to the next, and the path of four equal weights zigzagged between them. Settled this way,
    a weight once at zero stays there as λ grows, and w1 ≥ w2 ≥ … among equals."""
    w = prox_groups(z, lam, mode="reference")
    if lam == 0:
        return w
    mags, out = z[0].abs().tolist(), w.clone()
    for level in set(mags):
        tied = [i for i, m in enumerate(mags) if m == level]
        if len(tied) > 1:
            sizes = sorted((abs(float(w[0, i])) for i in tied), reverse=True)
            for i, size in zip(tied, sizes):
                out[0, i] = size if float(z[0, i]) >= 0 else -size
    return out


def kept_by_mask(w: torch.Tensor) -> list[bool]:
    """The 2:4 mask of one group: its two largest |w|, the first of equals before the later ones."""
    order = sorted(range(4), key=lambda i: (-abs(float(w[0, i])), i))
    return [i in order[:2] for i in range(4)]


def lambda_reaching_2to4(z: tuple, lo: float = LAMBDA_RANGE[0], hi: float = LAMBDA_RANGE[1]) -> float | None:
    """The smallest λ on the slider's grid at which the prox of group `z` is 2:4 (None if none)."""
    group = torch.tensor([list(z)], dtype=torch.float32)
    for i in range(int(round((hi - lo) / LAMBDA_STEP)) + 1):
        lam = round(lo + i * LAMBDA_STEP, 10)
        if int((prox_one(group, lam) != 0).sum()) <= 2:
            return lam
    return None


DEFAULT_LAMBDA = lambda_reaching_2to4(DEFAULT_GROUP)     # the tab opens on a group that has just become 2:4


# ---------------------------------------------------------------------------- the prox on one group

def prox_demo(z1, z2, z3, z4, lam) -> tuple:
    """Figure and summary of prox_{λR}(z) for one group z."""
    lam = inputs.number("λ (regulariser strength)", lam, *LAMBDA_RANGE)
    z = torch.tensor([[inputs.number(f"w{i + 1}", v, *Z_RANGE) for i, v in enumerate((z1, z2, z3, z4))]])
    w = prox_one(z, lam)            # one group: the published schedule is instant
    kept = kept_by_mask(w)
    lo, hi = LAMBDA_RANGE
    lambdas = [lo + (hi - lo) * i / (PATH_POINTS - 1) for i in range(PATH_POINTS)]
    path = [prox_one(z, lm)[0].tolist() for lm in lambdas]
    fig = prox_group_figure(z[0].tolist(), w[0].tolist(), kept, lambdas, path, lam)
    nnz = int((w != 0).sum())
    costs = {"keep all four as they are": float(objective(z, z, lam)),
             "zero the two smallest": float(objective(z * mask_2to4(z), z, lam)),
             "the prox output": float(objective(w, z, lam))}
    survivors = ", ".join(f"w{i + 1}" for i, k in enumerate(kept) if k)
    dropped = [i for i, k in enumerate(kept) if not k]
    gone = ", ".join(f"w{i + 1}" for i in dropped)
    if all(float(w[0, i]) == 0 for i in dropped):
        fate = f"{gone} are exactly zero already: the prox removed them, nothing is left for the mask to drop"
    else:
        fate = f"the red bars ({gone}) are dropped by the mask"
    reach = lambda_reaching_2to4(tuple(z[0].tolist()))
    where = (f" This group becomes 2:4 from λ = **{reach:.2f}**." if reach is not None
             else " No λ on the slider makes this group 2:4 in one step.")
    verdict = ("**already 2:4** — the regulariser is zero" if nnz <= 2
               else f"{nnz} non-zeros — not 2:4 yet; a larger λ (or more steps) pushes it there")
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in costs.items())
    text = (f"**Prox output** w = ({', '.join(f'{v:+.3f}' for v in w[0].tolist())}) → {verdict}.{where}\n\n"
            f"The mask keeps the two largest |w|: **{survivors}** (green); {fate}.\n\n"
            f"| candidate | ½‖w − z‖² + λ·R(w) |\n|---|---|\n{rows}\n\n"
            f"The prox finds the lowest cost: it trades moving the weights (first term) against the 2:4 "
            f"penalty R(w) = |w1w2w3| + |w1w2w4| + |w1w3w4| + |w2w3w4|, which is zero only when at most "
            f"two weights are non-zero.")
    return fig, text


# ---------------------------------------------------------------------------- a real weight block

def _weight_files() -> list[Path]:
    files = sorted(bundled_folder().glob("*.safetensors"))
    if not files:
        raise UserError("the bundled model's safetensors files are missing; load the model once")
    return files


def _learned(jobs: JobManager | None):
    """(masks, W0) of the learned result on the loaded model, or None before any run."""
    if jobs is None:
        return None
    ws = jobs.ws
    name = jobs.default_result()         # the newest learned mask
    result = ws.results.get(name) if name is not None and method_of(name) == LEARNED else None
    if result is None or ws.originals is None:
        return None
    return result.masks, ws.originals


def layer_choices(jobs: JobManager | None = None) -> list[str]:
    """2-D weights inside the decoder blocks whose input dim is divisible by 4: of the model a mask
    was learned for, else of the bundled model."""
    learned = _learned(jobs)
    if learned is not None:
        return [f"{n}.weight" for n in learned[1]]
    from safetensors import safe_open

    names = []
    for path in _weight_files():
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                if ".layers." in k and k.endswith(".weight") and len(shape) == 2 and shape[1] % 4 == 0:
                    names.append(k)
    return sorted(names, key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])


def _read(name: str, jobs: JobManager | None = None) -> torch.Tensor:
    learned = _learned(jobs)
    if learned is not None:
        w0 = learned[1].get(name.removesuffix(".weight"))
        if w0 is None:
            raise UserError(f"no prunable layer named {name!r} in the loaded model")
        return w0.float()
    from safetensors import safe_open

    for path in _weight_files():
        with safe_open(str(path), "pt") as f:
            if name in f.keys():
                return f.get_tensor(name).float()
    raise UserError(f"no weight named {name!r} in the bundled model")


def _masked(block: torch.Tensor, mask: torch.Tensor) -> list[list[float | None]]:
    """The block with pruned positions as None (drawn as holes)."""
    keep = mask[:block.shape[0], :block.shape[1]]
    return [[v if k else None for v, k in zip(row, krow)] for row, krow in zip(block.tolist(), keep.tolist())]


def weight_block(jobs: JobManager, name: str) -> tuple:
    """Heatmaps of the top-left block of a real layer: original, magnitude 2:4 and, once a mask
    was learned, the learned ProxSparse mask on the same block, with the weights the two choose
    differently ringed and counted. Whole layers are read and masked: in a thread of its own
    (jobs.off_thread)."""
    return off_thread(_weight_block, jobs, name)


def _weight_block(jobs: JobManager, name: str) -> tuple:
    name = inputs.text("Layer", name)
    if not name:
        raise UserError("pick a layer")
    w = _read(name, jobs)
    block = w[:BLOCK_ROWS, :BLOCK_COLS]
    magnitude = mask_2to4(w)
    panels = [("original", block.tolist()),
              ("magnitude 2:4 (keep the 2 largest |w|)", _masked(block, magnitude))]
    rows, cols = block.shape
    text = (f"`{name}` is {w.shape[0]} × {w.shape[1]}; shown: its top-left {rows} × {cols} block. "
            f"Every row is cut into groups of 4 inputs (thin lines); each group keeps exactly 2 weights, "
            f"so half of the weights become exact zeros (grey).")
    learned = _learned(jobs)
    marks = None
    if learned is not None:
        mask = learned[0][name.removesuffix(".weight")]
        panels.append(("ProxSparse learned mask", _masked(block, mask)))
        differ = mask != magnitude
        here = differ[:rows, :cols]
        cells = [(r, c) for r, c in here.nonzero().tolist()]
        marks = (2, cells, "chosen differently from magnitude")
        groups = float(differ.view(-1, 4).any(1).float().mean())
        layer_diff = int(differ.sum())
        text += (f"\n\n**On this block the two masks choose {len(cells)} of its {rows * cols} weights differently** "
                 f"({100 * len(cells) / (rows * cols):.1f}%, ringed): each group where they disagree swaps a weight "
                 f"magnitude keeps for one it drops. Over the whole layer: {layer_diff:,} of {w.numel():,} "
                 f"weights ({100 * float(differ.float().mean()):.1f}%), in {100 * groups:.1f}% of its groups")
        text += (" — the loss (and, with the presets' score \"activation\", how loud each input channel is: "
                 "|w|·‖x‖ instead of |w|) decided which weights matter, not |w| alone." if layer_diff else
                 ": here learning kept magnitude's choice (a short run, or a layer where |w| already decides).")
    else:
        text += "\n\nAfter a run, the learned mask appears here next to magnitude's, on the same block."
    return weight_block_figure(f"{name} — one block, before and after 2:4", panels, marks), text


def most_changed_layer(jobs: JobManager) -> str | None:
    """After a run: the layer whose learned mask differs most from magnitude's (share of groups)."""
    learned = _learned(jobs)
    if learned is None:
        return None
    masks, w0 = learned
    share = {n: float((masks[n] != mask_2to4(w0[n])).view(-1, 4).any(1).float().mean()) for n in masks if n in w0}
    return f"{max(share, key=share.get)}.weight" if share else None


def select_layer(jobs: JobManager, current: str | None) -> tuple:
    """The tab was opened: the layer list, and the chosen layer's block (at first, after a run, the
    layer where the learned mask differs most from magnitude's; else the first)."""
    choices = layer_choices(jobs)
    name = current if current in choices else (off_thread(most_changed_layer, jobs)
                                                or (choices[0] if choices else None))
    return (gr.update(choices=choices, value=name), *weight_block(jobs, name))


# ---------------------------------------------------------------------------- why 2:4 is fast

def _cells(values, cls) -> str:
    return "".join(f'<span class="ps-cell {cls(i, v)}">{v}</span>' for i, v in enumerate(values))


def tensor_core_html() -> str:
    dense = [".3", "0", "-.8", "0", "0", ".5", "0", "-.2"]
    kept = [i for i, v in enumerate(dense) if v != "0"]
    row = _cells(dense, lambda i, v: "ps-zero" if v == "0" else "ps-val")
    vals = _cells([dense[i] for i in kept], lambda i, v: "ps-val")
    meta = _cells([str(i % 4) for i in kept], lambda i, v: "ps-meta")
    return f"""
<div class="ps-diagram">
  <div><b>A 2:4 row</b> (8 weights = 2 groups of 4; at most 2 non-zeros per group)</div>
  <div class="ps-cells">{row}</div>
  <div class="ps-arrow">↓ stored compressed</div>
  <div class="ps-split"><div><b>values</b> (half the size)<div class="ps-cells">{vals}</div></div>
  <div><b>2-bit positions</b> (metadata)<div class="ps-cells">{meta}</div></div></div>
</div>
<ul class="ps-points">
<li><b>Half the math.</b> A sparse tensor core (NVIDIA Ampere, Ada, Hopper) reads the 2-bit positions,
picks the 2 matching inputs out of every 4, and does half the multiply-adds of a dense matmul:
up to 2× the peak throughput and about half the weight memory.</li>
<li><b>Why exactly 2 of 4.</b> The pattern is fixed and local, so the hardware never searches for
non-zeros; unstructured sparsity has no such shortcut and rarely runs faster on GPUs.</li>
<li><b>Honest numbers.</b> On Hopper GPUs PyTorch's <code>to_sparse_semi_structured</code> runs through
cuSPARSELt only. On 7B-sized layers it beats dense only for long prefills (many thousands of tokens
per matmul): each sparse call has a fixed cost, so for short prompts and one-token decoding it is
<i>slower</i> than dense. The measured figures are in <code>bench/RESULTS.md</code>.</li>
<li><b>In this app</b>, on a CPU, the 2:4 model is run as ordinary weights with zeros: it shows the
quality of the mask, not the speed-up (there are no sparse tensor cores on a CPU). On a GPU the
Compare tab's 2:4 answer runs through the studio's own packed 2:4 kernels, token by token, where they
were measured faster than dense, and says how many tokens per second each side decoded.</li>
</ul>"""


# ---------------------------------------------------------------------------- layout

def build_explain_tab(jobs: JobManager, tab: gr.Tab):
    gr.Markdown("### 1 · The proximal step on one group of four weights\n"
                "After every gradient step, ProxSparse moves each group of 4 weights to the point that "
                "balances *staying close* against *being 2:4*. Move the sliders.")
    with gr.Row():
        with gr.Column(scale=1, min_width=240):
            sliders = [gr.Slider(*Z_RANGE, v, step=0.05, label=f"w{i + 1}") for i, v in enumerate(DEFAULT_GROUP)]
            lam = gr.Slider(*LAMBDA_RANGE, DEFAULT_LAMBDA, step=LAMBDA_STEP, label="λ (regulariser strength)")
        with gr.Column(scale=3):
            fig0, text0 = prox_demo(*DEFAULT_GROUP, DEFAULT_LAMBDA)
            prox_plot = gr.Plot(fig0, show_label=False, elem_id="ps-prox")
            prox_text = gr.Markdown(text0, elem_id="ps-prox-text")
    gr.Markdown("### 2 · A real layer, before and after 2:4")
    with gr.Row():
        layer = gr.Dropdown([], label="Layer", allow_custom_value=True, scale=3,
                            info="of the bundled SmolLM2 model; after a run, of the model the mask was learned for")
        show = gr.Button("Show", scale=1)
    block_plot = gr.Plot(show_label=False, elem_id="ps-block")
    block_text = gr.Markdown(elem_id="ps-block-text")
    gr.Markdown("### 3 · Why 2:4 can run faster")
    gr.HTML(tensor_core_html())

    def on_prox(z1, z2, z3, z4, lam, evt: gr.EventData):
        return guarded(2)(prox_demo)(z1, z2, z3, z4, lam, page=from_page(evt))

    def on_block(name, evt: gr.EventData):
        return guarded(2)(weight_block)(jobs, name, page=from_page(evt))

    def on_select(current, evt: gr.EventData):
        return guarded(3)(select_layer)(jobs, current, page=from_page(evt))

    # inputs arrive as sent (preprocess=False) and are checked in prox_demo, so NaN or text from
    # an API client gets a message naming the slider
    gr.on([s.change for s in sliders + [lam]], on_prox, sliders + [lam], [prox_plot, prox_text],
          api_name="prox_demo", show_progress="hidden", concurrency_limit=4, trigger_mode="always_last",
          preprocess=False)
    layer.input(on_block, layer, [block_plot, block_text], api_visibility="private")
    show.click(on_block, layer, [block_plot, block_text], api_name="weight_block", preprocess=False)
    tab.select(on_select, layer, [layer, block_plot, block_text], api_visibility="private")
