"""The 2:4 proximal operator of ProxSparse.

For every group z of 4 consecutive weights (row-major along the input dimension) it solves

    argmin_w  ½‖w − z‖² + λ·R(w),   R(w) = |w1w2w3| + |w1w2w4| + |w1w3w4| + |w2w3w4|

The solution keeps the signs of z and the order of |z|, so we work on a = |z| sorted in
descending order and enumerate the support size:

* keep 2:  w = (a1, a2, 0, 0), R = 0;
* keep 3:  min over (w1, w2, w3) ≥ 0, w4 = 0, R = w1·w2·w3;
* keep 4:  min over all four ≥ 0.

Keep-3 and keep-4 are solved by cyclic coordinate minimisation, whose exact coordinate update is
the non-negative soft threshold ``w_i = max(a_i − λ·S_i, 0)`` (S_i: sum of the pairwise products
of the other coordinates in the support). The candidate with the lowest objective wins; signs and
order are restored at the end.

Results stored in bfloat16 or float16 (mode="fast"): rounding the float32 solution to the nearest
representable value can land just across a rounding midpoint from where another schedule's (one
float32 ulp away) lands, and then loses to it by up to a few 1e-6·max|z|² (measured on 7B-shaped
bf16 weights at λ = 2 and 20). So the fast schedule picks the best representable point instead:
each coordinate of the keep-3 and keep-4 solutions may round down or up (8 + 16 points, plus
keep-2, which is exact), and the lowest objective wins. Any schedule whose float32 solution lies
within half a bf16/fp16 step of ours rounds to one of these points, so ours is never worse.

Two schedules:

* ``mode="fast"`` (default): every group is iterated until *its own* sweep moves it by no more
  than tol·max|z| (a global stopping test over a whole matrix either wastes work or stops too
  early); groups that already have ≤ 2 non-zeros are their own prox and are skipped. It runs as
  one in-place pass over the weight: a C kernel on the CPU (prox_native.py), a Triton kernel on
  CUDA (prox_triton.py), and plain PyTorch elsewhere (blocks of sweeps with the unconverged groups
  compacted between blocks). All three evaluate the same expressions in the same order without
  fused multiply-adds, so their results are bit-identical.
* ``mode="reference"``: the published schedule (every group iterated together, up to 100 sweeps,
  one global stopping test). It exists for benchmarks and tests.

Both share the sweep cap, so the fast mode's objective is never worse than the reference's
(tests/test_prox_speed_paths.py checks it on every group of millions, float32 and bfloat16).
λ is used as is: it is *not* multiplied by the learning rate (the published convention).
"""
from __future__ import annotations

import importlib.util

import torch

from proxsparse_core.method import prox_native

GROUP = 4
DEFAULT_CHUNK_GROUPS = 1 << 20
MAX_SWEEPS = 100       # the published cap, shared by both modes
BLOCK_SWEEPS = 6       # sweeps between compactions of the unconverged groups (PyTorch schedule)
FAST_TOL = 1e-7        # per-group: stop when a sweep moves no coordinate by more than tol·max|z|
REFERENCE_TOL = 1e-8   # global: stop when a sweep moves no coordinate anywhere by more than this


def regulariser(w: torch.Tensor) -> torch.Tensor:
    """R(w) per group for a tensor of shape [..., 4]."""
    a1, a2, a3, a4 = w.abs().unbind(-1)
    return a1 * a2 * (a3 + a4) + a3 * a4 * (a1 + a2)


def objective(w: torch.Tensor, z: torch.Tensor, lam: float) -> torch.Tensor:
    """½‖w − z‖² + λ R(w) per group (shape [..., 4] → [...]), computed in float64."""
    w, z = w.double(), z.double()
    return 0.5 * ((w - z) ** 2).sum(-1) + lam * regulariser(w)


# ----------------------------------------------------------------------------- kernels
# Each works on 1-D float32 columns so that every line is one elementwise pass (and fuses).

def _sort4(z1, z2, z3, z4):
    """|z| sorted descending with the permutation, by a 5-comparator sorting network."""
    a = [z1.abs(), z2.abs(), z3.abs(), z4.abs()]
    i = [torch.full_like(z1, k) for k in range(4)]
    for p, q in ((0, 1), (2, 3), (0, 2), (1, 3), (1, 2)):
        swap = a[p] < a[q]
        a[p], a[q] = torch.where(swap, a[q], a[p]), torch.where(swap, a[p], a[q])
        i[p], i[q] = torch.where(swap, i[q], i[p]), torch.where(swap, i[p], i[q])
    return a[0], a[1], a[2], a[3], i[0], i[1], i[2], i[3]


