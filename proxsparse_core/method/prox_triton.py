"""Triton kernels for the CUDA learning step: the 2:4 prox and the λ2 frozen-weight gradient.

Imported only when CUDA and Triton exist (prox.py and learner.py check). Values are read and
written in the weight's own dtype (bf16 on GPUs), with all arithmetic in float32 registers.

Per group the prox does exactly what the C kernel does (prox_native.py): skip groups that already
have ≤ 2 non-zeros, sort |z| by a 5-comparator network, Gauss-Seidel sweeps of keep-3 and keep-4
where a group that has converged (its sweep moved nothing by more than tol·max|z|) is frozen while
its neighbours go on, the best of keep-2/3/4 (for bf16/fp16 weights: of keep-2 and every rounding
of keep-3 and keep-4 to the weight's dtype, see prox.py), order and signs restored. It also counts
the result's groups with 0..4 non-zeros, which the learner reports every step.

`prox_` runs it in up to three launches, none of which waits for the host:

1. in place over the matrix, a persistent grid (a few programs per multiprocessor, each walking
   its share of 64-group blocks, counts kept in registers). A block where fewer than 3/4 of the
   groups need work hands those groups' indices to the next pass instead of solving 64 lanes for
   a few (mid-training most groups are already 2:4); a solved block sweeps at most CAPS[0] times
   and hands the groups that have not converged by then to the next pass;
2. and 3. the same per-group solve over those index lists (each program reads the segment its
   counterpart wrote), with caps CAPS[1] and the full MAX_SWEEPS. A group handed on starts again
   from its input, so its sweeps, and so its result, are exactly those of one uninterrupted pass.

The keep-3 and keep-4 roundings (8 and 16 candidates) are evaluated only when some group of the
block could take one: a lower bound of every candidate's objective, built from the same float32
operations on smaller non-negative operands (rounding is monotone), is compared with the best so
far first; where no group of the block can improve, the candidates are skipped — the choice, and
the result's bits, are the same as with all of them. The winner is tracked by its index.

Launched with enable_fp_fusion=False: Triton would otherwise contract a·b + c into fused
multiply-adds, which round differently from the C kernel and the PyTorch schedule; near a tie
between keep-3 and keep-4 that one-ulp difference flips the choice and the results differ by far
more than an ulp (9.6e-6 on a 576×1536 float32 matrix, measured on an H200). Without contraction
every operation is rounded as written and the three paths are bit-identical.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

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


# ----------------------------------------------------------------------------- the multi-pass prox

PASS_BLOCK = 64          # groups per block: one warp, two groups per thread
PASS_WARPS = 1
CAPS = (16, 48)          # sweeps of pass 1 and pass 2; pass 3 runs to MAX_SWEEPS
PROGRAMS_PER_SM = 16


@triton.jit
def _load_groups(w_ptr, g, m, BLOCK: tl.constexpr):
    """The 4 values of groups g (int64 [BLOCK], masked by m) as float32 columns."""
    t = tl.load(w_ptr + (g[:, None] * 4 + tl.arange(0, 4)[None, :]), mask=m[:, None], other=0.0)
    a, b = tl.split(tl.reshape(t.to(tl.float32), [BLOCK, 2, 2]))
    z1, z3 = tl.split(a)
    z2, z4 = tl.split(b)
    return z1, z2, z3, z4


@triton.jit
def _nonzeros(z1, z2, z3, z4):
    return (z1 != 0).to(tl.int32) + (z2 != 0).to(tl.int32) + (z3 != 0).to(tl.int32) + (z4 != 0).to(tl.int32)


@triton.jit
def _sort4(z1, z2, z3, z4, BLOCK: tl.constexpr):
    """|z| sorted in decreasing order by a 5-comparator network, with each value's place in the group."""
    a1, a2, a3, a4 = tl.abs(z1), tl.abs(z2), tl.abs(z3), tl.abs(z4)
    i1 = tl.zeros([BLOCK], tl.int32)
    i2, i3, i4 = i1 + 1, i1 + 2, i1 + 3
    a1, a2, i1, i2 = _cswap(a1, a2, i1, i2)
    a3, a4, i3, i4 = _cswap(a3, a4, i3, i4)
    a1, a3, i1, i3 = _cswap(a1, a3, i1, i3)
    a2, a4, i2, i4 = _cswap(a2, a4, i2, i4)
    a2, a3, i2, i3 = _cswap(a2, a3, i2, i3)
    return a1, a2, a3, a4, i1, i2, i3, i4


