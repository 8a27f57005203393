"""The fast prox paths on the CPU: the C kernel, the PyTorch fallback and (when Triton is
installed) the Triton kernel through its interpreter, against the reference schedule."""
import os
import subprocess
import sys

import pytest
import torch

from proxsparse_core.method import prox
from proxsparse_core.method import prox_native
from proxsparse_core.method.prox import FAST_TOL, MAX_SWEEPS, count_nonzeros, objective

needs_native = pytest.mark.skipif(not prox_native.available(), reason="no C compiler for the native prox")


def _groups(dtype, seed, n=6000, sparse_share=0.5, scale=0.3):
    """Random groups, a share of them already 2:4 (as in a mid-training state), some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g) * scale
    z[torch.rand(n, generator=g) < sparse_share, 2:] = 0
    z[torch.rand(n, 4, generator=g) < 0.05] = 0
    return z[:, torch.randperm(4, generator=g)].contiguous().to(dtype)


# Tolerance for "not worse": 1e-6·max|z|², whatever the dtype. Both objectives are evaluated in
# float64 on the stored results, so the only noise is how each schedule chose its candidate: the
# choice compares float32 objectives, sums of non-negative terms of size ≤ ~max|z|², each off by a
# few float32 ulps (2^-24 ≈ 6e-8) of max|z|². Measured worst over millions of groups: 4e-8 (float32),
# 7e-8 (bfloat16), 1.4e-7 (float16). A bf16 result rounded to nearest (the old fast path) loses by
# up to ~2e-6 when the two float32 solutions straddle a rounding midpoint: this tolerance sees it.
EXCESS_TOL = 1e-6


def _excess(w, ref, z, lam):
    """Per group: (objective of w − objective of ref) / max|z|², in float64."""
    scale = z.double().abs().amax(1) ** 2
    return (objective(w, z, lam) - objective(ref, z, lam)) / scale.clamp_min(1e-300)


def _not_worse(w, ref, z, lam, dtype=None):
    """Objective of w ≤ reference objective on every group, up to EXCESS_TOL."""
    excess = _excess(w, ref, z, lam)
    assert int((excess > EXCESS_TOL).sum()) == 0, (int((excess > EXCESS_TOL).sum()), float(excess.max()))


def adversarial_groups(n, lam, seed):
    """n groups built to sit on every regime switch of the prox: λ·a² spread over 1e-3…1e3 (keep-4,
    keep-3, keep-2 and the boundaries between them), near-ties among the magnitudes, two large and
    two nearly equal small entries, plus plain N(0, 0.02²) and N(0, 0.3²) groups; random signs and
    positions."""
    g = torch.Generator().manual_seed(seed)
    k = n // 4
    s = torch.sqrt(10 ** (torch.rand(k, 1, generator=g) * 6 - 3) / lam)
    spread = torch.rand(k, 4, generator=g) * s
    base = torch.rand(k, 1, generator=g) * s
    ties = base * (1 + 1e-3 * torch.randn(k, 4, generator=g) * (torch.rand(k, 4, generator=g) < 0.7))
    pairs = torch.cat([torch.rand(k, 2, generator=g) + 1,
                       torch.rand(k, 1, generator=g) * (1 + 1e-4 * torch.randn(k, 2, generator=g))], 1) * s
    plain = torch.randn(n - 3 * k, 4, generator=g) * torch.where(torch.rand(n - 3 * k, 1, generator=g) < 0.5, 0.02, 0.3)
    z = torch.cat([spread, ties, pairs, plain])
    z = z * torch.where(torch.rand(z.shape, generator=g) < 0.5, -1.0, 1.0)
    return z[:, torch.randperm(4, generator=g)].contiguous()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("lam", [0.25, 1.0, 20.0])
def test_native_never_worse_than_reference(dtype, lam):
    z = _groups(dtype, seed=int(10 * lam))
    fast, ref = prox.prox_groups(z, lam), prox.prox_groups(z, lam, mode="reference")
    assert fast.dtype == dtype
    _not_worse(fast, ref, z, lam)
    # 2:4 groups are their own prox: returned bit for bit
    keep = (z != 0).sum(1) <= 2
    assert torch.equal(fast[keep], z[keep])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [0.25, 1.0, 20.0])
def test_native_equals_pytorch_schedule_bit_for_bit(dtype, lam):
    """Same per-group iteration and stopping, same expressions in the same order, no fused
    multiply-adds (the C kernel is built with -ffp-contract=off): identical bits."""
    z = _groups(dtype, seed=3, n=20000)
    native = prox.prox_groups(z, lam)
    grid = None if dtype == torch.float32 else dtype
    torch_path = prox._prox_cols(z.float(), lam, grid=grid).to(dtype)
    assert torch.equal(native, torch_path), int((native != torch_path).sum())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_runs_of_dense_groups_read_in_place_equal_the_pytorch_schedule(dtype, weighted):
    """While learning, every group the prox sees has ≥ 3 non-zeros (AdamW moves the zeros it made),
    so the C kernel solves runs of 32 consecutive groups where they lie. Matrices of dense groups,
    a few 2:4 ones sprinkled in (a run that must be gathered instead), narrow rows (a run wraps
    around several rows, where column weights a restart) and wide ones: bit for bit the PyTorch
    schedule, the counts included — one matrix at a time and all layers in one call."""
    g = torch.Generator().manual_seed(21)
    shapes = [(40, 16), (24, 200), (9, 1024)]            # 16 and 200 columns: runs of 128 values wrap
    lam = 0.7
    ws, cols, wants, hists = [], [], [], []
    for r, c in shapes:
        w = torch.randn(r, c, generator=g) * 0.3
        w.view(-1, 4)[torch.randperm(r * c // 4, generator=g)[:5], 2:] = 0     # 5 groups already 2:4
        w = w.to(dtype)
        a = torch.rand(c, generator=g) * 3 + 0.01 if weighted else None
        v = w.float() * a if weighted else w.float()
        grid = None if dtype == torch.float32 or weighted else dtype     # with a: the prox of v in float32
        out = prox._prox_cols(v.view(-1, 4), lam, grid=grid).view(r, c)
        hists.append(count_nonzeros(out.view(-1, 4)))
        wants.append((out / a).to(dtype) if weighted else out.to(dtype))
        ws.append(w)
        cols.append(a)
    if not weighted:                                      # one matrix at a time (prox_2to4_ / prox_groups)
        for w, want, hist in zip(ws, wants, hists):
            if dtype == torch.float16:
                got = prox.prox_groups(w.view(-1, 4), lam).view(w.shape)
            else:
                got, h = w.clone(), torch.zeros(5, dtype=torch.long)
                prox.prox_2to4_(got, lam, hist=h)
                assert torch.equal(h, hist)
            assert torch.equal(got, want), int((got != want).sum())
    if dtype == torch.float16:                            # the one-call path stores float32 or bfloat16
        return
    ours = [w.clone() for w in ws]
    assert prox_native.layers_supported(ours, cols if weighted else None)
    got = prox_native.prox_layers_(ours, [lam] * len(ours), FAST_TOL, MAX_SWEEPS, cols if weighted else None)
    assert torch.equal(got, torch.stack(hists))
    for mine, want in zip(ours, wants):
        assert torch.equal(mine, want), int((mine != want).sum())


@needs_native
@pytest.mark.parametrize("dtype,lam", [(torch.float32, 2.0), (torch.float32, 20.0),
                                       (torch.bfloat16, 2.0), (torch.bfloat16, 20.0)])
def test_fast_never_worse_than_reference_on_adversarial_groups(dtype, lam):
    z = adversarial_groups(400_000, lam, seed=int(lam)).to(dtype)
    _not_worse(prox.prox_groups(z, lam), prox.prox_groups(z, lam, mode="reference"), z, lam)


# bf16 groups of a N(0, 0.02²) 7B-shaped matrix where the fast path used to lose at λ1 = 20 (by
# 1.1e-6 … 2.1e-6 of max|z|²): its float32 solution and the reference's were one float32 ulp apart
# on either side of a bf16 rounding midpoint, so rounding to nearest sent them to different values.
ROUNDED_THE_WRONG_WAY = [
    [-0.0159912109375, 0.01495361328125, 0.036865234375, -0.00640869140625],
    [-0.01025390625, -0.006317138671875, 0.00872802734375, -0.00927734375],
    [0.00823974609375, -0.016845703125, -0.000949859619140625, 0.016357421875],
    [0.0283203125, 0.0252685546875, 0.041748046875, 0.017822265625],
    [0.0252685546875, 0.01409912109375, 0.01470947265625, -0.0004177093505859375],
]


def test_bf16_result_is_the_best_representable_point_not_the_nearest():
    z = torch.tensor(ROUNDED_THE_WRONG_WAY).bfloat16()
    fast, ref = prox.prox_groups(z, 20.0), prox.prox_groups(z, 20.0, mode="reference")
    assert float(_excess(fast, ref, z, 20.0).max()) <= 0.0
    # and no bf16 point next to the float32 solution is better than the one chosen
    f32 = prox.prox_groups(z.float(), 20.0)
    lo, hi = prox.grid_bounds(f32.abs(), torch.bfloat16)
    for c in range(16):
        pick = torch.tensor([(c >> k) & 1 for k in range(4)], dtype=torch.bool)
        other = torch.where(pick, hi, lo) * f32.sign()
        assert bool((objective(fast, z, 20.0) <= objective(other, z, 20.0) + 1e-12).all())


def test_grid_bounds_bracket_by_neighbouring_values():
    x = torch.cat([torch.rand(5000) * 10, torch.rand(5000) * 1e-4, torch.tensor([0.0, 1.0, 0.5, 2.0 ** -20])])
    for dtype in (torch.bfloat16, torch.float16):
        lo, hi = prox.grid_bounds(x, dtype)
        assert torch.equal(lo.to(dtype).float(), lo) and torch.equal(hi.to(dtype).float(), hi)
        assert bool((lo <= x).all() and (x <= hi).all())
        exact = x.to(dtype).float() == x
        assert torch.equal(lo == hi, exact)
        # nothing representable strictly between lo and hi: hi is lo's successor
        nxt = (lo.to(dtype).view(torch.int16) + 1).view(dtype).float()
        assert bool(torch.where(exact, True, nxt == hi).all())


@needs_native
def test_in_place_kernel_counts_nonzeros_and_keeps_storage():
    w = torch.randn(96, 256) * 0.4
    ptr, before = w.data_ptr(), w.clone()
    hist = torch.zeros(5, dtype=torch.long)
    prox.prox_2to4_(w, 3.0, hist=hist)
    assert w.data_ptr() == ptr and not torch.equal(w, before)
    assert torch.equal(hist, count_nonzeros(w.view(-1, 4)))
    assert torch.equal(w.view(-1, 4), prox.prox_groups(before.view(-1, 4), 3.0))
    prox.prox_2to4_(w, 0.0, hist=hist)              # λ = 0 still reports the counts
    assert int(hist.sum()) == 2 * w.numel() // 4


@needs_native
def test_bfloat16_weights_are_processed_in_their_own_dtype():
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.3).bfloat16()
    before = w.clone()
    f32 = prox.prox_groups(w.float().view(-1, 4), 1.0)
    # float32 iterations, then the best bf16 point around them
    expected = prox._prox_cols(w.float().view(-1, 4), 1.0, grid=torch.bfloat16).bfloat16()
    prox.prox_2to4_(w, 1.0)
    assert w.dtype == torch.bfloat16 and torch.equal(w.view(-1, 4), expected)
    # never worse than rounding the float32 result to nearest (which is what the bf16 cast does);
    # strictly better on some groups
    z = before.float().view(-1, 4)
    gain = -_excess(w.view(-1, 4), f32.bfloat16(), z, 1.0)
    assert float(gain.min()) >= -EXCESS_TOL and float(gain.max()) > EXCESS_TOL


def test_fallback_without_native_kernel_matches(monkeypatch):
    z = _groups(torch.float32, seed=5, n=2000)
    native = prox.prox_groups(z, 1.0) if prox_native.available() else None
    monkeypatch.setattr(prox_native, "available", lambda: False)
    w = z.clone().view(50, 160)
    hist = torch.zeros(5, dtype=torch.long)
    prox.prox_2to4_(w, 1.0, chunk_groups=333, hist=hist)     # chunked PyTorch schedule
    _not_worse(w.view(-1, 4), prox.prox_groups(z, 1.0, mode="reference"), z, 1.0)
    assert torch.equal(hist, count_nonzeros(w.view(-1, 4)))
    if native is not None:
        assert torch.equal(w.view(-1, 4), native)


@needs_native
def test_fast_mode_uses_the_native_kernel(monkeypatch):
    calls = []
    real = prox_native.prox_
    monkeypatch.setattr(prox_native, "prox_", lambda *a, **k: calls.append(1) or real(*a, **k))
    prox.prox_2to4_(torch.randn(8, 16), 1.0)
    prox.prox_groups(torch.randn(10, 4, dtype=torch.float16), 1.0)
    assert len(calls) == 2


def test_native_kernel_result_is_independent_of_threads():
    if not prox_native.available():
        pytest.skip("no C compiler")
    z = _groups(torch.float32, seed=9, n=5003)
    one, many = z.clone(), z.clone()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        prox_native.prox_(one, 1.0, FAST_TOL, MAX_SWEEPS)
    finally:
        torch.set_num_threads(n)
    prox_native.prox_(many, 1.0, FAST_TOL, MAX_SWEEPS)
    assert torch.equal(one, many)


_INTERPRETER_CHECK = """
import sys
import torch
sys.path.insert(0, "tests")
import triton_interp
triton_interp.install()
from proxsparse_core.method import prox
from proxsparse_core.method import prox_triton
from proxsparse_core.method.prox import FAST_TOL, MAX_SWEEPS, count_nonzeros
from test_prox_speed_paths import adversarial_groups
g = torch.Generator().manual_seed(11)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for lam in (1.0, 20.0):
        z = torch.randn(700, 4, generator=g) * 0.3
        z[torch.rand(700, generator=g) < 0.4, 2:] = 0
        z[200:450, 2:] = 0                  # blocks of mostly 2:4 groups: handed to the next pass
        z[:40] *= 1e-4                      # float16 subnormals
        z = torch.cat([z, adversarial_groups(400, lam, seed=int(lam))]).to(dtype)
        want = prox.prox_groups(z, lam)
        # the multi-pass kernel with its caps, and with caps that send most groups through all three
        # passes
        for run in (lambda w, h: prox_triton.prox_(w, lam, FAST_TOL, MAX_SWEEPS, h),
                    lambda w, h: prox_triton.prox_(w, lam, FAST_TOL, MAX_SWEEPS, h, caps=(1, 3))):
            got, hist = z.clone(), torch.zeros(5, dtype=torch.long)
            run(got, hist)
            assert torch.equal(got, want), (dtype, lam, int((got != want).sum()))
            assert torch.equal(hist, count_nonzeros(got)), dtype
print("OK")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real kernel is tested in test_cuda.py")
def test_triton_kernel_in_interpreter_matches_native():
    """The Triton programs run by Triton's CPU interpreter (a fresh process: the mode is fixed when
    Triton is first imported) give the native kernel's results, bit for bit, and its counts: the
    multi-pass kernel (in place, handed-on groups, groups past a pass's sweep cap), on random and
    adversarial groups (so they are never worse than the reference
    either: the native kernel is checked for that above)."""
    pytest.importorskip("triton")
    if not prox_native.available():
        pytest.skip("no C compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")] + sys.path))
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True,
                         text=True, timeout=1200, cwd=root)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-2000:]
