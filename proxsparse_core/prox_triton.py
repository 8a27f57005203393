"""Triton kernels for the CUDA learning step: the 2:4 prox and the λ2 frozen-weight gradient.

Imported only when CUDA and Triton exist (prox.py and learner.py check). Both kernels are one pass
over memory: every value is read once and written once, in the weight's own dtype (bf16 on GPUs),
with all arithmetic in float32 registers.

The prox kernel gives each program BLOCK groups of 4; per group it does exactly what the C kernel
does (prox_native.py): skip groups that already have ≤ 2 non-zeros, sort |z| by a 5-comparator
network, Gauss-Seidel sweeps of keep-3 and keep-4 where a group that has converged (its sweep
moved nothing by more than tol·max|z|) is frozen while its neighbours go on, the best of
keep-2/3/4, order and signs restored. The block's loop ends when all its groups have converged.
It also counts the result's groups with 0..4 non-zeros, which the learner reports every step.
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
def _prox_kernel(w_ptr, hist_ptr, n_groups, lam, tol, max_sweeps, BLOCK: tl.constexpr):
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
    o2 = 0.5 * (a3 * a3 + a4 * a4)
    o3 = 0.5 * ((u1 - a1) * (u1 - a1) + (u2 - a2) * (u2 - a2) + (u3 - a3) * (u3 - a3) + a4 * a4) \
        + lam * (u1 * u2 * u3)
    o4 = 0.5 * ((v1 - a1) * (v1 - a1) + (v2 - a2) * (v2 - a2) + (v3 - a3) * (v3 - a3) + (v4 - a4) * (v4 - a4)) \
        + lam * (v1 * v2 * (v3 + v4) + v3 * v4 * (v1 + v2))
    t3 = o3 < o2
    t4 = o4 < tl.where(t3, o3, o2)
    w1 = tl.where(t4, v1, tl.where(t3, u1, a1))
    w2 = tl.where(t4, v2, tl.where(t3, u2, a2))
    w3 = tl.where(t4, v3, tl.where(t3, u3, 0.0))
    w4 = tl.where(t4, v4, 0.0)
    changed = inb & (a3 > 0)             # untouched groups are not written back
    nz = _put(p, z1, _place(w1, w2, w3, w4, i1, i2, i3, i4, 0), changed)
    nz += _put(p + 1, z2, _place(w1, w2, w3, w4, i1, i2, i3, i4, 1), changed)
    nz += _put(p + 2, z3, _place(w1, w2, w3, w4, i1, i2, i3, i4, 2), changed)
    nz += _put(p + 3, z4, _place(w1, w2, w3, w4, i1, i2, i3, i4, 3), changed)
    for k in tl.static_range(5):
        tl.atomic_add(hist_ptr + k, tl.sum(((nz == k) & inb).to(tl.int32), 0))


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
                                                   int(max_sweeps), BLOCK=BLOCK)
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
