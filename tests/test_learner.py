"""The learner on a tiny random Llama: events, λ effect, stop, NaN, λ2, state restored."""
import threading

import pytest
import torch

from proxsparse_core.config import RunConfig
from proxsparse_core.method.learner import ProxSparseLearner, frozen_weight_term_
from proxsparse_core.sparsity.masks import mask_2to4, snapshot


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


def test_held_out_if_stopped_now_is_w0_under_the_current_mask_and_does_not_disturb_learning(tiny_lm, monkeypatch):
    from proxsparse_core.method import learner
    from proxsparse_core.sparsity.masks import pruned_weights, swapped

    held = _samples(n=3, ctx=40, seed=1)
    w0 = snapshot(tiny_lm.prunable)
    plain, measured = [], []
    base = _run(tiny_lm, on_event=plain.append, steps=4)
    monkeypatch.setattr(learner, "HELDOUT_BUDGET", 1e9)            # measure at every stats step
    cfg = RunConfig(steps=4, lr=1e-3, lambda1=1.0, layer_stats_every=2)
    res = ProxSparseLearner(tiny_lm, cfg, _samples(), measured.append, held_out=held, originals=w0).run()
    # the measurement never touches the learned weights: same losses, same masks
    assert [e.lm_loss for e in measured] == [e.lm_loss for e in plain]
    assert all(torch.equal(res.masks[n], base.masks[n]) for n in res.masks)
    assert [e.step for e in measured if e.heldout_loss_24 is not None] == [1, 2, 4]
    batch = held[:learner.HELDOUT_WINDOWS, :cfg.ctx // 2]
    dense = learner.heldout_loss(tiny_lm.model, batch)
    assert all(e.heldout_loss_dense == pytest.approx(dense) for e in measured)
    with swapped(tiny_lm.prunable, pruned_weights(w0, res.masks), w0):    # the final mask, applied to W0
        assert measured[-1].heldout_loss_24 == pytest.approx(learner.heldout_loss(tiny_lm.model, batch), rel=1e-5)
    assert "held-out loss if stopped now" in measured[-1].line()
    assert "groups with 0/1/2/3/4 non-zeros: " in measured[-1].line() and "nnz/group" not in measured[-1].line()
    for n, w in tiny_lm.prunable.weights().items():
        assert torch.equal(w, w0[n])
    # over budget: only where the curve starts and ends
    monkeypatch.setattr(learner, "HELDOUT_BUDGET", 0.0)
    few = []
    ProxSparseLearner(tiny_lm, cfg, _samples(), few.append, held_out=held).run()
    assert [e.step for e in few if e.heldout_loss_24 is not None] == [1, 4]


def test_masked_w0_restores_the_learned_weights_when_the_forward_fails(tiny_lm):
    from proxsparse_core.method.learner import masked_w0

    ps = tiny_lm.prunable
    w0 = snapshot(ps)
    learned = {n: ps.modules[n].weight.data for n in ps.names}
    where = {n: ps.modules[n].weight.data_ptr() for n in ps.names}
    seen = {}

    def fail(module, args, output):        # runs inside the layer's call, before masked_w0 swaps back
        seen["w"] = module.weight.data.clone()
        raise KeyboardInterrupt
    failing = ps.modules[ps.names[3]]
    handle = failing.register_forward_hook(fail)
    try:
        with pytest.raises(KeyboardInterrupt):
            with masked_w0(ps, w0):
                tiny_lm.model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    finally:
        handle.remove()
    assert torch.equal(seen["w"], w0[ps.names[3]] * mask_2to4(learned[ps.names[3]]))   # it computed with W0·mask
    assert all(ps.modules[n].weight.data_ptr() == where[n] for n in ps.names)   # the very same tensors
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ps.modules.values())


def test_eta_leaves_out_the_first_step_and_counts_held_out_time():
    from proxsparse_core.method.learner import eta_seconds

    assert eta_seconds([30.0, 1.0, 1.2, 0.8], 10) == pytest.approx(6.0)      # 6 steps left × median 1 s
    assert eta_seconds([5.0], 3) == pytest.approx(10.0)
    assert eta_seconds([1.0, 1.0], 2) == 0.0
    assert eta_seconds([1.0, 1.0, 1.0], 5, held_spent=0.3, held_cost=0.5) == pytest.approx(2 * 1.1 + 0.5)


