"""fp32 master weights on a bf16 model (issue 29): AdamW and the prox act on float32 copies of the
prunable weights, and an update below bf16's resolution accumulates there until it moves the model."""
import pytest
import torch

from proxsparse_core.config import RunConfig
from proxsparse_core.method.learner import ProxSparseLearner
from proxsparse_core.sparsity.masks import snapshot

# |w| ≥ 2⁻⁶: bf16 values there are 2⁻¹³ or more apart, so a change below 2⁻¹⁴ ≈ 6.1e-5 rounds back to
# w. Adam moves a weight by at most about 3.2·lr per step (lr·(1−β1)/√(1−β2) for a sudden gradient),
# so with lr = 1e-5 every single update is below bf16's resolution on these weights.
LARGE = 2.0 ** -6
LR = 1e-5
STEPS = 40


def _bf16_run(tiny_lm, monkeypatch, device="cpu", **kw):
    """A bf16 run with λ1 = 0 on one repeated sample (steady gradients); returns the result, W0, the
    model's bf16 weights after every step, and AdamW's parameters after its first step."""
    tiny_lm.model.to(device=device, dtype=torch.bfloat16)
    tiny_lm.dtype, tiny_lm.device = torch.bfloat16, device
    w0 = snapshot(tiny_lm.prunable)
    after, first = [], {}
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        out = real_step(self, *a, **k)
        if not first:
            first["params"] = [p.detach().to("cpu", copy=True) for g in self.param_groups
                               for p in g["params"]]
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)

    def on_event(e):
        after.append({n: w.detach().to("cpu", copy=True) for n, w in tiny_lm.prunable.weights().items()})
    sample = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    cfg = RunConfig(steps=STEPS, lr=LR, lambda1=0.0, warmup=0.0, samples=1, **kw)
    res = ProxSparseLearner(tiny_lm, cfg, sample, on_event).run()
    assert res.status == "finished"
    return res, w0, after, first["params"]


def test_on_a_bf16_model_adamw_and_the_prox_act_on_float32_copies(tiny_lm, monkeypatch):
    res, w0, after, params = _bf16_run(tiny_lm, monkeypatch)
    assert res.master_weights == "fp32"
    assert len(params) == len(tiny_lm.prunable.names)
    assert all(p.dtype == torch.float32 for p in params), "AdamW must update float32 copies"
    for n, w in tiny_lm.prunable.weights().items():      # the model stays bf16 and is W0 again afterwards
        assert w.dtype == torch.bfloat16 and torch.equal(w, w0[n]), n
    assert all(w.dtype == torch.bfloat16 for w in after[-1].values())


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_updates_below_bf16_resolution_accumulate_in_the_copy_and_then_move_the_model(tiny_lm, monkeypatch, device):
    res, w0, after, params = _bf16_run(tiny_lm, monkeypatch, device)
    names = list(tiny_lm.prunable.names)
    large = {n: w0[n].float().abs() >= LARGE for n in names}
    total = sum(int(m.sum()) for m in large.values())
    assert total > 1000
    # step 1: the copy moved on (nearly) every large weight, by less than bf16 can show there
    moved = sum(int(((p - w0[n].float()) != 0)[large[n]].sum()) for n, p in zip(names, params))
    step = max(float((p - w0[n].float())[large[n]].abs().max()) for n, p in zip(names, params))
    assert moved > 0.9 * total and 0 < step < 2.0 ** -14
    # … so the model's bf16 weights did not change there after step 1
    assert all(torch.equal(after[0][n][large[n]], w0[n][large[n]]) for n in names)
    # by the last step the accumulated updates moved many of them in the model
    changed = sum(int((after[-1][n] != w0[n])[large[n]].sum()) for n in names)
    assert changed > 0.2 * total, f"only {changed} of {total} large weights moved"


def test_without_master_weights_bf16_loses_those_updates(tiny_lm, monkeypatch):
    """The same run with master_weights off (AdamW on the bf16 weights themselves): every update of a
    large weight is rounded away, step after step, and none of them ever moves."""
    res, w0, after, params = _bf16_run(tiny_lm, monkeypatch, master_weights="off")
    assert res.master_weights == "none" and all(p.dtype == torch.bfloat16 for p in params)
    for n in tiny_lm.prunable.names:
        large = w0[n].float().abs() >= LARGE
        assert torch.equal(after[-1][n][large], w0[n][large]), n


def test_a_float32_model_needs_no_copy(tiny_lm, monkeypatch):
    """On a float32 model the optimizer updates the model's own weights (no copy, no extra memory)."""
    from proxsparse_core.method import training
    seen = {}
    real_init = training.MaskedTraining.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        seen.update(masters=dict(self.masters), same=all(self.params[n] is w for n, w in self.weights.items()))
    monkeypatch.setattr(training.MaskedTraining, "__init__", spy)
    cfg = RunConfig(steps=2, lr=1e-3, lambda1=1.0)
    res = ProxSparseLearner(tiny_lm, cfg, torch.randint(0, 256, (4, 32))).run()
    assert res.status == "finished" and res.master_weights == "none"
    assert seen == {"masters": {}, "same": True}


@pytest.mark.parametrize("value", ["fp16", "on", ""])
def test_master_weights_takes_fp32_or_off(value):
    from proxsparse_core.errors import UserError
    with pytest.raises(UserError, match="master_weights must be one of fp32, off"):
        RunConfig(master_weights=value).validate()


def test_the_memory_check_counts_the_copies(tiny_lm):
    """16 bytes of training state per prunable weight with the copies (copy, its float32 gradient,
    float32 moments) instead of 6 (bf16 gradient and moments): the estimate grows by 10 per weight."""
    from proxsparse_core.models import budget
    tiny_lm.model.to(torch.bfloat16)
    tiny_lm.dtype = torch.bfloat16
    n = tiny_lm.prunable.n_params
    with_copy = budget.estimate_learning_memory(tiny_lm, RunConfig())
    plain = budget.estimate_learning_memory(tiny_lm, RunConfig(master_weights="off"))
    assert with_copy.weights_state - plain.weights_state == 10 * n
    tiny_lm.model.to(torch.float32)
    tiny_lm.dtype = torch.float32
    assert (budget.estimate_learning_memory(tiny_lm, RunConfig()).weights_state
            == budget.estimate_learning_memory(tiny_lm, RunConfig(master_weights="off")).weights_state)
