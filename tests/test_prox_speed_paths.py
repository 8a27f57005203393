"""The fast prox paths on the CPU: the C kernel, the PyTorch fallback and (when Triton is
installed) the Triton kernel through its interpreter, against the reference schedule."""
import os
import subprocess
import sys

import pytest
import torch

from proxsparse_core import prox, prox_native
from proxsparse_core.prox import FAST_TOL, MAX_SWEEPS, count_nonzeros, objective

needs_native = pytest.mark.skipif(not prox_native.available(), reason="no C compiler for the native prox")


def _groups(dtype, seed, n=6000, sparse_share=0.5, scale=0.3):
    """Random groups, a share of them already 2:4 (as in a mid-training state), some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g) * scale
    z[torch.rand(n, generator=g) < sparse_share, 2:] = 0
    z[torch.rand(n, 4, generator=g) < 0.05] = 0
    return z[:, torch.randperm(4, generator=g)].contiguous().to(dtype)


def _not_worse(w, ref, z, lam, dtype):
    """Objective of w ≤ reference objective on every group, up to the dtype's rounding."""
    scale = z.double().abs().amax(1) ** 2
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 4 * torch.finfo(dtype).eps
    excess = objective(w, z, lam) - objective(ref, z, lam)
    assert bool((excess <= tol * scale).all()), float((excess / scale.clamp_min(1e-30)).max())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("lam", [0.25, 1.0, 20.0])
def test_native_never_worse_than_reference(dtype, lam):
    z = _groups(dtype, seed=int(10 * lam))
    fast, ref = prox.prox_groups(z, lam), prox.prox_groups(z, lam, mode="reference")
    assert fast.dtype == dtype
    _not_worse(fast, ref, z, lam, dtype)
    # 2:4 groups are their own prox: returned bit for bit
    keep = (z != 0).sum(1) <= 2
    assert torch.equal(fast[keep], z[keep])


@needs_native
@pytest.mark.parametrize("lam", [0.25, 1.0, 20.0])
def test_native_equals_pytorch_schedule(lam):
    """Same per-group iteration; only float rounding (FMA contraction) may differ."""
    z = _groups(torch.float32, seed=3)
    native = prox.prox_groups(z, lam)
    torch_path = prox._prox_cols(z, lam)
    assert float((native - torch_path).abs().max()) <= 1e-5 * float(z.abs().max())
    assert torch.equal(count_nonzeros(native), count_nonzeros(torch_path))


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
    w = (torch.randn(64, 128) * 0.3).bfloat16()
    expected = prox.prox_groups(w.float().view(-1, 4), 1.0)   # float32 result ...
    prox.prox_2to4_(w, 1.0)
    assert w.dtype == torch.bfloat16                          # ... rounded once to bf16
    assert float((w.float().view(-1, 4) - expected).abs().max()) <= 2 ** -8 * float(expected.abs().max())


def test_fallback_without_native_kernel_matches(monkeypatch):
    z = _groups(torch.float32, seed=5, n=2000)
    monkeypatch.setattr(prox_native, "available", lambda: False)
    w = z.clone().view(50, 160)
    hist = torch.zeros(5, dtype=torch.long)
    prox.prox_2to4_(w, 1.0, chunk_groups=333, hist=hist)     # chunked PyTorch schedule
    _not_worse(w.view(-1, 4), prox.prox_groups(z, 1.0, mode="reference"), z, 1.0, torch.float32)
    assert torch.equal(hist, count_nonzeros(w.view(-1, 4)))


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
import torch
from proxsparse_core import prox, prox_triton
from proxsparse_core.prox import FAST_TOL, MAX_SWEEPS, count_nonzeros
g = torch.Generator().manual_seed(11)
for dtype in (torch.float32, torch.bfloat16):
    z = torch.randn(700, 4, generator=g) * 0.3
    z[torch.rand(700, generator=g) < 0.4, 2:] = 0
    z = z.to(dtype)
    got, hist = z.clone(), torch.zeros(5, dtype=torch.long)
    prox_triton.prox_(got, 1.0, FAST_TOL, MAX_SWEEPS, hist)
    want = prox.prox_groups(z, 1.0)
    ulp = torch.finfo(dtype).eps * z.float().abs().amax(1, keepdim=True)
    assert bool(((got.float() - want.float()).abs() <= 2 * ulp + 1e-30).all()), dtype
    assert torch.equal(hist, count_nonzeros(got)), dtype
print("OK")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real kernel is tested in test_cuda.py")
def test_triton_kernel_in_interpreter_matches_native():
    """The Triton program run by Triton's CPU interpreter (a fresh process: the mode is fixed when
    Triton is first imported) gives the native kernel's results and counts."""
    pytest.importorskip("triton")
    if not prox_native.available():
        pytest.skip("no C compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([root] + sys.path))
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-2000:]
