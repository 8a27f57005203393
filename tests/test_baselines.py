"""One-shot baselines: verified 2:4 results, Wanda's activation weighting, SparseGPT's reconstruction."""
import threading

import pytest

from proxsparse_core.errors import Stopped
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from proxsparse_core.baselines.oneshot import METHODS
from proxsparse_core.sparsity.scores import InputNorms, wanda_score
from proxsparse_core.sparsity.masks import mask_2to4, snapshot, swapped, verify
from proxsparse_core.models.loading import LoadedModel
from proxsparse_core.sparsity.prunable import find_prunable
from proxsparse_core.baselines.sparsegpt import SparseGPTLayer


def tiny_lm(seed=0) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    return LoadedModel(model, None, "tiny", "tiny", "cpu", torch.float32, find_prunable(model), 64)


def calibration(n=6, ctx=16, seed=1):
    return torch.randint(0, 101, (n, ctx), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_baseline_gives_a_verified_2to4_model_and_restores_w0(method):
    lm = tiny_lm()
    w0 = snapshot(lm.prunable)
    result = METHODS[method].prune(lm, calibration())
    assert set(result.masks) == set(lm.prunable.names)
    for n, m in result.masks.items():
        assert m.dtype == torch.bool and m.shape == w0[n].shape
        assert (m.reshape(-1, 4).sum(1) == 2).all(), n
    # the model is back at its dense weights
    for n in lm.prunable.names:
        assert torch.equal(lm.prunable.modules[n].weight, w0[n])
    updated = result.weights is not None
    assert updated == (method == "sparsegpt")
    weights = result.weights if updated else {n: w0[n] * result.masks[n] for n in w0}
    with swapped(lm.prunable, weights, w0):
        check = verify(lm.prunable, result.masks, w0, updated_ok=updated)
        x = calibration(2)
        assert torch.isfinite(lm.model(input_ids=x).logits).all()
    assert check.ok, check.problems
    if updated:   # SparseGPT really moves the survivors
        assert any(not torch.equal(weights[n][result.masks[n]], w0[n][result.masks[n]]) for n in w0)


def test_data_driven_baselines_differ_from_magnitude_on_a_model():
    lm = tiny_lm()
    mag = METHODS["magnitude"].prune(lm, calibration()).masks
    for method in ("wanda", "sparsegpt-maskonly"):
        other = METHODS[method].prune(lm, calibration()).masks
        assert any(not torch.equal(mag[n], other[n]) for n in mag), method


def test_stop_interrupts_and_restores_the_dense_weights():
    lm = tiny_lm()
    w0 = snapshot(lm.prunable)
    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        stop.set()           # ask to stop after the first block
    with pytest.raises(Stopped):
        METHODS["sparsegpt"].prune(lm, calibration(), progress, stop)
    assert seen == [1]
    for n in lm.prunable.names:
        assert torch.equal(lm.prunable.modules[n].weight, w0[n])


def _layer_with_skewed_inputs():
    """A layer whose input channels 0 and 2 of every group carry tiny activations (×0.01) and
    slightly larger weights, so magnitude keeps them and Wanda should not."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        w = torch.full((8, 16), 1.0)
        w[:, 0::4] = 2.0
        w[:, 2::4] = 2.0
        layer.weight.copy_(w * torch.sign(torch.randn(8, 16)))
    scale = torch.ones(16)
    scale[0::4] = 0.01
    scale[2::4] = 0.01
    x = torch.randn(256, 16) * scale
    return layer, x


def test_wanda_prefers_the_channel_with_the_larger_activation_norm():
    layer, x = _layer_with_skewed_inputs()
    norms = InputNorms(layer)
    for chunk in x.split(64):
        norms.add_batch(chunk)
    assert torch.allclose(norms.sq, (x ** 2).sum(0), rtol=1e-5)
    wanda = mask_2to4(layer.weight, wanda_score(layer.weight, norms.sq))
    magnitude = mask_2to4(layer.weight)
    assert not torch.equal(wanda, magnitude)
    # magnitude keeps the big weights on the quiet channels; Wanda keeps the loud channels 1 and 3
    assert magnitude[:, 0::4].all() and magnitude[:, 2::4].all()
    assert wanda[:, 1::4].all() and wanda[:, 3::4].all()
    assert not wanda[:, 0::4].any() and not wanda[:, 2::4].any()


def test_sparsegpt_reconstructs_layer_outputs_better_than_magnitude():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, bias=False)
    # correlated inputs with uneven channel scales, as real activations are
    mix = torch.randn(64, 64) * 0.3 + torch.eye(64)
    x = torch.randn(512, 64) @ mix * torch.linspace(0.2, 3.0, 64)
    sgpt = SparseGPTLayer(layer)
    for chunk in x.split(128):
        sgpt.add_batch(chunk)
    assert torch.allclose(sgpt.H, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    w_sgpt, keep = sgpt.prune()
    w = layer.weight.detach()
    assert (keep.reshape(-1, 4).sum(1) == 2).all()
    assert (w_sgpt[~keep] == 0).all()
    dense_out = x @ w.t()
    err_sgpt = (x @ w_sgpt.t() - dense_out).pow(2).sum()
    err_mag = (x @ (w * mask_2to4(w)).t() - dense_out).pow(2).sum()
    err_mask_only = (x @ (w * keep).t() - dense_out).pow(2).sum()
    assert err_sgpt < 0.9 * err_mag, (float(err_sgpt), float(err_mag))
    assert err_sgpt < err_mask_only      # the weight update is what reduces the error


def test_cli_prune_writes_the_learn_artefacts_and_rejects_bad_methods(tmp_path, capsys):
    import json

    from proxsparse_core.runs.files import load_masks, load_recipe
    from proxsparse_core.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["prune", "--method", "nope"])
    assert exc.value.code == 2
    assert "error: argument --method" in capsys.readouterr().err
    out = tmp_path / "wanda"
    code = main(["prune", "--method", "wanda", "--device", "cpu", "--samples", "2", "--ctx", "32",
                 "--eval-ctx", "64", "--eval-windows", "2", "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"masks.npz", "recipe.json", "metrics.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["verified"] and metrics["method"] == "wanda"
    assert metrics["perplexity"]["wanda"] > metrics["perplexity"]["dense"]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["method"] == "wanda" and "--method wanda" in recipe["command"]
    assert "--lambda1" not in recipe["command"]
    assert load_recipe(out).samples == 2
    masks = load_masks(out)
    assert all((m.reshape(-1, 4).sum(1) == 2).all() for m in masks.values())
