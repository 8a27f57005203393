"""The one-pass paths of every learning step give exactly what the plain code gives: the prox of all
layers in one C call (prox_native.prox_layers_) against the per-layer loop it replaced, and AdamW
with its CPU update in C (adamw_native) against torch.optim.AdamW."""
import pytest
import torch

from proxsparse_core.method import prox_native
from proxsparse_core.method.prox import prox_2to4_

needs_native = pytest.mark.skipif(not prox_native.available(), reason="no C compiler")


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
