"""The 2:4 proximal operator : optimality, edge cases, dtypes, and fast vs reference."""
import itertools

import pytest
import torch

from proxsparse_core.method.prox import objective, prox_2to4_, prox_groups, regulariser


def _cd(a, lam, sweeps=3000):
    """Plain coordinate minimisation from a given start (support = non-zeros of a)."""
    w = a.clone()
    for _ in range(sweeps):
        for i in range(4):
            others = [j for j in range(4) if j != i]
            s = sum(w[j] * w[k] for j, k in itertools.combinations(others, 2))
            w[i] = max(float(a[i] - lam * s), 0.0) if a[i] > 0 else 0.0
    return w


def brute_force(z: torch.Tensor, lam: float, n: int = 60) -> float:
    """Lowest objective found by exhaustive grids over every support of size 2, 3 and 4
    (the last coordinate of each support in closed form), refined by coordinate descent."""
    a, _ = z.abs().double().sort(descending=True)
    best = 0.5 * float(a[2] ** 2 + a[3] ** 2)          # keep 2
    g = [torch.linspace(0, float(a[i]), n, dtype=torch.float64) for i in range(4)]
    # keep 3: grid (w1, w2), w3 = max(a3 - λ w1 w2, 0)
    w1, w2 = torch.meshgrid(g[0], g[1], indexing="ij")
    w3 = (a[2] - lam * w1 * w2).clamp_min(0)
    o3 = 0.5 * ((w1 - a[0]) ** 2 + (w2 - a[1]) ** 2 + (w3 - a[2]) ** 2 + a[3] ** 2) + lam * w1 * w2 * w3
    ref = _cd(torch.tensor([float(a[0]), float(a[1]), float(a[2]), 0.0], dtype=torch.float64), lam)
    cand = [float(o3.min()), float(objective(ref, a, lam))]
    # keep 4: grid (w1, w2, w3), w4 in closed form
    m = n // 2
    h = [torch.linspace(0, float(a[k]), m, dtype=torch.float64) for k in range(3)]
    v1, v2, v3 = torch.meshgrid(*h, indexing="ij")
    v4 = (a[3] - lam * (v1 * v2 + v1 * v3 + v2 * v3)).clamp_min(0)
    w = torch.stack([v1, v2, v3, v4], -1)
    cand.append(float((0.5 * ((w - a) ** 2).sum(-1) + lam * regulariser(w)).min()))
    cand.append(float(objective(_cd(a.clone(), lam), a, lam)))
    return min([best] + cand)


@pytest.mark.parametrize("lam", [0.05, 0.3, 1.0, 3.0])
def test_objective_within_brute_force_and_every_candidate(lam):
    torch.manual_seed(int(lam * 100))
    z = torch.randn(12, 4, dtype=torch.float64)
    w = prox_groups(z, lam)
    ours = objective(w, z, lam)
    for g in range(z.shape[0]):
        assert float(ours[g]) <= brute_force(z[g], lam) + 1e-6
        # never worse than the trivial candidates: keep-2 and the input itself
        a, idx = z[g].abs().sort(descending=True)
        keep2 = torch.zeros(4, dtype=torch.float64)
        keep2[idx[:2]] = z[g][idx[:2]]
        assert float(ours[g]) <= float(objective(keep2, z[g], lam)) + 1e-12
        assert float(ours[g]) <= float(objective(z[g], z[g], lam)) + 1e-12


def test_lambda_zero_returns_input():
    z = torch.randn(100, 4)
    assert torch.equal(prox_groups(z, 0.0), z)


def test_large_lambda_leaves_at_most_two_nonzeros_and_keeps_the_two_largest():
    torch.manual_seed(1)
    z = torch.randn(5000, 4)
    w = prox_groups(z, 1e3)
    assert int(((w != 0).sum(1) > 2).sum()) == 0
    top2 = z.abs().topk(2, dim=1).indices
    assert torch.equal(w.gather(1, top2), z.gather(1, top2))


def test_signs_never_flip_and_zeros_stay_zero():
    torch.manual_seed(2)
    z = torch.randn(4000, 4)
    z[torch.rand_like(z) < 0.2] = 0
    for lam in (0.1, 1.0, 10.0):
        w = prox_groups(z, lam)
        assert bool(((w * z) >= 0).all())
        assert bool((w[z == 0] == 0).all())
        assert bool((w.abs() <= z.abs() + 1e-7).all())  # a prox of this R only shrinks


def test_order_of_magnitudes_is_kept():
    torch.manual_seed(3)
    z = torch.randn(2000, 4)
    w = prox_groups(z, 0.7)
    za, wa = z.abs(), w.abs()
    for i, j in itertools.permutations(range(4), 2):
        bigger = za[:, i] > za[:, j]
        assert bool((wa[bigger, i] >= wa[bigger, j]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [0.25, 1.0, 20.0])
def test_fast_never_worse_than_reference(dtype, lam):
    torch.manual_seed(4)
    W = (torch.randn(64, 256) * 0.3).to(dtype)
    z = W.view(-1, 4)
    fast = prox_groups(z, lam, mode="fast")
    ref = prox_groups(z, lam, mode="reference")
    assert fast.dtype == dtype
    of, orf = objective(fast, z, lam), objective(ref, z, lam)
    tol = 1e-9 if dtype == torch.float32 else 1e-2 * float(z.float().abs().max()) ** 2
    assert bool((of <= orf + tol).all()), float((of - orf).max())


def test_in_place_on_a_weight_matrix_in_chunks():
    torch.manual_seed(5)
    W = torch.randn(32, 64)
    expected = prox_groups(W.view(-1, 4), 0.5).view(32, 64)
    w = W.clone()
    prox_2to4_(w, 0.5, chunk_groups=7)  # several uneven chunks
    assert torch.equal(w, expected)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        prox_2to4_(torch.randn(4, 6), 1.0)
    with pytest.raises(ValueError):
        prox_groups(torch.randn(3, 4), -1.0)
    with pytest.raises(ValueError):
        prox_groups(torch.randn(3, 4), float("nan"))
