"""Architectures whose weights are not all plain nn.Linear layers: GPT-2's Conv1D layers and a
mixture-of-experts model's fused expert tensors are pruned like linear layers and exported in their
own layout; tensors the studio cannot prune are named wherever a result claims 2:4 (load line, export
card, metrics) instead of passing silently as a 2:4 model."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from test_export import word_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FLAGS = ["--device", "cpu", "--dtype", "float32", "--samples", "8", "--ctx", "32", "--eval-ctx", "32",
         "--eval-windows", "2"]
LEARN = [*FLAGS, "--lambda1", "0.5", "--lr", "0.001"]


def _save(model, folder):
    model.config.pad_token_id = 0
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return _save(GPT2LMHeadModel(cfg).eval(), tmp_path_factory.mktemp("gpt2") / "gpt2")


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128)
    return _save(MixtralForCausalLM(cfg).eval(), tmp_path_factory.mktemp("moe") / "mixtral")


def _same_logits_and_saved_back_as_before(model, before: dict, reference, ids=None):
    """`model` (its layers swapped by linearise) computes what `reference` (the original model, or its logits on
    `ids`) does, and hf_state_dict gives back the original state dict `before`, bit for bit."""
    from proxsparse_core.sparsity.prunable import hf_state_dict

    ids = torch.randint(0, 256, (2, 24)) if ids is None else ids
    with torch.no_grad():
        expected = reference if isinstance(reference, torch.Tensor) else reference(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    saved = hf_state_dict(model)
    assert set(saved) == set(before)
    for k, v in before.items():
        assert saved[k].shape == v.shape and torch.equal(saved[k], v), k


def test_conv1d_layers_become_linear_layers_that_compute_the_same_and_save_back_as_they_were(gpt2_folder):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from proxsparse_core.sparsity.prunable import find_prunable, hf_state_dict, linearise_conv1d

    original = AutoModelForCausalLM.from_pretrained(gpt2_folder).eval()
    assert not find_prunable(original).names and find_prunable(original).coverage_note()  # Conv1D: said, not pruned
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder).eval()
    assert hf_state_dict(model) is None
    swapped = linearise_conv1d(model)
    assert len(swapped) == 8 and not any(isinstance(m, Conv1D) for m in model.modules())
    prunable = find_prunable(model)
    assert prunable.names == swapped and not prunable.left_dense
    assert prunable.modules["transformer.h.0.mlp.c_fc"].weight.shape == (256, 64)      # [out, in]
    _same_logits_and_saved_back_as_before(model, original.state_dict(), original)


def test_a_gpt2_model_is_learned_exported_and_loads_with_transformers_as_the_pruned_model(gpt2_folder, tmp_path,
                                                                                            capsys):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from proxsparse_core.cli import main
    from proxsparse_core.export import load_with_masks

    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["learn", "--model", str(gpt2_folder), *LEARN, "--steps", "3", "--out", str(run)]) == 0
    assert "8 prunable linear layers" in capsys.readouterr().out
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    convs = {n: m for n, m in exported.named_modules() if isinstance(m, Conv1D)}
    assert len(convs) == 8
    for n, m in convs.items():                  # 2:4 along the input dimension: dim 0 of Conv1D's [in, out]
        groups = m.weight.t().reshape(-1, 4)
        assert int((groups != 0).sum(1).max()) == 2, n
    lm = load_with_masks(str(gpt2_folder), run / "masks.npz", device="cpu", dtype="float32")
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, lm.model(ids).logits, rtol=1e-5, atol=1e-5)
    metrics = json.loads((out / "proxsparse" / "metrics.json").read_text())
    assert metrics["verified"] is True and metrics["left_dense"] is None


def test_fused_experts_become_one_linear_layer_per_expert_that_computes_the_same_and_folds_back(moe_folder):
    from transformers import AutoModelForCausalLM

    from proxsparse_core.sparsity.experts import UnfusedExperts
    from proxsparse_core.sparsity.prunable import find_prunable, linearise

    original = AutoModelForCausalLM.from_pretrained(moe_folder).eval()
    assert find_prunable(original).dense_share > 0.8          # fused: only attention would be pruned
    model = AutoModelForCausalLM.from_pretrained(moe_folder).eval()
    assert linearise(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert isinstance(model.model.layers[0].mlp.experts, UnfusedExperts)
    prunable = find_prunable(model)
    assert len(prunable.names) == 8 + 2 * 2 * 4                # attention + (gate_up, down) × 4 experts × 2 blocks
    assert "model.layers.1.mlp.experts.gate_up.3" in prunable.names
    assert prunable.modules["model.layers.1.mlp.experts.down.3"].weight.shape == (64, 128)   # [out, in]
    assert [n for n, _ in prunable.left_dense] == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    assert prunable.coverage_note() == ""                      # the routers are 0.2 % of the blocks
    _same_logits_and_saved_back_as_before(model, original.state_dict(), original)


@pytest.mark.parametrize("arch", ["gpt_oss", "llama4"])
def test_other_experts_layouts_unfuse_to_the_same_logits_and_fold_back_bit_for_bit(arch):
    """GPT-OSS: experts stored transposed, with biases and its own gate function; Llama 4: no layout
    flags, one stacked input [experts × tokens, hidden] scaled by the router."""
    import transformers

    from proxsparse_core.sparsity.prunable import find_prunable, linearise

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_local_experts=4, max_position_embeddings=128)
    if arch == "gpt_oss":
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**common, num_experts_per_tok=2))
    else:
        model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**common, intermediate_size_mlp=128,
                                                                             num_experts_per_tok=1))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "experts" in name:                  # Llama 4 starts gate_up_proj at zeros: make every weight count
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        reference = model(ids).logits
    assert len(linearise(model)) == 2
    prunable = find_prunable(model)
    assert sum(".experts." in n for n in prunable.names) == 2 * 2 * 4 and prunable.dense_share < 0.01
    _same_logits_and_saved_back_as_before(model, before, reference, ids)


def test_an_experts_module_the_probe_does_not_accept_stays_fused_and_is_named_dense(moe_folder):
    from transformers import AutoModelForCausalLM

    from proxsparse_core.sparsity.prunable import find_prunable, linearise

    model = AutoModelForCausalLM.from_pretrained(moe_folder).eval()
    model.model.layers[1].mlp.experts.is_transposed = True     # says a layout its own forward does not use
    assert linearise(model) == ["model.layers.0.mlp.experts"]
    assert hasattr(model.model.layers[1].mlp.experts, "gate_up_proj")
    p = find_prunable(model)
    assert "model.layers.1.mlp.experts.gate_up_proj" in [n for n, _ in p.left_dense]
    assert "stay dense" in p.coverage_note()


def test_a_moe_model_is_learned_recovered_and_exported_with_every_expert_24(moe_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from proxsparse_core.cli import main
    from proxsparse_core.export import load_with_masks

    run, rec, out = tmp_path / "run", tmp_path / "rec", tmp_path / "export"
    assert main(["learn", "--model", str(moe_folder), *LEARN, "--steps", "3", "--no-eval", "--out", str(run)]) == 0
    said = capsys.readouterr().out
    assert "24 prunable linear layers" in said and "Note:" not in said
    lm = load_with_masks(str(moe_folder), run / "masks.npz", device="cpu", dtype="float32")
    assert main(["recover", "--run", str(run), "--method", "both", "--steps", "2", "--samples", "8",
                 "--obs-dense", "0.3", "--out", str(rec)]) == 0     # experts keep their own targets
    assert main(["export", "--run", str(rec), "--out", str(out), "--no-eval"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    for i in range(2):
        experts = exported.model.layers[i].mlp.experts
        for fused in (experts.gate_up_proj, experts.down_proj):     # [experts, out, in]: 2:4 along the inputs
            assert int((fused.detach().reshape(-1, 4) != 0).sum(1).max()) == 2
        kept = experts.gate_up_proj.detach() != 0                    # recovery kept the learned mask exactly
        mask = lm.model.model.layers[i].mlp.experts
        assert torch.equal(kept, torch.stack([m.weight.detach() != 0 for m in mask.gate_up]))
    metrics = json.loads((out / "proxsparse" / "metrics.json").read_text())
    assert metrics["verified"] is True and metrics["left_dense"]["share_of_block_weights"] < 0.01
    card = (out / "README.md").read_text()          # the routers, and nothing else, are named as dense
    assert "**Not 2:4:** 2 weight tensors inside the decoder blocks (0.2% of" in card
    assert "mlp.gate.weight" in card and "experts" not in card.split("**Not 2:4:**")[1]


def test_a_moe_checkpoint_in_the_hubs_per_expert_layout_exports_in_that_layout_with_every_expert_24(moe_folder,
                                                                                                    tmp_path):
    """Mixtral checkpoints on the Hub store each expert as w1 / w2 / w3 matrices, which transformers fuses on
    loading; the export goes back through save_pretrained's own reverse conversion."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from proxsparse_core.cli import main
    from proxsparse_core.export import load_with_masks

    legacy = tmp_path / "legacy"
    shutil.copytree(moe_folder, legacy)
    fused, split = load_file(legacy / "model.safetensors"), {}
    for k, v in fused.items():
        block = k.partition(".mlp.")[0]
        if k.endswith(".mlp.experts.gate_up_proj"):           # [experts, 2·inner, hidden] = [w1; w3] per expert
            for e in range(v.shape[0]):
                gate, up = v[e].chunk(2)
                split[f"{block}.block_sparse_moe.experts.{e}.w1.weight"] = gate.contiguous()
                split[f"{block}.block_sparse_moe.experts.{e}.w3.weight"] = up.contiguous()
        elif k.endswith(".mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                split[f"{block}.block_sparse_moe.experts.{e}.w2.weight"] = v[e].contiguous()
        else:
            split[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
    save_file(split, legacy / "model.safetensors", metadata={"format": "pt"})

    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["learn", "--model", str(legacy), *LEARN, "--steps", "2", "--no-eval", "--out", str(run)]) == 0
    assert main(["export", "--run", str(run), "--out", str(out), "--no-eval"]) == 0
    saved = load_file(out / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in saved and not any("gate_up" in k for k in saved)
    for k, v in saved.items():
        if ".experts." in k:
            assert int((v.reshape(-1, 4) != 0).sum(1).max()) == 2, k
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    lm = load_with_masks(str(legacy), run / "masks.npz", device="cpu", dtype="float32")
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, lm.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_an_expert_the_router_never_chose_is_pruned_by_magnitude_with_no_update():
    from proxsparse_core.baselines.sparsegpt import SparseGPTLayer
    from proxsparse_core.sparsity.masks import mask_2to4
    from proxsparse_core.sparsity.scores import ChannelNorms, wanda_score

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=False)
    w = layer.weight.detach()
    by_magnitude = mask_2to4(w)
    updated, kept = SparseGPTLayer(layer).prune()               # no add_batch: it read no token
    assert torch.equal(kept, by_magnitude) and torch.equal(updated, w * by_magnitude)
    given = mask_2to4(torch.rand_like(w))
    updated, kept = SparseGPTLayer(layer).prune(keep=given)
    assert torch.equal(kept, given) and torch.equal(updated, w * given)
    assert wanda_score(w, torch.zeros(16)) is None              # ranked by |W|, not by 0 · |W|
    assert wanda_score(w, torch.ones(16)) is not None

    class One:
        names, modules = ["x"], {"x": layer}
    norms = ChannelNorms(One())
    assert torch.equal(norms.weights()["x"], torch.ones(16))


def test_a_model_of_linear_layers_only_gets_no_dense_note(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from proxsparse_core.sparsity.prunable import find_prunable

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    p = find_prunable(model)
    assert len(p.names) == 14 and not p.left_dense and p.dense_share == 0 and p.coverage_note() == ""


def test_blocks_that_take_their_arguments_by_position_are_pruned_block_by_block(tmp_path, capsys):
    """RecurrentGemma calls each block with position ids and the mask as positional arguments: SparseGPT
    (which runs the model block by block) must hand them on, then recovery's OBS update too."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    from proxsparse_core.cli import main

    torch.manual_seed(0)
    cfg = RecurrentGemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=1, lru_width=64, head_dim=16)
    folder = _save(RecurrentGemmaForCausalLM(cfg).eval(), tmp_path / "rg")
    run, rec = tmp_path / "sgpt", tmp_path / "rec"
    assert main(["prune", "--method", "sparsegpt", "--model", str(folder), *FLAGS, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "every pruned weight is zero" in out and "sparsegpt" in out
    assert main(["recover", "--run", str(run), "--method", "obs", "--out", str(rec), "--no-eval"]) == 0
    assert (rec / "weights.safetensors").is_file()


def test_a_failure_nobody_foresaw_is_one_line_on_the_cli(gpt2_folder, tmp_path, monkeypatch, capsys):
    from proxsparse_core.baselines import oneshot
    from proxsparse_core.cli import TRACEBACK_ENV, main

    def broken(*a, **k):
        raise TypeError("Block.forward() missing 2 required positional arguments\nsecond line")

    monkeypatch.setattr(oneshot, "_run_block", broken)
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert main(["prune", "--method", "wanda", "--model", str(gpt2_folder), *FLAGS,
                 "--out", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: `prune` failed: TypeError: Block.forward() missing 2 required positional")
    assert "Traceback" not in err and "second line" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(TypeError):
        main(["prune", "--method", "wanda", "--model", str(gpt2_folder), *FLAGS, "--out", str(tmp_path / "w2")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpt2_model_learns_on_the_gpu_and_its_export_generates_through_the_24_kernels(tmp_path, capsys):
    """On CUDA: GPT-2's Conv1D layers learn through the Triton prox like any linear layer, and the export
    (Conv1D again on disk) comes back from load_for_generation with all 8 as 2:4 kernels whose next-token
    logits match the dense product's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from proxsparse_core.cli import main
    from proxsparse_core.inference import decode24 as d24
    from proxsparse_core.sparsity.prunable import find_prunable

    torch.manual_seed(0)
    folder = _save(GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=512, n_layer=2, n_head=8, n_positions=128)),
                   tmp_path / "gpt2")
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["learn", "--model", str(folder), "--device", "cuda", "--dtype", "bfloat16", "--samples", "8",
                 "--ctx", "32", "--eval-ctx", "32", "--eval-windows", "2", "--steps", "3", "--out", str(run)]) == 0
    assert "every survivor equals W0" in capsys.readouterr().out
    assert main(["export", "--run", str(run), "--out", str(out), "--no-eval"]) == 0
    loaded, _, done = d24.load_for_generation(str(out))
    assert done == find_prunable(loaded).names and len(done) == 8
    ids = torch.randint(2, 256, (1, 12), device="cuda")
    with torch.no_grad():
        gen = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        sparse = loaded(input_ids=ids).logits[:, -1].float()
        d24.restore_dense(loaded)
        dense = loaded(input_ids=ids).logits[:, -1].float()
    assert gen.shape[1] == 16
    assert float((sparse - dense).norm() / dense.norm()) <= 2e-2
