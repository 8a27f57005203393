"""The one-pass paths of a run's end and of every learning step give exactly what the plain code gives:
mask extraction and verification (sparsity/masks_native.py, and masks.py's PyTorch path) against a
straightforward reference on a tiny model, the in-place W0·mask swap against pruned_weights, the
prox of all layers in one C call (prox_native.prox_layers_) against the per-layer loop it replaced,
and AdamW with its CPU update in C (adamw_native) against torch.optim.AdamW."""
import pytest
import torch

from proxsparse_core.method import prox_native
from proxsparse_core.method.prox import prox_2to4_
from proxsparse_core.sparsity import masks_native
from proxsparse_core.sparsity.masks import (Verification, clean_and_count, extract_masks, masked, pruned_weights,
                                            snapshot, swapped, verify)
from proxsparse_core.sparsity.prunable import find_prunable

needs_native = pytest.mark.skipif(not prox_native.available(), reason="no C compiler")


# ------------------------------------------------------------------------------ references
def reference_mask(w: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """Top-2 of every group of 4 by a stable descending sort of |w| (or |w|·a): NaN first, ties to the
    lower index."""
    s = w.detach().float().abs()
    if cols is not None:
        s = s * cols.unsqueeze(0)
    groups = s.reshape(-1, 4)
    keep = torch.zeros(groups.shape, dtype=torch.bool)
    for g in range(groups.shape[0]):
        order = sorted(range(4), key=lambda k: (0 if torch.isnan(groups[g, k]) else 1,
                                                -float(groups[g, k]) if not torch.isnan(groups[g, k]) else 0, k))
        keep[g, order[:2]] = True
    return keep.view(w.shape)


def reference_verify(prunable, masks, originals, updated_ok=False) -> Verification:
    """verify() as it was written before it read each weight in one pass."""
    groups = bad = changed = 0
    problems = []
    for n in prunable.names:
        w = prunable.modules[n].weight.detach().cpu()
        m = masks[n]
        g = w.reshape(-1, 4)
        groups += g.shape[0]
        b = int(((g != 0).sum(1) > 2).sum())
        if b:
            bad += b
            problems.append(f"{n}: {b} groups with > 2 non-zeros")
        if bool((w[~m] != 0).any()):
            problems.append(f"{n}: pruned positions are not zero")
        nonfinite = int((~torch.isfinite(w)).sum())
        if nonfinite:
            problems.append(f"{n}: {nonfinite} weights are NaN or infinite")
        if not updated_ok:
            c = int((w[m] != originals[n][m]).sum())
            if c:
                changed += c
                problems.append(f"{n}: {c} survivors differ from W0")
    return Verification(not problems, groups, bad, changed, problems, updated_ok)


def _model(dtype):
    from conftest import make_tiny_llama

    model = make_tiny_llama(hidden=32, inter=64, layers=1).to(dtype)
    ps = find_prunable(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                     # learned-like weights: zeros, ties, a NaN, an inf
        for i, n in enumerate(ps.names):
            w = ps.modules[n].weight
            w.copy_(torch.randint(-3, 4, w.shape, generator=g).to(dtype) * 0.25)   # many ties and zeros
            w.view(-1)[7 * i + 1] = float("nan")
            w.view(-1)[5 * i + 2] = float("inf") if i % 2 else -float("inf")
    cols = {n: torch.rand(ps.modules[n].weight.shape[1], generator=g) + 0.01 for n in ps.names}
    for n in ps.names[::3]:
        cols[n][:4] = 1.0                      # equal column weights: ties survive the weighting
    return model, ps, cols


@pytest.fixture(params=["native", "pytorch"])
def path(request, monkeypatch):
    if request.param == "pytorch":
        monkeypatch.setenv("PROXSPARSE_NATIVE", "0")
    elif not masks_native.supports(torch.zeros(4, 4)):
        pytest.skip("no C compiler")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_extraction_matches_a_stable_sort_with_ties_zeros_nan_and_inf(path, dtype, weighted):
    _, ps, cols = _model(dtype)
    got = extract_masks(ps, cols if weighted else None)
    for n in ps.names:
        w = ps.modules[n].weight.detach()
        assert got[n].dtype == torch.bool and got[n].device.type == "cpu"
        assert torch.equal(got[n], reference_mask(w, cols[n] if weighted else None)), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clean_and_count_is_nan_to_num_and_the_non_zero_histogram(path, dtype):
    _, ps, _ = _model(dtype)
    weights = ps.weights()
    want_w = {n: torch.nan_to_num(w.detach(), nan=0.0, posinf=0.0, neginf=0.0) for n, w in weights.items()}
    want = sum(((w.reshape(-1, 4) != 0).sum(1)).bincount(minlength=5) for w in want_w.values())
    got = clean_and_count(weights)
    assert torch.equal(got, want)
    assert all(torch.equal(weights[n].detach(), want_w[n]) for n in weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("updated_ok", [False, True])
def test_verification_gives_the_reference_verdict_on_good_and_broken_models(path, dtype, updated_ok):
    model, ps, _ = _model(dtype)
    with torch.no_grad():
        for w in ps.weights().values():
            torch.nan_to_num_(w, nan=0.5, posinf=1.0, neginf=-1.0)
    w0 = snapshot(ps)
    masks = extract_masks(ps)
    names = ps.names

    def both():
        return verify(ps, masks, w0, updated_ok), reference_verify(ps, masks, w0, updated_ok)

    with swapped(ps, pruned_weights(w0, masks), w0):
        got, want = both()
        assert got == want and got.ok
        with torch.no_grad():
            w = ps.modules[names[0]].weight
            w.view(-1, 4)[0] = 1.0                                     # a dense group (pruned positions too)
            ps.modules[names[1]].weight.view(-1)[masks[names[1]].view(-1).nonzero()[0]] += 1.0  # a changed survivor
            ps.modules[names[2]].weight.view(-1)[masks[names[2]].view(-1).nonzero()[1]] = float("nan")
            ps.modules[names[3]].weight.view(-1)[(~masks[names[3]]).view(-1).nonzero()[0]] = float("-inf")
        got, want = both()
        assert got == want and not got.ok and len(got.problems) >= 4


def test_the_in_place_swap_is_pruned_weights_and_restores_w0(tiny_llama):
    ps = find_prunable(tiny_llama)
    w0 = snapshot(ps)
    masks = extract_masks(ps)
    want = pruned_weights(w0, masks)
    where = {n: ps.modules[n].weight.data_ptr() for n in ps.names}
    with masked(ps, masks, w0):
        for n in ps.names:
            assert torch.equal(ps.modules[n].weight.detach(), want[n])
            assert ps.modules[n].weight.data_ptr() == where[n]
    assert all(torch.equal(ps.modules[n].weight.detach(), w0[n]) for n in ps.names)
    with pytest.raises(KeyboardInterrupt):
        with masked(ps, masks, w0):
            raise KeyboardInterrupt
    assert all(torch.equal(ps.modules[n].weight.detach(), w0[n]) for n in ps.names)


# ------------------------------------------------------------------------------ the prox of a step
def _per_layer(weights: list, lams: list, cols: list | None) -> torch.Tensor:
    """The learner's prox loop before it became one call."""
    rows = []
    for j, w in enumerate(weights):
        row = torch.zeros(5, dtype=torch.long)
        if cols is None:
            prox_2to4_(w, lams[j], hist=row)
        else:
            a = cols[j].unsqueeze(0)
            v = w.float() * a
            prox_2to4_(v, lams[j], hist=row)
            w.copy_(v.div_(a))
        rows.append(row)
    return torch.stack(rows)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_prox_of_all_layers_in_one_call_is_bit_identical_to_the_loop(dtype, weighted):
    g = torch.Generator().manual_seed(11)
    shapes = [(48, 64), (64, 48), (7, 40000 // 7 // 4 * 4), (96, 128)]    # one layer of several chunks
    weights = [torch.randn(s, generator=g).to(dtype) * 0.3 for s in shapes]
    for w in weights[::2]:                               # some groups already 2:4 or sparser
        w.view(-1, 4)[::3, 2:] = 0
        w.view(-1, 4)[::5, 1:] = 0
    lams = [0.4, 0.0, 1.5, 0.05]
    cols = [torch.rand(s[1], generator=g) * 3 + 0.01 for s in shapes] if weighted else None
    ours = [w.clone() for w in weights]
    want = _per_layer(weights, lams, cols)
    assert prox_native.layers_supported(ours, cols)
    got = prox_native.prox_layers_(ours, lams, *_tol(), cols)
    assert torch.equal(got, want)
    for mine, theirs in zip(ours, weights):
        assert torch.equal(mine.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           theirs.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def _tol():
    from proxsparse_core.method.prox import FAST_TOL, MAX_SWEEPS
    return FAST_TOL, MAX_SWEEPS


def test_layers_the_one_call_does_not_take_go_through_the_loop():
    assert not prox_native.layers_supported([torch.zeros(4, 8, dtype=torch.float16)])
    assert not prox_native.layers_supported([torch.zeros(8, 4).t()])
    assert not prox_native.layers_supported([torch.zeros(4, 8)], [torch.zeros(4)])
    assert not prox_native.layers_supported([torch.zeros(4, 8)], [torch.zeros(8, dtype=torch.float64)])


# ------------------------------------------------------------------------------ AdamW
def _adam_run(cls, dtype=torch.float32, steps=6, weight_decay=0.0):
    from proxsparse_core.method.training import lr_factor

    g = torch.Generator().manual_seed(4)
    shapes = [(33, 12), (5,), (130, 64), (7, 3)]
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(dtype)) for s in shapes]
    opt = cls([{"params": [p], "lr": 1e-2 * (i + 1)} for i, p in enumerate(params)], lr=1e-2,
              weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps, 2, "cosine"))
    for k in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (i == 3 and k % 2) else (torch.randn(p.shape, generator=g) * 1e-3).to(dtype)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return params, opt


@needs_native
@pytest.mark.parametrize("dtype,weight_decay", [(torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.float32, 0.1)])
def test_adamw_gives_torch_adamws_bits_every_step(dtype, weight_decay):
    from proxsparse_core.method import adamw_native

    assert adamw_native.agrees(), "the kernel should reproduce torch's AdamW on this machine"
    want, want_opt = _adam_run(torch.optim.AdamW, dtype, weight_decay=weight_decay)
    got, got_opt = _adam_run(adamw_native.AdamW, dtype, weight_decay=weight_decay)
    fast = dtype == torch.float32 and weight_decay == 0
    assert (got_opt._scratch is not None) == fast, "the kernel ran exactly where it applies"
    for a, b in zip(want, got):
        assert torch.equal(a.detach(), b.detach())
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(want_opt.state[a][key], got_opt.state[b][key])
