"""2:4 masks: extract (top-2 |W| per group), apply to the original weights, verify, pack.

A mask is a bool tensor shaped like its weight. The pruned model is always W0 * mask unless a
method (SparseGPT) provides updated weights, which must still be zero where the mask is."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from proxsparse_core.errors import UserError
from proxsparse_core.sparsity import masks_native
from proxsparse_core.sparsity.prunable import PrunableSet
from proxsparse_core.sparsity.scores import ranking


def mask_2to4(w: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
    """Exactly 2 kept per group of 4: the two largest scores (|w| by default). Ties are broken
    deterministically in favour of the lower index, as a stable descending sort would.

    Six pairwise comparisons per group instead of a sort: about ten times faster on a CPU, which
    matters when the learner reads the mask of a whole model every few steps."""
    s = (w.abs() if score is None else score).float().reshape(-1, 4)
    if bool(torch.isnan(s).any()):      # NaN ranks highest in a sort; keep that rule exactly
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :2]
        return torch.zeros_like(s, dtype=torch.bool).scatter_(1, order, True).view(w.shape)
    cols = s.unbind(1)
    beaten = torch.zeros(s.shape, dtype=torch.uint8, device=s.device)   # how many in the group rank higher
    for i in range(4):
        for j in range(i + 1, 4):
            j_wins = cols[j] > cols[i]          # on a tie the lower index i ranks higher
            beaten[:, i] += j_wins
            beaten[:, j] += ~j_wins
    return (beaten < 2).view(w.shape)


@torch.no_grad()
def extract_masks(prunable: PrunableSet, cols: dict | None = None) -> dict[str, torch.Tensor]:
    """Masks from the current (learned) weights of every prunable layer, on the CPU: top-2 |W|, or
    with `cols` (layer name → weight per input channel, scores.channel_weights) top-2 |W|·a.
    Float32 and bfloat16 CPU weights are read in one pass each (masks_native), anything else with
    mask_2to4; both give the same masks."""
    out = {}
    for n in prunable.names:
        w = prunable.modules[n].weight.detach()
        a = None if cols is None else cols[n]
        if masks_native.supports(w, a):
            out[n] = masks_native.mask_(w, a)
        else:
            out[n] = mask_2to4(w, ranking(w, a)).cpu()
    return out


@torch.no_grad()
def clean_and_count(weights: dict) -> torch.Tensor:
    """Set every non-finite weight to 0 in place and count the groups with 0..4 non-zeros over all
    `weights` (name → tensor): int64 [5], on the CPU."""
    hist = torch.zeros(5, dtype=torch.int64)
    for w in weights.values():
        w = w.detach()
        if masks_native.supports(w):
            masks_native.count_(w, hist, clean=True)
        else:
            torch.nan_to_num_(w, nan=0.0, posinf=0.0, neginf=0.0)
            hist += nnz_histogram(w).cpu()
    return hist


def same_masks(a: dict, b: dict) -> bool:
    """True when two results hold one 2:4 pattern: the same layers, every mask equal (e.g. a recovered
    result and the mask it recovered, whatever their names)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(prunable: PrunableSet) -> dict[str, torch.Tensor]:
    """A CPU copy of the prunable weights (the original W0 before learning changes them)."""
    return {n: prunable.modules[n].weight.detach().to("cpu", copy=True) for n in prunable.names}


def pruned_weights(originals: dict, masks: dict) -> dict[str, torch.Tensor]:
    return {n: originals[n] * masks[n].to(originals[n].dtype) for n in masks}


@torch.no_grad()
def load_weights(prunable: PrunableSet, weights: dict) -> None:
    for n, w in weights.items():
        prunable.modules[n].weight.data.copy_(w)


@contextlib.contextmanager
def swapped(prunable: PrunableSet, weights: dict, originals: dict):
    """Temporarily run the model with `weights` in the prunable layers; restore `originals`."""
    load_weights(prunable, weights)
    try:
        yield
    finally:
        load_weights(prunable, originals)


@contextlib.contextmanager
def masked(prunable: PrunableSet, masks: dict, originals: dict):
    """Temporarily run the model with W0 · mask in the layers of `masks` (exactly the weights
    pruned_weights(originals, masks) gives), written in place without a copy of the model; restore
    `originals` however the block ends."""
    try:
        with torch.no_grad():
            for n, m in masks.items():
                w = prunable.modules[n].weight.data
                o = originals[n]
                if w.device == o.device and w.dtype == o.dtype and w.shape == o.shape:
                    torch.mul(o, m.to(w.device), out=w)
                else:
                    w.copy_(o)
                    w.mul_(m.to(w.device, w.dtype))
        yield
    finally:
        load_weights(prunable, originals)


def nnz_histogram(w: torch.Tensor) -> torch.Tensor:
    """Count of groups with 0..4 non-zeros (length-5 int64 tensor, on w's device)."""
    return ((w.detach().reshape(-1, 4) != 0).sum(1)).bincount(minlength=5)