def _sweeps(a1, a2, a3, a4, u1, u2, u3, v1, v2, v3, v4, lam: float, n: int):
    """n Gauss-Seidel sweeps of keep-3 (u) and keep-4 (v); returns both and the last change."""
    for _ in range(n):
        p1, p2, p3, q1, q2, q3, q4 = u1, u2, u3, v1, v2, v3, v4
        u1 = torch.clamp_min(a1 - lam * (u2 * u3), 0)
        u2 = torch.clamp_min(a2 - lam * (u1 * u3), 0)
        u3 = torch.clamp_min(a3 - lam * (u1 * u2), 0)
        v1 = torch.clamp_min(a1 - lam * (v2 * v3 + v2 * v4 + v3 * v4), 0)
        v2 = torch.clamp_min(a2 - lam * (v1 * v3 + v1 * v4 + v3 * v4), 0)
        v3 = torch.clamp_min(a3 - lam * (v1 * v2 + v1 * v4 + v2 * v4), 0)
        v4 = torch.clamp_min(a4 - lam * (v1 * v2 + v1 * v3 + v2 * v3), 0)
    change = torch.maximum(
        torch.maximum(torch.maximum((u1 - p1).abs(), (u2 - p2).abs()), (u3 - p3).abs()),
        torch.maximum(torch.maximum((v1 - q1).abs(), (v2 - q2).abs()),
                      torch.maximum((v3 - q3).abs(), (v4 - q4).abs())))
    return u1, u2, u3, v1, v2, v3, v4, change


def _obj3(w1, w2, w3, a1, a2, a3, a4, lam: float):
    return 0.5 * ((w1 - a1) * (w1 - a1) + (w2 - a2) * (w2 - a2) + (w3 - a3) * (w3 - a3) + a4 * a4) \
        + lam * (w1 * w2 * w3)


def _obj4(w1, w2, w3, w4, a1, a2, a3, a4, lam: float):
    return 0.5 * ((w1 - a1) * (w1 - a1) + (w2 - a2) * (w2 - a2) + (w3 - a3) * (w3 - a3) + (w4 - a4) * (w4 - a4)) \
        + lam * (w1 * w2 * (w3 + w4) + w3 * w4 * (w1 + w2))


