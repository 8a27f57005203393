"""Issue 31: on a CPU that multiplies bfloat16 natively, learning's forward passes of a float32 model run
under bf16 autocast (RunConfig.cpu_autocast "auto"); the weights, AdamW and the mask stay float32 and
2:4, every other case (setting off, a bf16 model, a GPU, a CPU without native bf16) stays float32."""
import pytest
import torch

from proxsparse_core.config import RunConfig
from proxsparse_core.errors import UserError
from proxsparse_core.method import training
from proxsparse_core.method.learner import ProxSparseLearner
from proxsparse_core.sparsity.masks import snapshot
from test_ui_tiny_model import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.mark.parametrize("native", [True, False])
def test_autocast_only_for_float32_models_on_a_cpu_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    on = "bf16" if native else "off"
    assert training.autocast_mode("auto", "cpu", torch.float32) == on
    assert training.autocast_mode("off", "cpu", torch.float32) == "off"
    assert training.autocast_mode("auto", "cpu", torch.bfloat16) == "off"
    assert training.autocast_mode("auto", "cuda", torch.float32) == "off"
    assert training.autocast_mode("auto", "cuda:0", torch.float32) == "off"


def test_cpu_autocast_takes_auto_or_off():
    with pytest.raises(UserError, match="cpu_autocast"):
        RunConfig(cpu_autocast="always").validate()


def _run(tiny_lm, monkeypatch, setting):
    """A short float32 run on a CPU said to have native bf16; records whether each forward pass of the
    model ran under CPU autocast, and the dtype of the parameters AdamW updates."""
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    tiny_lm.model.to(dtype=torch.float32)
    seen, params = [], []
    hook = tiny_lm.model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        params.extend(p.dtype for g in self.param_groups for p in g["params"])
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    w0 = snapshot(tiny_lm.prunable)
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = RunConfig(steps=3, lr=1e-2, lambda1=0.5, samples=4, cpu_autocast=setting)
    try:
        res = ProxSparseLearner(tiny_lm, cfg, samples).run()
    finally:
        hook.remove()
    return res, seen, params, w0


def test_learning_runs_its_forward_passes_in_bf16_and_keeps_float32_weights(tiny_lm, monkeypatch):
    res, seen, params, w0 = _run(tiny_lm, monkeypatch, "auto")
    assert res.status == "finished" and res.autocast == "bf16"
    assert seen and all(seen), "every training forward pass runs under autocast"
    assert params and all(d == torch.float32 for d in params), "AdamW updates float32 weights"
    for n, w in tiny_lm.prunable.weights().items():       # the model comes back float32 and exactly W0
        assert w.dtype == torch.float32 and torch.equal(w, w0[n]), n
    for m in res.masks.values():                            # and the mask is 2:4
        assert (m.reshape(-1, 4).sum(1) == 2).all()


def test_setting_off_keeps_every_forward_pass_float32(tiny_lm, monkeypatch):
    res, seen, _, _ = _run(tiny_lm, monkeypatch, "off")
    assert res.status == "finished" and res.autocast == "off"
    assert seen and not any(seen)


def test_held_out_scores_use_bf16_products_only_where_learning_does(tiny_dir, monkeypatch):
    """The workspace scores with bf16 products under the same rule; switching the setting drops the
    scores of the other precision instead of mixing them in one table."""
    from proxsparse_core.workspace import Workspace
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    seen = []
    ws = Workspace()
    base = dict(model=str(tiny_dir), device="cpu", dtype="float32", samples=4, ctx=32, eval_ctx=32, eval_windows=2)
    ws.load(RunConfig(**base))
    assert ws.scoring == "bf16"
    hook = ws.lm.model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    bf16 = ws.perplexity("dense")
    assert seen and all(seen)
    ws.load(RunConfig(**base, cpu_autocast="off"))
    assert ws.scoring == "off" and "dense" not in ws.ppl        # the bf16 score is not kept
    seen.clear()
    fp32 = ws.perplexity("dense")
    hook.remove()
    assert seen and not any(seen)
    assert abs(bf16 - fp32) / fp32 < 0.05                      # the same perplexity, to bf16's precision