@triton.jit
def _sweeps(a1, a2, a3, a4, active, lam, tol, cap):
    """At most `cap` Gauss-Seidel sweeps of keep-3 (u) and keep-4 (v) from |z|; a group that has
    converged is frozen. Returns u, v and which groups are still moving."""
    u1, u2, u3 = a1, a2, a3
    v1, v2, v3, v4 = a1, a2, a3, a4
    s = 0
    while (s < cap) & (tl.max(active.to(tl.int32), 0) > 0):
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
    return u1, u2, u3, v1, v2, v3, v4, active


@triton.jit
def _pick_exact(u1, u2, u3, v1, v2, v3, v4, a1, a2, a3, a4, lam, best):
    """float32 weights: the best of keep-2 (objective `best`), keep-3 and keep-4, as |values|."""
    zero = tl.zeros_like(best)
    pick = tl.zeros_like(a1).to(tl.int32)       # 0: keep-2, 1: keep-3, 9: keep-4
    o = _obj3(u1, u2, u3, a1, a2, a3, a4, lam)
    t = o < best
    best = tl.where(t, o, best)
    pick = tl.where(t, 1, pick)
    o = _obj4(v1, v2, v3, v4, a1, a2, a3, a4, lam)
    pick = tl.where(o < best, 9, pick)
    w1 = tl.where(pick == 9, v1, tl.where(pick == 1, u1, a1))
    w2 = tl.where(pick == 9, v2, tl.where(pick == 1, u2, a2))
    w3 = tl.where(pick == 9, v3, tl.where(pick == 1, u3, zero))
    w4 = tl.where(pick == 9, v4, zero)
    return w1, w2, w3, w4