def grid_bounds(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """For float32 magnitudes x ≥ 0: the largest value of `dtype` (bfloat16 or float16) ≤ x and the
    next one up (equal to the first where x is representable), both as float32."""
    if dtype == torch.bfloat16:
        lo = torch.bitwise_and(x.view(torch.int32), -65536).view(torch.float32)
        step = 65536
    else:
        lo = torch.bitwise_and(x.view(torch.int32), -8192).view(torch.float32)
        step = 8192
    hi = (lo.view(torch.int32) + step).view(torch.float32)
    if dtype == torch.float16:                  # subnormals: multiples of 2^-24
        sub = x < 2.0 ** -14
        lo_sub = torch.trunc(x * 16777216.0) * 2.0 ** -24
        lo = torch.where(sub, lo_sub, lo)
        hi = torch.where(sub, lo_sub + 2.0 ** -24, hi)
    return lo, torch.where(lo == x, lo, hi)


def _select(z1, z2, z3, z4, a1, a2, a3, a4, i1, i2, i3, i4,
            u1, u2, u3, v1, v2, v3, v4, lam: float, grid: torch.dtype | None = None):
    """Pick the best of keep-2/3/4 (with `grid`: of keep-2 and every rounding of keep-3 and keep-4
    to that dtype), then restore order and signs. Returns the 4 output columns."""
    zero = torch.zeros_like(a1)
    best = 0.5 * (a3 * a3 + a4 * a4)
    w = [a1, a2, zero, zero]
    if grid is None:
        candidates = [((u1, u2, u3, zero), _obj3(u1, u2, u3, a1, a2, a3, a4, lam)),
                      ((v1, v2, v3, v4), _obj4(v1, v2, v3, v4, a1, a2, a3, a4, lam))]
    else:
        b3 = [grid_bounds(c, grid) for c in (u1, u2, u3)]
        b4 = [grid_bounds(c, grid) for c in (v1, v2, v3, v4)]
        candidates = []
        for c in range(8):
            x = [b3[k][(c >> k) & 1] for k in range(3)]
            candidates.append(((*x, zero), _obj3(*x, a1, a2, a3, a4, lam)))
        for c in range(16):
            x = [b4[k][(c >> k) & 1] for k in range(4)]
            candidates.append((tuple(x), _obj4(*x, a1, a2, a3, a4, lam)))
    for point, o in candidates:              # in order; a later candidate must be strictly better
        take = o < best
        best = torch.where(take, o, best)
        w = [torch.where(take, p, q) for p, q in zip(point, w)]
    idx = (i1, i2, i3, i4)
    out = []
    for j, zj in enumerate((z1, z2, z3, z4)):
        mag = zero
        for k in range(4):
            mag = torch.where(idx[k] == j, w[k], mag)
        out.append(torch.where(zj > 0, mag, torch.where(zj < 0, -mag, zero)))
    return out


def _fast_sweeps(a1, a2, a3, a4, u1, u2, u3, v1, v2, v3, v4, active, lam: float, tol: float, n: int):
    """n sweeps of the fast schedule: a group whose sweep moved no coordinate by more than
    tol·max|z| keeps that sweep's result and is frozen (exactly as the C and Triton kernels)."""
    for _ in range(n):
        n1 = torch.clamp_min(a1 - lam * (u2 * u3), 0)
        n2 = torch.clamp_min(a2 - lam * (n1 * u3), 0)
        n3 = torch.clamp_min(a3 - lam * (n1 * n2), 0)
        m1 = torch.clamp_min(a1 - lam * (v2 * v3 + v2 * v4 + v3 * v4), 0)
        m2 = torch.clamp_min(a2 - lam * (m1 * v3 + m1 * v4 + v3 * v4), 0)
        m3 = torch.clamp_min(a3 - lam * (m1 * m2 + m1 * v4 + m2 * v4), 0)
        m4 = torch.clamp_min(a4 - lam * (m1 * m2 + m1 * m3 + m2 * m3), 0)
        d = torch.stack([(n1 - u1).abs(), (n2 - u2).abs(), (n3 - u3).abs(), (m1 - v1).abs(),
                         (m2 - v2).abs(), (m3 - v3).abs(), (m4 - v4).abs()]).amax(0)
        u1, u2, u3 = torch.where(active, n1, u1), torch.where(active, n2, u2), torch.where(active, n3, u3)
        v1, v2 = torch.where(active, m1, v1), torch.where(active, m2, v2)
        v3, v4 = torch.where(active, m3, v3), torch.where(active, m4, v4)
        active = active & (d > tol * a1)
    return u1, u2, u3, v1, v2, v3, v4, active


def _prox_cols(zf: torch.Tensor, lam: float, tol: float = FAST_TOL,
               max_sweeps: int = MAX_SWEEPS, grid: torch.dtype | None = None) -> torch.Tensor:
    """The portable fast schedule in plain PyTorch (devices without a native or Triton kernel):
    float32 groups in, float32 result out (exact in `grid`, bfloat16 or float16, when given)."""
    z = [c.contiguous() for c in zf.unbind(1)]
    a1, a2, a3, a4, i1, i2, i3, i4 = _sort4(*z)
    u = [a1.clone(), a2.clone(), a3.clone()]
    v = [a1.clone(), a2.clone(), a3.clone(), a4.clone()]
    # groups with ≤ 2 non-zeros (a3 == 0) are fixed points: never iterate them
    work = (a3 > 0).nonzero().squeeze(1)
    done = 0
    while work.numel() and done < max_sweeps:
        n = min(BLOCK_SWEEPS, max_sweeps - done)
        cols = [c[work] for c in (a1, a2, a3, a4, *u, *v)]
        active = torch.ones_like(work, dtype=torch.bool)
        *res, active = _fast_sweeps(*cols, active, lam, tol, n)
        for full, part in zip(u + v, res):
            full[work] = part
        done += n
        work = work[active]                 # the converged groups are frozen for good
    return torch.stack(_select(*z, a1, a2, a3, a4, i1, i2, i3, i4, *u, *v, lam, grid), 1)


def _prox_reference(zf: torch.Tensor, lam: float, tol: float = REFERENCE_TOL,
                    max_sweeps: int = MAX_SWEEPS) -> torch.Tensor:
    z = [c.contiguous() for c in zf.unbind(1)]
    a1, a2, a3, a4, i1, i2, i3, i4 = _sort4(*z)
    u = [a1, a2, a3]
    v = [a1, a2, a3, a4]
    for _ in range(max_sweeps):
        *res, change = _sweeps(a1, a2, a3, a4, *u, *v, lam, 1)
        u, v = list(res[:3]), list(res[3:])
        if float(change.max()) < tol:
            break
    return torch.stack(_select(*z, a1, a2, a3, a4, i1, i2, i3, i4, *u, *v, lam), 1)


def triton_kernels():
    """prox_triton, imported only when CUDA and Triton exist (None otherwise). Whether Triton is
    installed is asked first, so a real error inside prox_triton is not mistaken for its absence."""
    global _TRITON
    if _TRITON is False:
        _TRITON = None
        if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
            from proxsparse_core.method import prox_triton as _TRITON
    return _TRITON


_TRITON = False


def _in_place_kernel(groups: torch.Tensor):
    """The one-pass in-place kernel for these groups, or None (then the PyTorch schedule runs)."""
    if prox_native.supports(groups) and prox_native.available():
        return prox_native.prox_
    if groups.is_cuda and (tri := triton_kernels()) is not None and tri.supports(groups):
        return tri.prox_
    return None


def _check(lam: float, mode: str):
    if not lam >= 0:
        raise ValueError(f"λ must be ≥ 0, got {lam}")
    if mode not in ("fast", "reference"):
        raise ValueError(f"unknown prox mode {mode!r} (use 'fast' or 'reference')")


def count_nonzeros(groups: torch.Tensor) -> torch.Tensor:
    """Groups with 0..4 non-zeros (int64 [5], on the groups' device)."""
    return (groups != 0).sum(1).bincount(minlength=5)


def prox_groups(z: torch.Tensor, lam: float, mode: str = "fast") -> torch.Tensor:
    """Proximal operator on groups z of shape [G, 4]; returns a new tensor of z's dtype.

    Computation runs in float32 (bf16/fp16 inputs are up-cast and the result rounded back)."""
    if z.ndim != 2 or z.shape[1] != GROUP:
        raise ValueError(f"prox_groups expects [G, 4] groups, got {tuple(z.shape)}")
    _check(lam, mode)
    if lam == 0 or z.numel() == 0:
        return z.clone()
    if mode == "reference":
        return _prox_reference(z.float(), float(lam)).to(z.dtype)
    # results are exact in z's dtype when it is bfloat16 or float16 (the best representable point)
    grid = z.dtype if z.dtype in (torch.bfloat16, torch.float16) else None
    work_dtype = z.dtype if grid is not None or z.dtype == torch.float32 else torch.float32
    work = z.to(work_dtype, memory_format=torch.contiguous_format, copy=True)
    kernel = _in_place_kernel(work)
    if kernel is None and work.dtype != torch.float32:
        # the C kernel stores float32 or bfloat16: a float16 result is computed on its grid in float32
        work = work.float()
        kernel = _in_place_kernel(work)
    if kernel is None:
        return _prox_cols(z.float(), float(lam), grid=grid).to(z.dtype)
    if kernel is prox_native.prox_:
        kernel(work, float(lam), FAST_TOL, MAX_SWEEPS, out_dtype=grid or work.dtype)
    else:
        kernel(work, float(lam), FAST_TOL, MAX_SWEEPS)
    return work.to(z.dtype)


@torch.no_grad()
def prox_2to4_(weight: torch.Tensor, lam: float, mode: str = "fast",
               chunk_groups: int = DEFAULT_CHUNK_GROUPS, hist: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the prox in place to a weight of shape [out, in] (in % 4 == 0).

    The fast mode runs one in-place kernel over the whole matrix where one exists (CPU float32/
    bfloat16, CUDA); otherwise the matrix goes chunk by chunk, so temporary memory stays bounded
    whatever its size. When `hist` (int64 [5], on the weight's device) is given, the groups of the
    result with 0..4 non-zeros are added to it (free with the kernels: the learner's statistics)."""
    if weight.shape[-1] % GROUP:
        raise ValueError(f"input dimension {weight.shape[-1]} is not divisible by 4")
    _check(lam, mode)
    groups = weight.data.view(-1, GROUP)
    kernel = _in_place_kernel(groups) if mode == "fast" and lam > 0 else None
    if kernel is not None:
        kernel(groups, float(lam), FAST_TOL, MAX_SWEEPS, hist)
        return weight
    if lam > 0:
        for start in range(0, groups.shape[0], chunk_groups):
            block = groups[start:start + chunk_groups]
            block.copy_(prox_groups(block, lam, mode=mode))
    if hist is not None:
        hist += count_nonzeros(groups)
    return weight
