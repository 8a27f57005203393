"""A model split over devices by accelerate (device_map): learning, verification and export.

On a machine with a GPU the tiny model's second decoder block, final norm and head go to cuda:0
and the rest stays on the CPU; without one, accelerate still dispatches the model with its hooks
(force_hooks) over the CPU, which is the code path a split model takes through the learner."""
import torch

from conftest import TinyTokenizer, make_tiny_llama
from test_export import word_tokenizer
from proxsparse_core.config import RunConfig
from proxsparse_core.data.text import Data
from proxsparse_core.method.learner import ProxSparseLearner
from proxsparse_core.sparsity.masks import snapshot, verify
from proxsparse_core.models.loading import LoadedModel
from proxsparse_core.sparsity.prunable import find_prunable
from proxsparse_core.results import LEARNED, Pruning

SECOND = "cuda:0" if torch.cuda.is_available() else "cpu"


def _split_model():
    from accelerate import dispatch_model

    model = make_tiny_llama(layers=2)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": SECOND, "model.norm": SECOND, "lm_head": SECOND}
    model = dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=True)
    return LoadedModel(model, word_tokenizer(), "tiny", "tiny-split", "auto", torch.float32,
                       find_prunable(model), 512)


def _run(lm):
    cfg = RunConfig(lambda1=0.5, lr=1e-3, steps=4, ctx=32, layer_stats_every=1, seed=0)
    samples = torch.randint(2, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    return ProxSparseLearner(lm, cfg, samples).run()


def test_learning_a_split_model_keeps_every_layer_on_its_device_and_verifies():
    lm = _split_model()
    where = {n: lm.prunable.modules[n].weight.device for n in lm.prunable.names}
    assert {str(d) for d in where.values()} == {"cpu", str(torch.device(SECOND))}
    before = snapshot(lm.prunable)
    result = _run(lm)
    assert result.status == "finished" and result.steps_done == 4
    for n in lm.prunable.names:            # restored to W0, each on its own device
        w = lm.prunable.modules[n].weight
        assert w.device == where[n] and torch.equal(w.detach().cpu(), before[n])
    ev = result.events[-1]
    if SECOND != "cpu":                    # memory reported per device
        assert set(ev.mem_by_device) == {"cpu", "cuda:0"}
    check = verify(lm.prunable, result.masks, before)
    assert not check.ok                    # the model itself is still dense …
    for n, m in result.masks.items():      # … and every mask is exactly 2 of 4
        assert bool((m.reshape(-1, 4).sum(1) == 2).all())


def test_a_split_run_chooses_the_same_mask_as_one_device():
    split = _run(_split_model()).masks
    whole = make_tiny_llama(layers=2)
    one = _run(LoadedModel(whole, TinyTokenizer(), "tiny", "tiny", "cpu", torch.float32, find_prunable(whole), 512))
    same = sum(int((split[n] == one.masks[n]).sum()) for n in split)
    total = sum(m.numel() for m in split.values())
    assert same / total >= 0.999


def test_a_split_model_exports_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from proxsparse_core.runs.export import export_result
    from proxsparse_core.workspace import Workspace

    lm = _split_model()
    result = _run(lm)
    ws = Workspace()
    ws.lm, ws.originals = lm, snapshot(lm.prunable)
    ws.data = Data(torch.randint(2, 256, (4, 32)), torch.randint(2, 256, (2, 32)), "random", 128, 64)
    ws.results[LEARNED] = Pruning(LEARNED, result.masks)
    assert ws.verify(LEARNED).ok
    res = export_result(ws, LEARNED, tmp_path / "out", evaluate=False)
    assert res.metrics["verified"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for n in lm.prunable.names:
        w = dict(reloaded.named_parameters())[n + ".weight"].detach()
        assert torch.equal(w, ws.originals[n] * result.masks[n])


def test_device_map_auto_loads_through_accelerate_and_learns(tmp_path):
    """The loader's own path: device_map=auto with max_memory (on a CPU machine the whole model
    goes to the CPU, dispatched by accelerate); a bad max_memory is one line."""
    import pytest

    from proxsparse_core.errors import UserError
    from proxsparse_core.config import parse_max_memory
    from proxsparse_core.workspace import Workspace
    from test_export import save_tiny_model, tiny_cfg

    assert parse_max_memory("0=70GiB, cpu=200GiB") == {0: "70GiB", "cpu": "200GiB"}
    with pytest.raises(UserError, match="not DEVICE=SIZE"):
        parse_max_memory("0=lots")
    with pytest.raises(UserError, match="not DEVICE=SIZE"):
        tiny_cfg("x", device_map="auto", max_memory="gpu=1GiB").validate()
    if torch.cuda.is_available():
        return                               # covered on a GPU machine by bench/split_step.py
    folder = save_tiny_model(tmp_path / "tiny")
    ws = Workspace()
    cfg = tiny_cfg(folder, device_map="auto", max_memory="cpu=2GiB")
    res = ws.learn(cfg)
    assert res.steps_done == cfg.steps and ws.verify(LEARNED).ok