@triton.jit
def _pick_keep3(u1, u2, u3, a1, a2, a3, a4, lam, live, best, pick, GRID: tl.constexpr):
    """The 8 roundings of keep-3 to the weight's dtype: (x - a)² once per coordinate and side; skipped
    when no live group's lower bound beats its best. Returns the rounded points, best and pick."""
    p1, p2, p3 = _grid_lo(u1, GRID), _grid_lo(u2, GRID), _grid_lo(u3, GRID)
    q1, q2, q3 = _grid_hi(p1, u1, GRID), _grid_hi(p2, u2, GRID), _grid_hi(p3, u3, GRID)
    dl1, dl2, dl3 = (p1 - a1) * (p1 - a1), (p2 - a2) * (p2 - a2), (p3 - a3) * (p3 - a3)
    dh1, dh2, dh3 = (q1 - a1) * (q1 - a1), (q2 - a2) * (q2 - a2), (q3 - a3) * (q3 - a3)
    lb = 0.5 * (tl.minimum(dl1, dh1) + tl.minimum(dl2, dh2) + tl.minimum(dl3, dh3) + a4 * a4) \
        + lam * (p1 * p2 * p3)
    if tl.max((live & (lb < best)).to(tl.int32), 0) > 0:
        for c in tl.static_range(8):
            x1, e1 = (q1, dh1) if c % 2 == 1 else (p1, dl1)
            x2, e2 = (q2, dh2) if (c // 2) % 2 == 1 else (p2, dl2)
            x3, e3 = (q3, dh3) if (c // 4) % 2 == 1 else (p3, dl3)
            o = 0.5 * (e1 + e2 + e3 + a4 * a4) + lam * (x1 * x2 * x3)
            t = o < best
            best = tl.where(t, o, best)
            pick = tl.where(t, 1 + c, pick)
    return p1, p2, p3, q1, q2, q3, best, pick


@triton.jit
def _pick_keep4(v1, v2, v3, v4, a1, a2, a3, a4, lam, live, best, pick, GRID: tl.constexpr):
    """The 16 roundings of keep-4, as _pick_keep3 does for keep-3."""
    r1, r2, r3, r4 = _grid_lo(v1, GRID), _grid_lo(v2, GRID), _grid_lo(v3, GRID), _grid_lo(v4, GRID)
    s1, s2 = _grid_hi(r1, v1, GRID), _grid_hi(r2, v2, GRID)
    s3, s4 = _grid_hi(r3, v3, GRID), _grid_hi(r4, v4, GRID)
    fl1, fl2, fl3, fl4 = (r1 - a1) * (r1 - a1), (r2 - a2) * (r2 - a2), (r3 - a3) * (r3 - a3), (r4 - a4) * (r4 - a4)
    fh1, fh2, fh3, fh4 = (s1 - a1) * (s1 - a1), (s2 - a2) * (s2 - a2), (s3 - a3) * (s3 - a3), (s4 - a4) * (s4 - a4)
    lb = 0.5 * (tl.minimum(fl1, fh1) + tl.minimum(fl2, fh2) + tl.minimum(fl3, fh3) + tl.minimum(fl4, fh4)) \
        + lam * (r1 * r2 * (r3 + r4) + r3 * r4 * (r1 + r2))
    if tl.max((live & (lb < best)).to(tl.int32), 0) > 0:
        for c in tl.static_range(16):
            x1, e1 = (s1, fh1) if c % 2 == 1 else (r1, fl1)
            x2, e2 = (s2, fh2) if (c // 2) % 2 == 1 else (r2, fl2)
            x3, e3 = (s3, fh3) if (c // 4) % 2 == 1 else (r3, fl3)
            x4, e4 = (s4, fh4) if (c // 8) % 2 == 1 else (r4, fl4)
            o = 0.5 * (e1 + e2 + e3 + e4) + lam * (x1 * x2 * (x3 + x4) + x3 * x4 * (x1 + x2))
            t = o < best
            best = tl.where(t, o, best)
            pick = tl.where(t, 9 + c, pick)
    return r1, r2, r3, r4, s1, s2, s3, s4, pick


@triton.jit
def _pick_grid(u1, u2, u3, v1, v2, v3, v4, a1, a2, a3, a4, lam, live, best, GRID: tl.constexpr):
    """bf16/fp16 weights: the best of keep-2 and every rounding of keep-3 and keep-4, tracked by its
    index (0: keep-2, 1 + c: keep-3 point c, 9 + c: keep-4 point c); a later one must be strictly
    better, so the winner is the first lowest objective. Returns |values|."""
    zero = tl.zeros_like(best)
    pick = tl.zeros_like(a1).to(tl.int32)
    p1, p2, p3, q1, q2, q3, best, pick = _pick_keep3(u1, u2, u3, a1, a2, a3, a4, lam, live, best, pick, GRID)
    r1, r2, r3, r4, s1, s2, s3, s4, pick = _pick_keep4(v1, v2, v3, v4, a1, a2, a3, a4, lam, live, best, pick,
                                                        GRID)
    k3 = (pick >= 1) & (pick <= 8)
    k4 = pick >= 9
    c3 = pick - 1
    c4 = pick - 9
    w1 = tl.where(k4, tl.where((c4 & 1) != 0, s1, r1), tl.where(k3, tl.where((c3 & 1) != 0, q1, p1), a1))
    w2 = tl.where(k4, tl.where((c4 & 2) != 0, s2, r2), tl.where(k3, tl.where((c3 & 2) != 0, q2, p2), a2))
    w3 = tl.where(k4, tl.where((c4 & 4) != 0, s3, r3), tl.where(k3, tl.where((c3 & 4) != 0, q3, p3), zero))
    w4 = tl.where(k4, tl.where((c4 & 8) != 0, s4, r4), zero)
    return w1, w2, w3, w4


@triton.jit
def _solve_store(w_ptr, g, z1, z2, z3, z4, work, lam, tol, cap, max_sweeps,
                 BLOCK: tl.constexpr, GRID: tl.constexpr):
    """The prox of the `work` groups (≥ 3 non-zeros) with at most `cap` sweeps. Stores the groups
    that are finished; returns (non-zeros of each stored result, pending: still iterating)."""
    a1, a2, a3, a4, i1, i2, i3, i4 = _sort4(z1, z2, z3, z4, BLOCK)
    u1, u2, u3, v1, v2, v3, v4, active = _sweeps(a1, a2, a3, a4, work, lam, tol, cap)
    pending = active & (cap < max_sweeps)
    store = work & ~pending
    best = 0.5 * (a3 * a3 + a4 * a4)                # keep-2
    if GRID == 0:
        w1, w2, w3, w4 = _pick_exact(u1, u2, u3, v1, v2, v3, v4, a1, a2, a3, a4, lam, best)
    else:
        w1, w2, w3, w4 = _pick_grid(u1, u2, u3, v1, v2, v3, v4, a1, a2, a3, a4, lam, store, best, GRID)
    dt = w_ptr.dtype.element_ty
    o1 = _signed(z1, _place(w1, w2, w3, w4, i1, i2, i3, i4, 0)).to(dt)
    o2 = _signed(z2, _place(w1, w2, w3, w4, i1, i2, i3, i4, 1)).to(dt)
    o3 = _signed(z3, _place(w1, w2, w3, w4, i1, i2, i3, i4, 2)).to(dt)
    o4 = _signed(z4, _place(w1, w2, w3, w4, i1, i2, i3, i4, 3)).to(dt)
    t = tl.reshape(tl.join(tl.join(o1, o3), tl.join(o2, o4)), [BLOCK, 4])
    tl.store(w_ptr + (g[:, None] * 4 + tl.arange(0, 4)[None, :]), t, mask=store[:, None])
    nz = (o1 != 0).to(tl.int32) + (o2 != 0).to(tl.int32) + (o3 != 0).to(tl.int32) + (o4 != 0).to(tl.int32)
    return nz, pending


@triton.jit
def _signed(zj, m):
    return tl.where(zj > 0, m, tl.where(zj < 0, -m, 0.0))


@triton.jit
def _count(h0, h1, h2, h3, h4, nz, m):
    h0 += tl.sum(((nz == 0) & m).to(tl.int32), 0)
    h1 += tl.sum(((nz == 1) & m).to(tl.int32), 0)
    h2 += tl.sum(((nz == 2) & m).to(tl.int32), 0)
    h3 += tl.sum(((nz == 3) & m).to(tl.int32), 0)
    h4 += tl.sum(((nz == 4) & m).to(tl.int32), 0)
    return h0, h1, h2, h3, h4


@triton.jit
def _append(list_ptr, n_out, g, m):
    """Append the groups g[m] to a list at position n_out (in order); returns the new length."""
    mi = m.to(tl.int32)
    pos = n_out + tl.cumsum(mi, 0) - mi
    tl.store(list_ptr + pos, g.to(tl.int32), mask=m)
    return n_out + tl.sum(mi, 0)


@triton.jit
def _flush_counts(hist_ptr, h0, h1, h2, h3, h4):
    tl.atomic_add(hist_ptr + 0, h0, sem="relaxed")
    tl.atomic_add(hist_ptr + 1, h1, sem="relaxed")
    tl.atomic_add(hist_ptr + 2, h2, sem="relaxed")
    tl.atomic_add(hist_ptr + 3, h3, sem="relaxed")
    tl.atomic_add(hist_ptr + 4, h4, sem="relaxed")


@triton.jit
def _prox_in_place(w_ptr, list_ptr, cnt_ptr, hist_ptr, n_groups, n_blocks, seg, lam, tol, cap, max_sweeps,
                   BLOCK: tl.constexpr, GRID: tl.constexpr):
    """Pass 1: this program's blocks, solved in place or handed on (see the module docstring)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    out_list = list_ptr + pid.to(tl.int64) * seg
    n_out = pid * 0
    h0, h1, h2, h3, h4 = n_out, n_out, n_out, n_out, n_out
    for blk in range(pid, n_blocks, nprog):
        g = (blk * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)   # < 2^31 groups (prox_ checks)
        valid = g < n_groups
        z1, z2, z3, z4 = _load_groups(w_ptr, g, valid, BLOCK)
        nz_in = _nonzeros(z1, z2, z3, z4)
        work = valid & (nz_in > 2)
        h0, h1, h2, h3, h4 = _count(h0, h1, h2, h3, h4, nz_in, valid & ~work)
        n_work = tl.sum(work.to(tl.int32), 0)
        if n_work * 4 < BLOCK * 3:           # mostly 2:4 already: hand the few on
            n_out = _append(out_list, n_out, g, work)
        else:
            nz, pending = _solve_store(w_ptr, g, z1, z2, z3, z4, work, lam, tol, cap, max_sweeps, BLOCK, GRID)
            h0, h1, h2, h3, h4 = _count(h0, h1, h2, h3, h4, nz, work & ~pending)
            n_out = _append(out_list, n_out, g, pending)
    tl.store(cnt_ptr + pid, n_out)
    _flush_counts(hist_ptr, h0, h1, h2, h3, h4)


@triton.jit
def _prox_from_list(w_ptr, in_ptr, in_cnt, out_ptr, out_cnt, hist_ptr, seg, lam, tol, cap, max_sweeps,
                    BLOCK: tl.constexpr, GRID: tl.constexpr, EMIT: tl.constexpr):
    """Passes 2 and 3: the groups of this program's segment of the list, from their input."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * seg
    n_in = tl.load(in_cnt + pid)
    n_out = pid * 0
    h0, h1, h2, h3, h4 = n_out, n_out, n_out, n_out, n_out
    for off in range(0, n_in, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        valid = idx < n_in
        g = tl.load(in_ptr + base + idx, mask=valid, other=0).to(tl.int64)
        z1, z2, z3, z4 = _load_groups(w_ptr, g, valid, BLOCK)
        work = valid & (_nonzeros(z1, z2, z3, z4) > 2)
        nz, pending = _solve_store(w_ptr, g, z1, z2, z3, z4, work, lam, tol, cap, max_sweeps, BLOCK, GRID)
        h0, h1, h2, h3, h4 = _count(h0, h1, h2, h3, h4, nz, work & ~pending)
        if EMIT:
            n_out = _append(out_ptr + base, n_out, g, pending)
    if EMIT:
        tl.store(out_cnt + pid, n_out)
    _flush_counts(hist_ptr, h0, h1, h2, h3, h4)


GRIDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def supports(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float32, torch.bfloat16, torch.float16) and t.is_contiguous()


def _programs(device: torch.device, n_blocks: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2                              # Triton's interpreter on the CPU
    return max(1, min(n_blocks, sms * PROGRAMS_PER_SM))


def prox_(groups: torch.Tensor, lam: float, tol: float, max_sweeps: int,
          hist: torch.Tensor | None = None, caps: tuple[int, int] = CAPS) -> torch.Tensor:
    """In place on a contiguous CUDA tensor of shape [G, 4]; adds the non-zero counts of the
    result to `hist` (int64 [5] on the same device) when given. No host synchronisation."""
    n = groups.numel() // 4
    if n >= 2 ** 31:
        raise ValueError("more than 2^31 groups in one tensor")
    counts = torch.zeros(5, dtype=torch.int32, device=groups.device)
    if n:
        grid = GRIDS[groups.dtype]
        n_blocks = triton.cdiv(n, PASS_BLOCK)
        nprog = _programs(groups.device, n_blocks)
        seg = triton.cdiv(n_blocks, nprog) * PASS_BLOCK
        lists = torch.empty(2, nprog * seg, dtype=torch.int32, device=groups.device)
        cnt = torch.empty(2, nprog, dtype=torch.int32, device=groups.device)
        cap1, cap2 = (min(int(c), int(max_sweeps)) for c in caps)
        kw = dict(BLOCK=PASS_BLOCK, GRID=grid, num_warps=PASS_WARPS, enable_fp_fusion=False)
        lam, tol, max_sweeps = float(lam), float(tol), int(max_sweeps)
        with torch.cuda.device(groups.device) if groups.is_cuda else contextlib.nullcontext():
            _prox_in_place[(nprog,)](groups, lists[0], cnt[0], counts, n, n_blocks, seg, lam, tol, cap1,
                                     max_sweeps, **kw)
            _prox_from_list[(nprog,)](groups, lists[0], cnt[0], lists[1], cnt[1], counts, seg, lam, tol,
                                      cap2, max_sweeps, EMIT=cap2 < max_sweeps, **kw)
            if cap2 < max_sweeps:
                _prox_from_list[(nprog,)](groups, lists[1], cnt[1], lists[0], cnt[0], counts, seg, lam, tol,
                                          max_sweeps, max_sweeps, EMIT=False, **kw)
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