@dataclass
class Verification:
    ok: bool
    groups: int
    bad_groups: int            # groups with more than 2 non-zeros
    changed_survivors: int     # kept weights that differ from W0 (0 unless weights were updated)
    problems: list[str] = field(default_factory=list)
    updated: bool = False      # the survivors were allowed to differ from W0 (SparseGPT, recovery)

    def __str__(self):
        if self.ok and self.updated:
            return (f"verified: all {self.groups:,} groups are 2:4 and every pruned weight is zero "
                    f"(survivors updated, not W0)")
        if self.ok:
            return f"verified: all {self.groups:,} groups are 2:4 and every survivor equals W0"
        return "NOT verified: " + "; ".join(self.problems)


@torch.no_grad()
def verify(prunable: PrunableSet, masks: dict, originals: dict, updated_ok: bool = False) -> Verification:
    """Check the model's current prunable weights: every group has ≤ 2 non-zeros, pruned
    positions are zero, every weight is finite, and survivors equal W0 exactly (unless
    `updated_ok`, for SparseGPT). Each weight is read where it lies, in one pass (masks_native) for
    float32 and bfloat16 CPU weights."""
    groups = bad = changed = 0
    problems = []
    for n in prunable.names:
        w = prunable.modules[n].weight.detach()
        m = masks[n]
        groups += w.numel() // 4
        o = None if updated_ok else originals[n]
        if masks_native.check_supports(w, m, o):
            b, pruned, nonfinite, c = masks_native.check(w, m, o)
        else:
            b, pruned, nonfinite, c = _check_torch(w, m, o)
        if b:
            bad += b
            problems.append(f"{n}: {b} groups with > 2 non-zeros")
        if pruned:
            problems.append(f"{n}: pruned positions are not zero")
        if nonfinite:
            problems.append(f"{n}: {nonfinite} weights are NaN or infinite")
        if c:
            changed += c
            problems.append(f"{n}: {c} survivors differ from W0")
    return Verification(not problems, groups, bad, changed, problems, updated_ok)


def _check_torch(w: torch.Tensor, m: torch.Tensor, original: torch.Tensor | None) -> tuple[int, int, int, int]:
    """masks_native.check's counts with PyTorch, on the weight's own device."""
    m = m.to(w.device)
    nz = w != 0
    bad = int((nz.reshape(-1, 4).sum(1) > 2).sum())
    pruned = int((nz & ~m).sum())
    nonfinite = int((~torch.isfinite(w)).sum()) if w.is_floating_point() else 0
    changed = 0 if original is None else int(((w != original.to(w.device)) & m).sum())
    return bad, pruned, nonfinite, changed


def shapes_mismatch(masks: dict, layers: dict) -> str | None:
    """How mask shapes (name → shape) fail to fit a model's prunable layers (name → weight shape),
    as one line, or None when they fit: the same layers, each mask shaped like its weight."""
    differ = set(layers) ^ set(masks)
    if differ:
        return (f"the masks do not match this model ({len(differ)} layers differ, "
                f"e.g. {sorted(differ)[0]})")
    for n in layers:
        if tuple(masks[n]) != tuple(layers[n]):
            return (f"the masks do not match this model: the mask of {n} has shape "
                    f"{tuple(masks[n])}, the layer {tuple(layers[n])}")
    return None


def layer_shapes(prunable: PrunableSet) -> dict[str, tuple]:
    return {n: tuple(prunable.modules[n].weight.shape) for n in prunable.names}


def check_masks_match(prunable: PrunableSet, masks: dict) -> None:
    """The one check that a mask set fits a model: the same prunable layers, each mask shaped
    like its weight. UserError (one line) otherwise."""
    problem = shapes_mismatch({n: tuple(m.shape) for n, m in masks.items()}, layer_shapes(prunable))
    if problem:
        raise UserError(problem)


@torch.no_grad()
def apply_masks(prunable: PrunableSet, masks: dict) -> None:
    """W ← W · mask in place: on the original weights this gives exactly W0 · mask."""
    check_masks_match(prunable, masks)
    for n, m in masks.items():
        w = prunable.modules[n].weight
        w.data.mul_(m.to(w.device, w.dtype))


def mask_stats(masks: dict) -> dict:
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return {"layers": len(masks), "weights": total, "kept": kept,
            "sparsity": 1 - kept / total if total else 0.0}


def pack_masks(masks: dict) -> dict[str, np.ndarray]:
    """Bit-pack every mask (1 bit per weight, 16× smaller than fp16 weights)."""
    return {n: np.packbits(m.numpy().reshape(-1)) for n, m in masks.items()}


def unpack_masks(packed: dict, shapes: dict) -> dict[str, torch.Tensor]:
    """The bool masks of bit-packed bytes; each must be exactly ceil(prod(shape) / 8) bytes (a
    shorter row would otherwise be padded with zeros up to whatever its shape claims)."""
    out = {}
    for n, bits in packed.items():
        shape = tuple(int(d) for d in shapes[n])
        count = int(np.prod(shape, dtype=object))
        if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != -(-count // 8):
            raise ValueError(f"the mask of {n} is {bits.size} {bits.dtype} values; its shape {shape} "
                             f"needs {-(-count // 8)} bit-packed bytes")
        out[n] = torch.from_numpy(np.unpackbits(bits, count=count).astype(bool)).view(shape)
    return out
