"""Triton kernels for the CUDA learning step: the 2:4 prox and the λ2 frozen-weight gradient.

Imported only when CUDA and Triton exist (prox.py and learner.py check). Both kernels are one pass
over memory: every value is read once and written once, in the weight's own dtype (bf16 on GPUs),
with all arithmetic in float32 registers.

The prox kernel gives each program BLOCK groups of 4; per group it does exactly what the C kernel
does (prox_native.py): skip groups that already have ≤ 2 non-zeros, sort |z| by a 5-comparator
network, Gauss-Seidel sweeps of keep-3 and keep-4 where a group that has converged (its sweep
moved nothing by more than tol·max|z|) is frozen while its neighbours go on, the best of
keep-2/3/4 (for bf16/fp16 weights: of keep-2 and every rounding of keep-3 and keep-4 to the
weight's dtype, see prox.py), order and signs restored. The block's loop ends when all its groups
have converged. It also counts the result's groups with 0..4 non-zeros, which the learner reports
every step.

It is launched with enable_fp_fusion=False: Triton would otherwise contract a·b + c into fused
multiply-adds (about 50 in this kernel), which round differently from the C kernel and the PyTorch
schedule; near a tie between keep-3 and keep-4 that one-ulp difference flips the choice and the
results differ by far more than an ulp (9.6e-6 on a 576×1536 float32 matrix, measured on an H200).
Without contraction every operation is rounded as written and the three paths are bit-identical.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def _cswap(ap, aq, ip, iq):
    s = ap < aq
    return tl.where(s, aq, ap), tl.where(s, ap, aq), tl.where(s, iq, ip), tl.where(s, ip, iq)


@triton.jit
def _place(w1, w2, w3, w4, i1, i2, i3, i4, j):
    """The magnitude that goes back to original position j."""
    m = tl.where(i1 == j, w1, 0.0)
    m = tl.where(i2 == j, w2, m)
    m = tl.where(i3 == j, w3, m)
    return tl.where(i4 == j, w4, m)


@triton.jit
def _put(ptr, zj, m, mask):
    """Store magnitude m with the sign of zj (0 stays 0); returns 1 where the result is non-zero."""
    out = tl.where(zj > 0, m, tl.where(zj < 0, -m, 0.0)).to(ptr.dtype.element_ty)
    tl.store(ptr, out, mask=mask)
    return (out != 0).to(tl.int32)


@triton.jit
def _grid_lo(x, GRID: tl.constexpr):
    """Largest bf16 (GRID 1) or fp16 (GRID 2) value ≤ x, for float32 x ≥ 0, as float32."""
    u = x.to(tl.uint32, bitcast=True)
    if GRID == 1:
        lo = ((u >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        lo = ((u >> 13) << 13).to(tl.float32, bitcast=True)
        sub = (x * 16777216.0).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08   # 2^-24 steps
        lo = tl.where(x < 6.103515625e-05, sub, lo)
    return lo


@triton.jit
def _grid_hi(lo, x, GRID: tl.constexpr):
    """The next grid value above lo, or lo itself when x is on the grid."""
    if GRID == 1:
        hi = (lo.to(tl.uint32, bitcast=True) + 65536).to(tl.float32, bitcast=True)
    else:
        hi = (lo.to(tl.uint32, bitcast=True) + 8192).to(tl.float32, bitcast=True)
        hi = tl.where(lo < 6.103515625e-05, lo + 5.9604644775390625e-08, hi)
    return tl.where(lo == x, lo, hi)


@triton.jit
def _obj3(w1, w2, w3, a1, a2, a3, a4, lam):
    return 0.5 * ((w1 - a1) * (w1 - a1) + (w2 - a2) * (w2 - a2) + (w3 - a3) * (w3 - a3) + a4 * a4) \
        + lam * (w1 * w2 * w3)


@triton.jit
def _obj4(w1, w2, w3, w4, a1, a2, a3, a4, lam):
    return 0.5 * ((w1 - a1) * (w1 - a1) + (w2 - a2) * (w2 - a2) + (w3 - a3) * (w3 - a3) + (w4 - a4) * (w4 - a4)) \
        + lam * (w1 * w2 * (w3 + w4) + w3 * w4 * (w1 + w2))


@triton.jit
def _prox_kernel(w_ptr, hist_ptr, n_groups, lam, tol, max_sweeps, BLOCK: tl.constexpr, GRID: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = g < n_groups
    p = w_ptr + 4 * g
    z1 = tl.load(p, mask=inb, other=0.0).to(tl.float32)
    z2 = tl.load(p + 1, mask=inb, other=0.0).to(tl.float32)
    z3 = tl.load(p + 2, mask=inb, other=0.0).to(tl.float32)
    z4 = tl.load(p + 3, mask=inb, other=0.0).to(tl.float32)
    a1, a2, a3, a4 = tl.abs(z1), tl.abs(z2), tl.abs(z3), tl.abs(z4)
    i1 = tl.zeros([BLOCK], tl.int32)
    i2, i3, i4 = i1 + 1, i1 + 2, i1 + 3
    a1, a2, i1, i2 = _cswap(a1, a2, i1, i2)
    a3, a4, i3, i4 = _cswap(a3, a4, i3, i4)
    a1, a3, i1, i3 = _cswap(a1, a3, i1, i3)
    a2, a4, i2, i4 = _cswap(a2, a4, i2, i4)
    a2, a3, i2, i3 = _cswap(a2, a3, i2, i3)
    active = a3 > 0                      # ≤ 2 non-zeros: already its own prox
    u1, u2, u3 = a1, a2, a3
    v1, v2, v3, v4 = a1, a2, a3, a4
    s = 0
    while (s < max_sweeps) & (tl.max(active.to(tl.int32), 0) > 0):
        n1 = tl.maximum(a1 - lam * (u2 * u3), 0.0)
        n2 = tl.maximum(a2 - lam * (n1 * u3), 0.0)
        n3 = tl.maximum(a3 - lam * (n1 * n2), 0.0)
        m1 = tl.maximum(a1 - lam * (v2 * v3 + v2 * v4 + v3 * v4), 0.0)
        m2 = tl.maximum(a2 - lam * (m1 * v3 + m1 * v4 + v3 * v4), 0.0)
        m3 = tl.maximum(a3 - lam * (m1 * m2 + m1 * v4 + m2 * v4), 0.0)
        m4 = tl.maximum(a4 - lam * (m1 * m2 + m1 * m3 + m2 * m3), 0.0)
        d = tl.maximum(tl.maximum(tl.abs(n1 - u1), tl.abs(n2 - u2)), tl.abs(n3 - u3))
        d = tl.maximum(d, tl.maximum(tl.maximum(tl.abs(m1 - v1), tl.abs(m2 - v2)),
                                     tl.maximum(tl.abs(m3 - v3), tl.abs(m4 - v4))))
        u1, u2, u3 = tl.where(active, n1, u1), tl.where(active, n2, u2), tl.where(active, n3, u3)
        v1, v2 = tl.where(active, m1, v1), tl.where(active, m2, v2)
        v3, v4 = tl.where(active, m3, v3), tl.where(active, m4, v4)
        active = active & (d > tol * a1)
        s += 1
    # the best candidate, in the C kernel's order; a later one must be strictly better
    zero = tl.zeros([BLOCK], tl.float32)
    best = 0.5 * (a3 * a3 + a4 * a4)
    w1, w2, w3, w4 = a1, a2, zero, zero
    if GRID == 0:
        o = _obj3(u1, u2, u3, a1, a2, a3, a4, lam)
        t = o < best
        best = tl.where(t, o, best)
        w1, w2, w3 = tl.where(t, u1, w1), tl.where(t, u2, w2), tl.where(t, u3, w3)
        o = _obj4(v1, v2, v3, v4, a1, a2, a3, a4, lam)
        t = o < best
        w1, w2, w3, w4 = tl.where(t, v1, w1), tl.where(t, v2, w2), tl.where(t, v3, w3), tl.where(t, v4, w4)
    else:
        # every rounding down/up of keep-3's, then keep-4's coordinates; (x - a)² computed once
        l1, l2, l3 = _grid_lo(u1, GRID), _grid_lo(u2, GRID), _grid_lo(u3, GRID)
        h1, h2, h3 = _grid_hi(l1, u1, GRID), _grid_hi(l2, u2, GRID), _grid_hi(l3, u3, GRID)
        dl1, dl2, dl3 = (l1 - a1) * (l1 - a1), (l2 - a2) * (l2 - a2), (l3 - a3) * (l3 - a3)
        dh1, dh2, dh3 = (h1 - a1) * (h1 - a1), (h2 - a2) * (h2 - a2), (h3 - a3) * (h3 - a3)
        for c in tl.static_range(8):
            x1, d1 = (h1, dh1) if c % 2 == 1 else (l1, dl1)
            x2, d2 = (h2, dh2) if (c // 2) % 2 == 1 else (l2, dl2)
            x3, d3 = (h3, dh3) if (c // 4) % 2 == 1 else (l3, dl3)
            o = 0.5 * (d1 + d2 + d3 + a4 * a4) + lam * (x1 * x2 * x3)
            t = o < best
            best = tl.where(t, o, best)
            w1, w2, w3, w4 = tl.where(t, x1, w1), tl.where(t, x2, w2), tl.where(t, x3, w3), tl.where(t, zero, w4)
        l1, l2, l3, l4 = _grid_lo(v1, GRID), _grid_lo(v2, GRID), _grid_lo(v3, GRID), _grid_lo(v4, GRID)
        h1, h2 = _grid_hi(l1, v1, GRID), _grid_hi(l2, v2, GRID)
        h3, h4 = _grid_hi(l3, v3, GRID), _grid_hi(l4, v4, GRID)
        dl1, dl2, dl3, dl4 = (l1 - a1) * (l1 - a1), (l2 - a2) * (l2 - a2), (l3 - a3) * (l3 - a3), (l4 - a4) * (l4 - a4)
        dh1, dh2, dh3, dh4 = (h1 - a1) * (h1 - a1), (h2 - a2) * (h2 - a2), (h3 - a3) * (h3 - a3), (h4 - a4) * (h4 - a4)
        for c in tl.static_range(16):
            x1, d1 = (h1, dh1) if c % 2 == 1 else (l1, dl1)
            x2, d2 = (h2, dh2) if (c // 2) % 2 == 1 else (l2, dl2)
            x3, d3 = (h3, dh3) if (c // 4) % 2 == 1 else (l3, dl3)
            x4, d4 = (h4, dh4) if (c // 8) % 2 == 1 else (l4, dl4)
            o = 0.5 * (d1 + d2 + d3 + d4) + lam * (x1 * x2 * (x3 + x4) + x3 * x4 * (x1 + x2))
            t = o < best
            best = tl.where(t, o, best)
            w1, w2, w3, w4 = tl.where(t, x1, w1), tl.where(t, x2, w2), tl.where(t, x3, w3), tl.where(t, x4, w4)
    changed = inb & (a3 > 0)             # untouched groups are not written back
    nz = _put(p, z1, _place(w1, w2, w3, w4, i1, i2, i3, i4, 0), changed)
    nz += _put(p + 1, z2, _place(w1, w2, w3, w4, i1, i2, i3, i4, 1), changed)
    nz += _put(p + 2, z3, _place(w1, w2, w3, w4, i1, i2, i3, i4, 2), changed)
    nz += _put(p + 3, z4, _place(w1, w2, w3, w4, i1, i2, i3, i4, 3), changed)
    for k in tl.static_range(5):
        tl.atomic_add(hist_ptr + k, tl.sum(((nz == k) & inb).to(tl.int32), 0))


GRIDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def supports(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float32, torch.bfloat16, torch.float16) and t.is_contiguous()


def prox_(groups: torch.Tensor, lam: float, tol: float, max_sweeps: int,
          hist: torch.Tensor | None = None) -> torch.Tensor:
    """In place on a contiguous CUDA tensor of shape [G, 4]; adds the non-zero counts of the
    result to `hist` (int64 [5] on the same device) when given. No host synchronisation."""
    n = groups.numel() // 4
    counts = torch.zeros(5, dtype=torch.int32, device=groups.device)
    if n:
        # the tensor's own GPU (models split over GPUs); no context on the CPU (TRITON_INTERPRET=1)
        with torch.cuda.device(groups.device) if groups.is_cuda else contextlib.nullcontext():
            _prox_kernel[(triton.cdiv(n, BLOCK),)](groups, counts, n, float(lam), float(tol),
                                                   int(max_sweeps), BLOCK=BLOCK, GRID=GRIDS[groups.dtype],
                                                   enable_fp_fusion=False)
    if hist is not None:
        hist += counts.to(hist.device)
    return groups


@triton.jit
def _frozen_kernel(w_ptr, w0_ptr, g_ptr, sum_ptr, n, two_lam2, eps, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    w = tl.load(w_ptr + o, mask=m, other=0.0).to(tl.float32)
    r = tl.load(w0_ptr + o, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + o, mask=m, other=0.0).to(tl.float32)
    d = tl.abs(r) + eps
    u = w * (w - r) / d
    tl.atomic_add(sum_ptr, tl.sum(u * u, 0))
    g += two_lam2 * u * (2.0 * w - r) / d
    tl.store(g_ptr + o, g.to(g_ptr.dtype.element_ty), mask=m)


def frozen_grad_(w: torch.Tensor, w0: torch.Tensor, grad: torch.Tensor, lam2: float, eps: float,
                 total: torch.Tensor) -> None:
    """grad += ∂/∂W of λ2·Σ(W·(W−W0)/(|W0|+ε))², and total (float32 [1]) += Σ(...)², in one pass."""
    n = w.numel()
    with torch.cuda.device(w.device) if w.is_cuda else contextlib.nullcontext():
        _frozen_kernel[(triton.cdiv(n, 1024),)](w, w0, grad, total, n, 2.0 * lam2, float(eps), BLOCK=1024)


def frozen_supports(w: torch.Tensor, w0: torch.Tensor, grad: torch.Tensor | None) -> bool:
    return (grad is not None and w.is_cuda and w0.device == w.device == grad.device
            and w.is_contiguous() and w0.is_contiguous() and grad.is_contiguous())
