"""Integration on the bundled real model (SmolLM2-135M-Instruct, offline, CPU)."""
import pytest
import torch

from proxsparse_core.config import RunConfig
from proxsparse_core.inference.evaluate import GenerationSettings
from proxsparse_core.results import DENSE
from proxsparse_core.workspace import Workspace


@pytest.fixture(scope="module")
def ws():
    w = Workspace()
    w.load(RunConfig(samples=4, ctx=64, eval_ctx=128, eval_windows=4, steps=3, lambda1=0.05, lr=5e-5))
    return w


def test_bundled_model_answers_and_is_found_structurally(ws):
    assert len(ws.lm.prunable.names) == 30 * 7 and not ws.lm.prunable.skipped
    out = ws.generate(DENSE, "What is the capital of France?", GenerationSettings(max_new_tokens=12))
    assert "Paris" in out


def test_learn_a_few_steps_gives_verified_2to4_with_finite_perplexity(ws):
    cfg = RunConfig(samples=4, ctx=64, eval_ctx=128, eval_windows=4, steps=3, lambda1=0.05, lr=5e-5)
    events = []
    res = ws.learn(cfg, events.append)
    assert res.status == "finished" and [e.step for e in events] == [1, 2, 3]
    check = ws.verify("proxsparse")
    assert check.ok, str(check)
    dense, pruned = ws.perplexity(DENSE), ws.perplexity("proxsparse")
    assert torch.isfinite(torch.tensor(pruned)) and pruned > dense > 1
    text = ws.generate("proxsparse", "What is the capital of France?", GenerationSettings(max_new_tokens=8))
    assert isinstance(text, str) and text.strip()
    # the dense model is intact afterwards
    assert ws.perplexity(DENSE) == dense


def test_heldout_and_calibration_text_do_not_overlap():
    from proxsparse_core.data.text import builtin_text
    split = builtin_text()
    cal_paras = {p.strip() for p in split.calibration.split("\n\n")}
    held_paras = [p.strip() for p in split.held_out.split("\n\n") if len(p.strip()) > 80]
    assert held_paras and not any(p in cal_paras for p in held_paras)
    assert not any(p in split.calibration for p in held_paras[:200])
    assert 0.15 < len(split.held_out) / (len(split.calibration) + len(split.held_out)) < 0.3