def test_held_out_measurements_are_spaced_to_cost_a_small_share_of_the_run(monkeypatch):
    from proxsparse_core.method import learner

    monkeypatch.setattr(learner, "HELDOUT_BUDGET", 0.05)
    assert learner.held_gap(0.5, [1.0] * 5) == 10          # half a step's cost, 5% of the time → every 10 steps
    assert learner.held_gap(0.01, [1.0, 1.0]) == 1
    assert learner.held_gap(1.0, [9.0] + [0.1] * 10) == 200  # the recent steps count, not the first one


def test_scale_free_lambda2_term_is_the_term_in_units_of_each_layers_scale():
    """With lambda_scale=layer, layer n uses ε·s and λ2/s²: the term of W is the plain term of W/s,
    so scaling a layer's weights (and W0) by any factor leaves the term and Adam's step unchanged."""
    torch.manual_seed(0)
    a0, b0 = torch.randn(8, 12), torch.randn(4, 8)
    a, b = a0 + 0.1 * torch.randn(8, 12), b0 + 0.1 * torch.randn(4, 8)
    lam2, eps = 0.3, 0.5
    plain = frozen_weight_term_({"a": a.clone().requires_grad_(), "b": b.clone().requires_grad_()},
                                {"a": a0, "b": b0}, lam2, eps)
    sa, sb = 0.02, 7.0
    wa, wb = (sa * a).requires_grad_(), (sb * b).requires_grad_()
    val = frozen_weight_term_({"a": wa, "b": wb}, {"a": sa * a0, "b": sb * b0}, lam2, eps, {"a": sa, "b": sb})
    assert val == pytest.approx(plain, rel=1e-5)
    auto = lam2 * ((wa * (wa - sa * a0) / (sa * a0.abs() + eps * sa) / sa) ** 2).sum()
    ga = torch.autograd.grad(auto, wa)[0]
    assert torch.allclose(wa.grad, ga, rtol=1e-4, atol=1e-6)
    plain_a = frozen_weight_term_({"a": a.clone().requires_grad_()}, {"a": a0}, lam2, eps)
    unscaled = frozen_weight_term_({"a": (sa * a).requires_grad_()}, {"a": sa * a0}, lam2, eps)
    assert unscaled != pytest.approx(plain_a, rel=1e-2)    # without `scale` the term depends on the scale


