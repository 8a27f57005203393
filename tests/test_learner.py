"""The learner on a tiny random Llama: events, λ effect, stop, NaN, λ2, state restored."""
import threading

import pytest
import torch

from proxsparse_core.config import RunConfig
from proxsparse_core.learner import ProxSparseLearner, frozen_weight_term_
from proxsparse_core.masks import snapshot


def _samples(n=8, ctx=32, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, ctx), generator=g)


def _run(lm, stop=None, on_event=None, **kw):
    cfg = RunConfig(**{"steps": 6, "lr": 1e-3, "lambda1": 1.0, "layer_stats_every": 2, **kw})
    return ProxSparseLearner(lm, cfg, _samples(), on_event, stop).run()


def test_events_every_step_and_model_restored(tiny_lm):
    w0 = snapshot(tiny_lm.prunable)
    events = []
    res = _run(tiny_lm, on_event=events.append)
    assert res.status == "finished" and res.steps_done == 6
    assert [e.step for e in events] == list(range(1, 7))
    for e in events:
        assert e.lm_loss > 0 and 0 <= e.share_24 <= 1 and sum(e.nnz_hist) > 0
        assert e.t_fwd_bwd > 0 and e.t_prox > 0 and e.tokens_per_s > 0
    assert events[1].layer_share is not None and len(events[1].layer_share) == len(res.layer_names)
    assert events[0].layer_share is None
    for n, w in tiny_lm.prunable.weights().items():
        assert torch.equal(w, w0[n]), "the learner must give the dense W0 back"
    assert set(res.masks) == set(tiny_lm.prunable.names)
    assert all(p.requires_grad for p in tiny_lm.model.parameters()), "requires_grad must be restored"


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule_is_the_one_applied_and_reported(tiny_lm, monkeypatch, schedule):
    applied = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        applied.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    events = []
    _run(tiny_lm, on_event=events.append, steps=10, warmup=0.2, lr=1e-2, lr_schedule=schedule)
    reported = [e.lr for e in events]
    assert reported == pytest.approx(applied)
    assert reported[:2] == pytest.approx([5e-3, 1e-2])                  # warm-up over 2 steps
    if schedule == "constant":
        assert reported[2:] == pytest.approx([1e-2] * 8)
    else:   # decays every step after the warm-up, ends near 0 but still moving
        assert all(a > b for a, b in zip(reported[1:], reported[2:]))
        assert 0 < reported[-1] < 0.05 * 1e-2


def test_share_of_24_groups_grows_with_lambda(tiny_lm):
    shares = [_run(tiny_lm, lambda1=lam).learned_share_24 for lam in (0.0, 2.0, 20.0)]
    assert shares[0] < shares[1] < shares[2]
    assert shares[0] < 0.05 and shares[2] > 0.5


def test_warmup_is_linear_over_first_tenth(tiny_lm):
    events = []
    _run(tiny_lm, on_event=events.append, steps=20, warmup=0.1, lambda1=0.1)
    lrs = [e.lr for e in events]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3]) and lrs[-1] == pytest.approx(1e-3)  # 2 warm-up steps
    events.clear()
    _run(tiny_lm, on_event=events.append, steps=10, warmup=0.5, lambda1=0.1)
    assert events[0].lr < events[3].lr <= events[5].lr


def test_stop_between_steps_still_yields_a_mask(tiny_lm):
    stop = threading.Event()

    def on_event(e):
        if e.step == 2:
            stop.set()
    res = _run(tiny_lm, stop=stop, on_event=on_event)
    assert res.status == "stopped" and res.steps_done == 2
    assert all(bool((m.view(-1, 4).sum(1) == 2).all()) for m in res.masks.values())


def test_nan_loss_stops_with_message_and_keeps_last_good_state(tiny_lm, monkeypatch):
    calls = {"n": 0}
    forward = tiny_lm.model.forward

    def poisoned(*a, **k):
        out = forward(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(tiny_lm.model, "forward", poisoned)
    res = _run(tiny_lm)
    assert res.status == "failed" and res.steps_done == 2
    assert "nan" in res.message.lower() and "step 2" in res.message
    assert len(res.masks) == len(tiny_lm.prunable.names)


def test_lambda2_term_and_gradient_match_autograd():
    torch.manual_seed(0)
    w = torch.randn(8, 12, requires_grad=True)
    w0 = w.detach() + 0.1 * torch.randn(8, 12)
    lam2, eps = 0.7, 0.5
    auto = lam2 * ((w * (w - w0) / (w0.abs() + eps)) ** 2).sum()
    auto.backward()
    g_auto = w.grad.clone()
    w.grad = None
    val = frozen_weight_term_({"w": w}, {"w": w0}, lam2, eps)
    assert val == pytest.approx(float(auto.detach()), rel=1e-5)
    assert torch.allclose(w.grad, g_auto, rtol=1e-4, atol=1e-6)


def test_lambda2_run_reports_the_term(tiny_lm):
    events = []
    _run(tiny_lm, on_event=events.append, lambda2=1.0, steps=3)
    assert events[0].l2_term == 0.0  # at step 1, before any update, W == W0
    assert events[-1].l2_term > 0
    assert events[-1].loss == pytest.approx(events[-1].lm_loss + events[-1].l2_term)
