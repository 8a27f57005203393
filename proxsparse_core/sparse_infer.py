"""2:4 inference on sparse tensor cores: convert a pruned model's linears and measure the speed-up.

A 2:4 mask only pays off at inference when the matrix products run on sparse tensor cores.
PyTorch reaches them through `torch.sparse.to_sparse_semi_structured` (fp16/bf16, CUDA compute
capability ≥ 8.0). On Hopper (H100/H200) only the cuSPARSELt backend works; the CUTLASS one
raises "Supported only on GPUs with compute capability 8.x" (measured), so we never force it.

Measured on an H200 (bench/RESULTS.md): sparse products are faster than dense only for large
token counts per product (prefill of long prompts, big batches). Each sparse call has a fixed
cost of about half a millisecond, so below roughly 2–4 K tokens, including one-token decoding,
the sparse model is *slower*. `speedup_report` says so next to the figures it measures.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

DTYPES = (torch.float16, torch.bfloat16)
MIN_ROWS = MIN_COLS = 16     # cuSPARSELt's shape granularity for fp16/bf16 weights


def status() -> tuple[bool, str]:
    """Can this machine run 2:4 sparse matrix products? (ok, reason)."""
    if not torch.cuda.is_available():
        return False, "2:4 sparse inference needs a CUDA GPU (compute capability 8.0 or newer); none here"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"this GPU has compute capability {major}.{minor}; sparse tensor cores need 8.0 or newer"
    if major >= 9 and not torch.backends.cusparselt.is_available():
        return False, "this PyTorch build has no cuSPARSELt, which Hopper and newer GPUs need for 2:4 products"
    return True, f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"


def convertible(weight: torch.Tensor) -> bool:
    out_f, in_f = weight.shape
    return (weight.is_cuda and weight.dtype in DTYPES and out_f % MIN_ROWS == 0 and in_f % MIN_COLS == 0)


def _semi_structured(weight: torch.Tensor) -> torch.Tensor:
    from torch.sparse import to_sparse_semi_structured
    return to_sparse_semi_structured(weight.detach().contiguous())


@torch.no_grad()
def sparsify_(prunable) -> tuple[list[str], list[str]]:
    """Replace each prunable linear's (already 2:4) weight by a semi-structured sparse tensor, in
    place. Returns (converted names, skipped names). Only for inference: the model cannot be
    trained or have its weights swapped afterwards; reload it for that."""
    done, skipped = [], []
    for name in prunable.names:
        lin = prunable.modules[name]
        w = lin.weight
        if not convertible(w) or int(((w.reshape(-1, 4) != 0).sum(1) > 2).sum()):
            skipped.append(name)
            continue
        lin.weight = torch.nn.Parameter(_semi_structured(w), requires_grad=False)
        done.append(name)
    return done, skipped


@torch.no_grad()
def relative_error(weight: torch.Tensor, x: torch.Tensor) -> float:
    """‖sparse(x) − dense(x)‖ / ‖dense(x)‖ for a 2:4 weight and inputs x [tokens, in]."""
    dense = torch.nn.functional.linear(x, weight).float()
    sparse = torch.nn.functional.linear(x, _semi_structured(weight)).float()
    return float((sparse - dense).norm() / dense.norm().clamp_min(1e-30))


def random_24_weight(out_f: int, in_f: int, dtype=torch.bfloat16, device="cuda", seed: int = 0) -> torch.Tensor:
    """A random weight with exactly 2 of every 4 kept (top-2 |w|), for timing and checks."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out_f, in_f, device=device, dtype=torch.float32, generator=g) * 0.02
    groups = w.view(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).view(out_f, in_f).to(dtype)


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


@dataclass
class Timing:
    out_f: int
    in_f: int
    tokens: int
    dense_ms: float
    sparse_ms: float
    rel_error: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


@torch.no_grad()
def time_linear(out_f: int, in_f: int, tokens: int, dtype=torch.bfloat16, reps: int = 20) -> Timing:
    """Dense vs 2:4 sparse time of one product y = x Wᵀ with x [tokens, in_f] (a prefill matmul)."""
    w = random_24_weight(out_f, in_f, dtype)
    ws = _semi_structured(w)
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
    f = torch.nn.functional.linear
    dense_ms = median_ms(lambda: f(x, w), reps)
    sparse_ms = median_ms(lambda: f(x, ws), reps)
    dense, sparse = f(x, w).float(), f(x, ws).float()
    err = float((sparse - dense).norm() / dense.norm().clamp_min(1e-30))
    return Timing(out_f, in_f, tokens, dense_ms, sparse_ms, err)


def layer_shapes(prunable) -> list[tuple[int, int]]:
    """The distinct (out, in) shapes of a model's prunable linears, largest first."""
    shapes = {tuple(prunable.modules[n].weight.shape) for n in prunable.names}
    return sorted(shapes, key=lambda s: -s[0] * s[1])


def speedup_report(prunable=None, shapes=None, token_counts=(256, 2048, 8192, 16384),
                   dtype=torch.bfloat16, reps: int = 20) -> tuple[list[Timing], str]:
    """Measure dense vs 2:4 products on this GPU for a model's layer shapes (or given shapes) at
    several prefill token counts. Returns the timings and a plain-language summary for the app."""
    ok, why = status()
    if not ok:
        return [], why + ". The learned mask is still valid; the speed-up needs such a GPU."
    if shapes is None:
        shapes = [s for s in layer_shapes(prunable) if s[0] % MIN_ROWS == 0 and s[1] % MIN_COLS == 0]
    rows = [time_linear(o, i, t, dtype, reps) for (o, i) in shapes for t in token_counts]
    lines = [f"2:4 sparse vs dense matrix products on {why}:"]
    for t in token_counts:
        sel = [r for r in rows if r.tokens == t]
        dense, sparse = sum(r.dense_ms for r in sel), sum(r.sparse_ms for r in sel)
        lines.append(f"  {t:>6} tokens per product: dense {dense:.3f} ms, 2:4 {sparse:.3f} ms "
                     f"→ {dense / sparse:.2f}× ({'faster' if dense > sparse else 'SLOWER'})")
    lines.append("Sparse products have a fixed cost per call, so short prompts, small batches and "
                 "token-by-token generation are not faster (often slower); the gain shows on long "
                 "prefills and large batches.")
    return rows, "\n".join(lines)