def _outlier_channels(lm, seed=1):
    """Give every block's inputs a few loud channels (as real LMs have): the layer norms' weights
    spread over two orders of magnitude, so |W|·‖X‖ and |W| rank groups differently."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(torch.exp(torch.randn(p.shape, generator=g) * 1.5))


def test_channel_weights_are_the_dense_input_norms_with_rms_one(tiny_lm):
    from proxsparse_core.sparsity.scores import InputNorms, channel_weights

    _outlier_channels(tiny_lm)
    samples = _samples()
    cols = channel_weights(tiny_lm, samples, batch=3)
    name = next(n for n in tiny_lm.prunable.names if n.endswith("layers.0.self_attn.q_proj"))
    norms = InputNorms(tiny_lm.prunable.modules[name])
    h = tiny_lm.prunable.modules[name].register_forward_hook(lambda m, a, o: norms.add_batch(a[0]))
    with torch.no_grad():
        tiny_lm.model(input_ids=samples)
    h.remove()
    want = norms.sq.sqrt() / norms.sq.sqrt().pow(2).mean().sqrt()
    assert torch.allclose(cols[name], want.clamp_min(1e-2), rtol=1e-4)
    for n in tiny_lm.prunable.names:
        assert cols[n].shape == (tiny_lm.prunable.modules[n].weight.shape[1],)
        assert float(cols[n].pow(2).mean().sqrt()) == pytest.approx(1.0, rel=0.05)


def test_activation_score_prunes_what_wanda_would_when_the_loss_barely_moves(tiny_lm):
    """With a vanishing learning rate only the prox acts: with score=activation it drops, in every
    group, the two smallest |W0|·‖X‖ (Wanda's choice), with score=weight the two smallest |W0|."""
    from proxsparse_core.sparsity.scores import channel_weights

    _outlier_channels(tiny_lm)
    w0 = snapshot(tiny_lm.prunable)
    cols = channel_weights(tiny_lm, _samples())
    # 8 steps of batch 1 read all 8 samples, as channel_weights above did
    by_act = _run(tiny_lm, score="activation", lr=1e-12, lambda1=1e3, lambda_scale="layer", steps=8)
    by_weight = _run(tiny_lm, score="weight", lr=1e-12, lambda1=1e3, lambda_scale="layer", steps=8)
    assert by_act.learned_share_24 == 1.0 and by_weight.learned_share_24 == 1.0
    differ = 0
    for n in tiny_lm.prunable.names:
        wanda = mask_2to4(w0[n], w0[n].abs() * cols[n].unsqueeze(0))
        assert torch.equal(by_act.masks[n], wanda), n
        assert torch.equal(by_weight.masks[n], mask_2to4(w0[n])), n
        differ += int((wanda != mask_2to4(w0[n])).sum())
    assert differ > 0.1 * sum(m.numel() for m in by_act.masks.values())
    for n, w in tiny_lm.prunable.weights().items():
        assert torch.equal(w, w0[n]), "the learner must give the dense W0 back"


def _spy_on_the_mask(monkeypatch) -> dict:
    """What the learner reads its mask from, captured at that moment: the learned weights ("w")
    and the channel weights ("cols")."""
    import proxsparse_core.method.learner as learner

    seen, real = {}, learner.extract_masks

    def spy(prunable, cols=None):
        seen.update(cols=cols, w={n: prunable.modules[n].weight.detach().clone() for n in prunable.names})
        return real(prunable, cols)
    monkeypatch.setattr(learner, "extract_masks", spy)
    return seen


def test_activation_score_learns_and_reads_the_mask_in_the_same_coordinates(tiny_lm, monkeypatch):
    """A real run with score=activation: every group of the learned weights is pushed to 2:4 and the
    mask is top-2 of |W|·a of those learned weights (not of |W|)."""
    _outlier_channels(tiny_lm)
    seen = _spy_on_the_mask(monkeypatch)
    res = _run(tiny_lm, score="activation", lr=1e-2, lambda1=0.05, lambda_scale="layer", steps=8)
    assert res.status == "finished" and seen["cols"] is not None
    by_weight = 0
    for n in tiny_lm.prunable.names:
        w = seen["w"][n]
        assert torch.equal(res.masks[n], mask_2to4(w, w.abs() * seen["cols"][n].unsqueeze(0)))
        by_weight += int((res.masks[n] != mask_2to4(w)).sum())
    assert by_weight > 0, "some groups are not 2:4 yet, and there the two rankings differ"


def test_activation_score_leaves_bf16_weights_it_does_not_prune_exactly_as_they_were(tiny_lm, monkeypatch):
    """The prox works on W·diag(a) and divides by a on the way back; in bfloat16 that round trip
    would round every weight a little at every step. It is done in float32, so with a step that
    moves nothing (λ1 = 0, a vanishing lr) the learned bf16 weights are W0 bit for bit."""
    _outlier_channels(tiny_lm)
    tiny_lm.model.to(torch.bfloat16)
    w0 = snapshot(tiny_lm.prunable)
    seen = _spy_on_the_mask(monkeypatch)
    res = _run(tiny_lm, score="activation", lr=1e-12, lambda1=0.0, lambda_scale="layer", steps=3)
    assert res.status == "finished"
    for n in tiny_lm.prunable.names:
        assert seen["w"][n].dtype == torch.bfloat16 and torch.equal(seen["w"][n], w0[n]), n


@pytest.mark.parametrize("loss,steps,read", [("distill", 3, 3), ("lm", 3, 3), ("lm", 40, 32)])
def test_channel_norms_are_read_from_the_samples_the_run_reads(tiny_lm, monkeypatch, loss, steps, read):
    """With self-distillation the norms are recorded during the teacher's pass (no pass of their own);
    with the LM loss one pass reads the run's first NORM_SAMPLES samples. Either way they are the
    dense model's norms over exactly the samples the run reads, in its order."""
    import proxsparse_core.method.learner as learner
    from proxsparse_core.sparsity.scores import channel_weights

    _outlier_channels(tiny_lm)
    samples = _samples(n=40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    want = channel_weights(tiny_lm, samples[order[:read]])
    passes, real_cw = [], learner.channel_weights
    monkeypatch.setattr(learner, "channel_weights", lambda *a, **k: passes.append(1) or real_cw(*a, **k))
    seen = _spy_on_the_mask(monkeypatch)
    cfg = RunConfig(steps=steps, lr=1e-3, lambda1=0.1, lambda_scale="layer", score="activation", loss=loss)
    res = ProxSparseLearner(tiny_lm, cfg, samples).run()
    assert res.status == "finished"
    assert len(passes) == (0 if loss == "distill" else 1)
    for n in tiny_lm.prunable.names:
        assert torch.allclose(seen["cols"][n], want[n], rtol=1e-4), n
