"""Recovery of the surviving weights: the mask stays exact, the OBS update lowers each layer's
reconstruction error, the distillation loss measures distance to the dense model, Stop keeps the
last good weights, and the recovered model travels through the CLI, export and the Compare tab."""
import json
import threading

import pytest
import torch

from proxsparse_core.baselines.oneshot import prune_sparsegpt
from proxsparse_core.method.distill import bucket_kl, distill_loss, full_kl, live_teacher_logits, teacher_targets
from proxsparse_core.errors import UserError
from proxsparse_core.sparsity.masks import mask_2to4, snapshot, swapped, verify
from proxsparse_core.recovery.recover import RECOVERY_LENGTHS, RecoveryConfig, obs_update, recover
from proxsparse_core.results import Pruning, title
from test_export import save_tiny_model, tiny_cfg


@pytest.fixture
def setup(tiny_lm):
    """The tiny model, calibration token ids, W0 and a magnitude 2:4 result to recover."""
    torch.manual_seed(1)
    calibration = torch.randint(2, 256, (8, 32))
    originals = snapshot(tiny_lm.prunable)
    masks = {n: mask_2to4(w) for n, w in originals.items()}
    return tiny_lm, calibration, originals, Pruning("magnitude", masks)


def _dense_again(lm, originals):
    return all(torch.equal(lm.prunable.modules[n].weight.detach(), w) for n, w in originals.items())


# ----------------------------------------------------------------------------- the method

@pytest.mark.parametrize("method", ["obs", "finetune", "both"])
def test_recovery_keeps_the_mask_exactly_and_changes_the_survivors(setup, method):
    lm, calibration, originals, base = setup
    res = recover(lm, calibration, base, "magnitude", originals, RecoveryConfig(method=method, steps=4, lr=1e-2))
    assert res.status == "finished" and res.pruning is not None
    assert res.pruning.method == "magnitude+recovery" and res.pruning.masks is base.masks
    assert len(res.events) == (0 if method == "obs" else 4)
    changed = 0
    for n, w in res.pruning.weights.items():
        m = base.masks[n]
        assert w.shape == originals[n].shape and torch.isfinite(w).all()
        assert int((w[~m] != 0).sum()) == 0, n                                # pruned stays exactly zero
        changed += int((w[m] != originals[n][m]).sum())
    assert changed > 0                                                        # survivors were updated
    with swapped(lm.prunable, res.pruning.weights, originals):
        check = verify(lm.prunable, base.masks, originals, updated_ok=True)
    assert check.ok and check.bad_groups == 0, check.problems
    assert "survivors updated" in str(check)
    assert _dense_again(lm, originals)                                       # the model rests at W0


def _layer_inputs(lm, calibration) -> dict:
    """Inputs X [tokens, in] of every prunable layer on the calibration samples (dense model)."""
    xs, handles = {}, []
    for n in lm.prunable.names:
        handles.append(lm.prunable.modules[n].register_forward_hook(
            lambda mod, args, out, n=n: xs.setdefault(n, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    try:
        with torch.no_grad():
            lm.model(input_ids=calibration, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def _error(w, w0, x) -> float:
    """‖W0·X − W·X‖² relative to ‖W0·X‖²."""
    ref = x @ w0.t()
    return float((ref - x @ w.t()).pow(2).sum() / ref.pow(2).sum())


def test_obs_lowers_the_layer_reconstruction_error(setup):
    lm, calibration, originals, base = setup
    weights = obs_update(lm, calibration, base.masks)
    xs = _layer_inputs(lm, calibration)
    first = [n for n in lm.prunable.names if ".layers.0." in n]
    assert first
    total_obs = total_mask = 0.0
    for n in lm.prunable.names:
        assert int((weights[n][~base.masks[n]] != 0).sum()) == 0
        e_obs = _error(weights[n], originals[n], xs[n])
        e_mask = _error(originals[n] * base.masks[n], originals[n], xs[n])
        total_obs, total_mask = total_obs + e_obs, total_mask + e_mask
        if n in first:        # the first block sees exactly the inputs OBS solved for
            assert e_obs < 0.9 * e_mask, (n, e_obs, e_mask)
    assert total_obs < 0.8 * total_mask
    assert _dense_again(lm, originals)


def test_obs_with_sparsegpts_mask_gives_sparsegpts_weights_bit_for_bit(setup):
    """Why a sparsegpt run folder (mask only) can be recovered from its real weights."""
    lm, calibration, originals, _ = setup
    sgpt = prune_sparsegpt(lm, calibration)
    rebuilt = obs_update(lm, calibration, sgpt.masks)
    for n, w in sgpt.weights.items():
        assert torch.equal(rebuilt[n], w), n


def _toy_pair(seed=0, rows=8, cols=16, tokens=400):
    """A layer W0 and inputs: x_dense, and x = x_dense plus an upstream error."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, cols, generator=g))
    xd = torch.randn(tokens, cols, generator=g)
    return lin, xd, xd + 0.3 * torch.randn(tokens, cols, generator=g)


@pytest.mark.parametrize("share", [0.3, 1.0])
def test_obs_with_a_dense_share_solves_its_least_squares_problem(share):
    """add_pair + prune(dense_share=α) with every weight kept is the least-squares fit of
    W0·(x + α(x_dense − x)) from x; with a 2:4 mask its target error is below plain OBS's."""
    from proxsparse_core.baselines.sparsegpt import SparseGPTLayer
    lin, xd, x = _toy_pair()
    w0 = lin.weight.detach().clone()
    pair = SparseGPTLayer(lin)
    for i in range(0, x.shape[0], 100):
        pair.add_pair(x[i:i + 100], xd[i:i + 100])
    target = (x + share * (xd - x)) @ w0.t()
    full, _ = pair.prune(damp=1e-9, keep=torch.ones_like(w0, dtype=torch.bool), dense_share=share)
    ls = torch.linalg.lstsq(x, target).solution.t()
    assert torch.allclose(full, ls, atol=1e-4, rtol=1e-4)
    mask = mask_2to4(w0)
    err = lambda w: float((target - x @ w.t()).pow(2).sum())                  # noqa: E731
    plain = SparseGPTLayer(lin)
    plain.add_batch(x)
    w_plain, _ = plain.prune(keep=mask)
    w_share, keep = pair.prune(keep=mask, dense_share=share)
    assert torch.equal(keep, mask) and int((w_share[~mask] != 0).sum()) == 0
    assert err(w_share) < err(w_plain)
    # share 0, or identical inputs: exactly the plain update
    w_zero, _ = pair.prune(keep=mask, dense_share=0.0)
    assert torch.allclose(w_zero, w_plain, atol=1e-5)
    same = SparseGPTLayer(lin)
    same.add_pair(xd, xd)
    w_same, _ = same.prune(keep=mask, dense_share=share)
    ref = SparseGPTLayer(lin)
    ref.add_batch(xd)
    assert torch.allclose(w_same, ref.prune(keep=mask)[0], atol=1e-5)


def test_obs_with_a_dense_share_keeps_the_mask_restores_w0_and_moves_the_update(setup):
    lm, calibration, originals, base = setup
    plain = obs_update(lm, calibration, base.masks)
    shared = obs_update(lm, calibration, base.masks, dense_share=0.3)
    assert _dense_again(lm, originals)
    moved = 0
    for n in lm.prunable.names:
        assert int((shared[n][~base.masks[n]] != 0).sum()) == 0, n
        assert torch.isfinite(shared[n]).all()
        moved += int(not torch.allclose(shared[n], plain[n]))
        if ".layers.0." in n and n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert torch.allclose(shared[n], plain[n], atol=1e-5), n          # block 0's inputs: no error yet
    assert moved > 0
    again = obs_update(lm, calibration, base.masks, dense_share=0.3)
    assert all(torch.equal(again[n], shared[n]) for n in shared)             # deterministic


@pytest.mark.parametrize("arch", ["qwen2", "opt", "phi"])
def test_obs_with_a_dense_share_runs_on_other_architectures(arch):
    """The dense path beside the pruned one uses each architecture's own blocks (their keyword
    arguments, biases, attention): the mask stays exact, W0 comes back, and only layers past the
    first block move (in the first block both paths see the same inputs)."""
    from transformers import OPTConfig, OPTForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from conftest import TinyTokenizer
    from proxsparse_core.models.loading import LoadedModel
    from proxsparse_core.sparsity.prunable import find_prunable
    torch.manual_seed(0)
    cfg, cls = {"qwen2": (Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2), Qwen2ForCausalLM),
                "opt": (OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                  num_attention_heads=4, word_embed_proj_dim=64), OPTForCausalLM),
                "phi": (PhiConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4), PhiForCausalLM)}[arch]
    model = cls(cfg).eval()
    lm = LoadedModel(model, TinyTokenizer(), arch, arch, "cpu", torch.float32, find_prunable(model), 512)
    originals = snapshot(lm.prunable)
    masks = {n: mask_2to4(w) for n, w in originals.items()}
    calibration = torch.randint(2, 256, (8, 32))
    plain = obs_update(lm, calibration, masks)
    shared = obs_update(lm, calibration, masks, dense_share=0.3)
    assert _dense_again(lm, originals)
    moved = {n for n in plain if not torch.allclose(plain[n], shared[n])}
    for n, w in shared.items():
        assert torch.isfinite(w).all() and int((w[~masks[n]] != 0).sum()) == 0, n
    first = [n for n in plain if ".0." in n]
    assert first and moved and not moved & set(first)


def test_distillation_loss_is_zero_for_the_dense_model_and_positive_when_pruned(setup):
    lm, calibration, originals, base = setup
    teacher = teacher_targets(lm.model, calibration)
    rows = torch.arange(4)
    with torch.no_grad():
        itself = float(distill_loss(lm.model, calibration[rows], *teacher.batch(rows, "cpu")))
        assert abs(itself) <= 1e-6                                            # float16 teacher values
        logits = lm.model(input_ids=calibration[rows]).logits                 # exact fp32 teacher too
        top = torch.log_softmax(logits.float(), -1).topk(64, -1)
        assert abs(float(bucket_kl(logits, top.values, top.indices))) <= 1e-6
        with swapped(lm.prunable, {n: w * base.masks[n] for n, w in originals.items()}, originals):
            pruned = float(distill_loss(lm.model, calibration[rows], *teacher.batch(rows, "cpu")))
    assert pruned > 1e-4 and pruned > 100 * abs(itself)     # a random tiny model is close to uniform


def test_stop_keeps_the_weights_of_the_last_finished_step(setup):
    lm, calibration, originals, base = setup
    stop, after = threading.Event(), {}

    def on_event(ev):             # the model holds the weights of the step that just ended
        after[ev.step] = {n: lm.prunable.modules[n].weight.detach().clone() for n in lm.prunable.names}
        if ev.step == 2:
            stop.set()
    # 100 steps: the periodic snapshot (every 5 steps) would still be the start at step 2
    res = recover(lm, calibration, base, "magnitude", originals,
                  RecoveryConfig(method="finetune", steps=100, lr=1e-2), on_event, stop)
    assert res.status == "stopped" and len(res.events) == 2 and "after 2" in res.message
    for n, w in res.pruning.weights.items():
        assert torch.equal(w, after[2][n]), n
    assert any(not torch.equal(after[1][n], after[2][n]) for n in after[2])   # step 2 really changed them
    assert _dense_again(lm, originals)


def test_stop_before_any_step_recovers_nothing(setup):
    lm, calibration, originals, base = setup
    stop = threading.Event()
    stop.set()
    res = recover(lm, calibration, base, "magnitude", originals, RecoveryConfig(method="finetune", steps=5), None, stop)
    assert res.status == "stopped" and res.pruning is None
    assert _dense_again(lm, originals)


@pytest.mark.parametrize("settings,needle", [(dict(method="sgd"), "recovery method"), (dict(steps=0), "steps"),
                                             (dict(lr=float("nan")), "learning rate"), (dict(batch=True), "batch"),
                                             (dict(teacher="oracle"), "recovery teacher must be one of stored, live"),
                                             (dict(teacher=["live"]), "recovery teacher"), (dict(text=-1), "text"),
                                             (dict(text="1M"), "text"), (dict(obs_dense=1.5), "obs_dense"),
                                             (dict(obs_dense="0.3"), "obs_dense"), (dict(obs_dense=True), "obs_dense"),
                                             (dict(obs_dense=float("nan")), "obs_dense"),
                                             (dict(obs_damp=0), "obs_damp"), (dict(obs_damp=11.0), "obs_damp"),
                                             (dict(obs_damp="0.1"), "obs_damp"), (dict(obs_damp=True), "obs_damp"),
                                             (dict(steps=1000, batch=128, samples=128_000), "use teacher live")])
def test_bad_recovery_settings_are_one_line(settings, needle):
    with pytest.raises(UserError, match=needle):
        RecoveryConfig(**settings).validate()


def test_a_stored_teacher_is_refused_only_where_it_would_store_too_much():
    RecoveryConfig(steps=1000, batch=128, samples=128_000, teacher="live").validate()
    RecoveryConfig(method="obs", steps=1000, batch=128, samples=128_000).validate()     # no fine-tuning: no teacher
    RecoveryConfig(steps=1000, batch=20, samples=0).validate()        # 0 = the run's own samples, a few hundred
    assert RECOVERY_LENGTHS["deep"]["teacher"] == "live"
    for length in RECOVERY_LENGTHS.values():
        RecoveryConfig(**length).validate()


def test_the_live_teacher_is_the_dense_model_and_its_kl_is_zero_against_itself(setup):
    lm, calibration, originals, base = setup
    x = calibration[:3]
    with torch.no_grad():
        dense = lm.model(input_ids=x).logits
        assert float(full_kl(dense, dense)) == pytest.approx(0.0, abs=1e-6)
        lm.model.train()
        with swapped(lm.prunable, {n: w * base.masks[n] for n, w in originals.items()}, originals):
            pruned = lm.model(input_ids=x).logits
            live = live_teacher_logits(lm.model, originals, x)
            assert lm.model.training                                      # left as it was
            assert torch.equal(lm.model(input_ids=x).logits, pruned)      # the student's weights are back
        lm.model.eval()
    assert torch.allclose(live, dense, atol=1e-6, rtol=0)                # W0 ran, not the pruned weights
    kl = float(full_kl(pruned, live)) / x.numel()
    top = torch.log_softmax(dense, -1).topk(8, -1)
    assert kl > 1e-4 and kl >= float(bucket_kl(pruned, top.values, top.indices)) - 1e-7   # buckets: a lower bound


def test_live_recovery_keeps_the_mask_lowers_the_kl_and_chunks_change_nothing(setup, monkeypatch):
    from proxsparse_core.recovery import recover as recovery
    lm, calibration, originals, base = setup
    cfg = RecoveryConfig(method="finetune", steps=6, batch=4, lr=1e-2, teacher="live")
    res = recover(lm, calibration, base, "magnitude", originals, cfg)
    assert res.status == "finished" and len(res.events) == 6 and _dense_again(lm, originals)
    for n, w in res.pruning.weights.items():
        assert int((w[~base.masks[n]] != 0).sum()) == 0, n

    def kl_to_dense(weights):
        with torch.no_grad():
            dense = lm.model(input_ids=calibration).logits
            with swapped(lm.prunable, weights, originals):
                return float(full_kl(lm.model(input_ids=calibration).logits, dense)) / calibration.numel()
    assert kl_to_dense(res.pruning.weights) < 0.9 * kl_to_dense({n: w * base.masks[n] for n, w in originals.items()})
    # a step's batch split into chunks of one sample (gradients accumulated) is the same step
    monkeypatch.setattr(recovery, "LIVE_CHUNK_TOKENS", calibration.shape[1])
    chunked = recover(lm, calibration, base, "magnitude", originals, cfg)
    assert [e.loss for e in chunked.events] == pytest.approx([e.loss for e in res.events], rel=1e-4)
    for n, w in chunked.pruning.weights.items():
        assert torch.allclose(w, res.pruning.weights[n], atol=1e-5), n


def _small_fresh_text(monkeypatch, tmp_path):
    from proxsparse_core.data import selfgen
    monkeypatch.setattr(selfgen, "FRESH_BATCH", 2)
    monkeypatch.setattr(selfgen, "FRESH_NEW", 16)
    monkeypatch.setenv("PROXSPARSE_CACHE", str(tmp_path / "cache"))


def _windows_of(rows: torch.Tensor, ids: torch.Tensor) -> bool:
    stream = ids.tolist()
    return all(any(stream[i:i + len(r)] == r for i in range(len(stream) - len(r) + 1)) for r in rows.tolist())


def test_fresh_text_is_written_once_and_samples_are_drawn_over_it_and_the_source(tiny_folder, tmp_path, monkeypatch):
    from proxsparse_core.data import selfgen
    from proxsparse_core.data.text import load_text, tokenize
    from proxsparse_core.workspace import Workspace
    from test_export import tiny_cfg

    _small_fresh_text(monkeypatch, tmp_path)
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(f"paragraph {i}: " + "a few words to calibrate on " * 3 for i in range(30)))
    ws = Workspace()
    ws.prune("magnitude", tiny_cfg(tiny_folder, samples=4, data=str(text)))
    heard = []
    samples = ws.tuning_samples(40, heard.append, text=600)
    assert samples.shape == (40, ws.data.calibration.shape[1])
    assert any("fresh text for fine-tuning: 0 of 600 tokens" in h for h in heard)
    assert any("600 of 600 tokens" in h for h in heard)
    fresh = selfgen.fresh_ids(ws.lm.model, ws.lm.tokenizer, 600, seed=0)
    own = tokenize(ws.lm.tokenizer, load_text(str(text)).calibration)
    n_own = round(40 * own.numel() / (own.numel() + fresh.numel()))       # uniform over one pool of both texts
    assert 5 <= n_own <= 35
    assert _windows_of(samples[:n_own], own) and _windows_of(samples[n_own:], fresh)
    assert not _windows_of(samples[n_own:n_own + 1], own)
    # written once: a second request reads the cache, and it is not the instruction-only stream
    monkeypatch.setattr(selfgen, "_generate", lambda *a, **k: pytest.fail("generated again"))
    assert torch.equal(selfgen.fresh_ids(ws.lm.model, ws.lm.tokenizer, 600, seed=0), fresh)
    assert selfgen._cache_file(ws.lm.model, 0, 16, 2, free=True) != selfgen._cache_file(ws.lm.model, 0, 16, 2)


def test_stop_while_the_fresh_text_is_written_recovers_nothing_and_keeps_the_results(tiny_folder, tmp_path,
                                                                                      monkeypatch):
    from proxsparse_core.workspace import Workspace
    from test_export import tiny_cfg

    _small_fresh_text(monkeypatch, tmp_path)
    ws = Workspace()
    ws.prune("magnitude", tiny_cfg(tiny_folder, samples=4))
    stop = threading.Event()
    stop.set()
    res = ws.recover("magnitude", RecoveryConfig(method="finetune", steps=2, samples=8, text=500, teacher="live"),
                     stop=stop)
    assert res.status == "stopped" and res.pruning is None and "fine-tuning text" in res.message
    assert list(ws.results) == ["magnitude"]
    res = ws.recover("magnitude", RecoveryConfig(method="finetune", steps=2, samples=8, text=100, teacher="live"))
    assert res.status == "finished" and "magnitude+recovery" in ws.results


def test_cli_deep_recovery_records_a_command_that_remakes_it_bit_for_bit(tiny_folder, tmp_path, monkeypatch, capsys):
    import shlex

    from proxsparse_core.cli import main

    _small_fresh_text(monkeypatch, tmp_path)
    run, rec, again = tmp_path / "run", tmp_path / "rec", tmp_path / "again"
    assert main(["prune", "--model", str(tiny_folder), *FLAGS, "--method", "wanda", "--out", str(run),
                 "--no-eval"]) == 0
    assert main(["recover", "--run", str(run), "--method", "finetune", "--length", "deep", "--steps", "3",
                 "--samples", "12", "--batch", "4", "--text", "100", "--out", str(rec), "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert "teacher=live text=100" in out and "step 3/3  KL to dense" in out
    recipe = json.loads((rec / "recipe.json").read_text())
    deep = RECOVERY_LENGTHS["deep"]
    assert recipe["recovery"] == RecoveryConfig(method="finetune", steps=3, samples=12, batch=4, lr=deep["lr"],
                                                teacher="live", text=100).to_dict()
    argv = shlex.split(recipe["command"])
    assert argv[:3] == ["python", "-m", "proxsparse_core"] and "--teacher" in argv and "--text" in argv
    argv[argv.index("--out") + 1] = str(again)
    assert main([*argv[3:], "--no-eval"]) == 0
    first, second = _prunable_of(rec), _prunable_of(again)
    assert all(torch.equal(first[n], second[n]) for n in first)


@pytest.mark.parametrize("name,value,plain,before", [("obs_dense", "0.3", "0", 0.0), ("obs_damp", "0.1", "0.01", 0.01)])
def test_cli_obs_setting_is_recorded_and_its_command_remakes_it_bit_for_bit(tiny_folder, tmp_path, name, value, plain,
                                                                            before):
    """An OBS setting given to `recover` changes the update, is recorded in the recipe, and the recorded
    command remakes the weights bit for bit; a recipe from before the setting reads as its old value."""
    import shlex

    from proxsparse_core.cli import main
    from proxsparse_core.runs.folder import recover_command

    flag = "--" + name.replace("_", "-")
    run, rec, again, other = (tmp_path / d for d in ("run", "rec", "again", "other"))
    assert main(["prune", "--model", str(tiny_folder), *FLAGS, "--method", "wanda", "--out", str(run),
                 "--no-eval"]) == 0
    assert main(["recover", "--run", str(run), "--method", "obs", flag, value, "--out", str(rec), "--no-eval"]) == 0
    assert main(["recover", "--run", str(run), "--method", "obs", flag, plain, "--out", str(other), "--no-eval"]) == 0
    recipe = json.loads((rec / "recipe.json").read_text())
    assert recipe["recovery"][name] == float(value)
    argv = shlex.split(recipe["command"])
    assert argv[argv.index(flag) + 1] == value
    argv[argv.index("--out") + 1] = str(again)
    assert main([*argv[3:], "--no-eval"]) == 0
    first, second, base = _prunable_of(rec), _prunable_of(again), _prunable_of(other)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert any(not torch.equal(first[n], base[n]) for n in first)          # the setting reached the update
    old = {k: v for k, v in recipe["recovery"].items() if k != name}       # a recipe from before the setting
    assert f"{flag} {before}" in recover_command(run, old, again)
    assert getattr(RecoveryConfig.from_dict(old), name) == before


def test_fine_tuning_reads_more_samples_of_the_runs_source(tiny_folder, monkeypatch):
    """RecoveryConfig.samples: fine-tuning reads that many samples, drawn from the run's calibration
    source and seed exactly as the run's own (so they start with the run's)."""
    from proxsparse_core.recovery import recover as recovery
    from proxsparse_core.workspace import Workspace
    from test_export import tiny_cfg

    ws = Workspace()
    ws.prune("magnitude", tiny_cfg(tiny_folder, samples=4))
    run = ws.data.calibration
    assert ws.tuning_samples(0) is run and ws.tuning_samples(4) is run
    heard = []
    more = ws.tuning_samples(12, heard.append)
    assert len(heard) == 1 and heard[0].startswith("drawing 12 fine-tuning samples")
    assert ws.tuning_samples(12, heard.append) is more and len(heard) == 1     # drawn once, then kept
    assert more.shape == (12, run.shape[1]) and torch.equal(more[:4], run)
    seen = []
    real = recovery.MaskedFinetuner.run

    def spy(self, start):
        seen.append(self.samples)
        return real(self, start)
    monkeypatch.setattr(recovery.MaskedFinetuner, "run", spy)
    res = ws.recover("magnitude", RecoveryConfig(method="both", steps=12, lr=1e-2, samples=12))
    assert seen[0] is more and res.pruning.info["finetune_samples"] == 12
    with pytest.raises(UserError, match="samples"):
        RecoveryConfig(samples=-1).validate()


def test_when_more_samples_cannot_be_drawn_the_message_says_how_to_use_the_runs_own(tiny_folder, tmp_path):
    from proxsparse_core.workspace import Workspace
    from test_export import tiny_cfg

    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(f"paragraph {i}: " + "some words to calibrate on " * 20 for i in range(40)))
    ws = Workspace()
    ws.prune("magnitude", tiny_cfg(tiny_folder, samples=4, data=str(text)))
    text.unlink()                                       # the upload is gone since the run
    with pytest.raises(UserError, match="could not draw 12 fine-tuning samples .*does not exist.*samples to 0"):
        ws.recover("magnitude", RecoveryConfig(method="finetune", steps=2, samples=12))
    assert "magnitude" in ws.results                    # the result is kept
    res = ws.recover("magnitude", RecoveryConfig(method="finetune", steps=2, samples=0))
    assert res.status == "finished" and res.pruning.info["finetune_samples"] == 2


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


FLAGS = ["--device", "cpu", "--dtype", "float32", "--samples", "8", "--ctx", "32", "--eval-ctx", "32",
         "--eval-windows", "2"]


def _prunable_of(folder):
    from safetensors.torch import load_file
    return load_file(folder / "weights.safetensors")


def test_cli_learn_recover_export_round_trips_bit_for_bit(tiny_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from proxsparse_core.runs.files import load_masks
    from proxsparse_core.cli import main
    from proxsparse_core.sparsity.prunable import find_prunable

    run, rec, exp = tmp_path / "run", tmp_path / "rec", tmp_path / "exp"
    assert main(["learn", "--model", str(tiny_folder), *FLAGS, "--steps", "2", "--lr", "1e-3",
                 "--out", str(run), "--no-eval"]) == 0
    capsys.readouterr()
    assert main(["recover", "--run", str(run), "--method", "both", "--length", "long", "--steps", "3",
                 "--samples", "12", "--lr", "1e-2", "--out", str(rec)]) == 0
    out = capsys.readouterr().out
    assert "step 3/3  KL to dense" in out and "weight update (OBS): block 2/2" in out
    assert "same top-1 next token as dense" in out
    assert {p.name for p in rec.iterdir()} == {"masks.npz", "weights.safetensors", "recipe.json",
                                               "events.jsonl", "metrics.json"}
    recipe = json.loads((rec / "recipe.json").read_text())
    assert recipe["method"] == "proxsparse+recovery" and recipe["base_method"] == "proxsparse"
    # --length long sets the samples per step; the flags given too win over its steps and samples
    assert recipe["recovery"] == RecoveryConfig(method="both", steps=3, lr=1e-2, batch=8, samples=12).to_dict()
    assert recipe["command"].startswith("python -m proxsparse_core recover --run ")
    assert "--batch 8 --seed 0 --samples 12" in recipe["command"]
    assert recipe["config"] == json.loads((run / "recipe.json").read_text())["config"]
    metrics = json.loads((rec / "metrics.json").read_text())
    assert metrics["verified"] and set(metrics["perplexity"]) == {"dense", "proxsparse", "proxsparse+recovery"}
    assert all(0 <= v <= 1 for v in metrics["top1_agreement"].values())
    events = [json.loads(line) for line in (rec / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [1, 2, 3] and {e["objective"] for e in events} == {"distill"}

    weights, masks = _prunable_of(rec), load_masks(rec)
    assert torch.equal(masks["model.layers.0.mlp.up_proj"], load_masks(run)["model.layers.0.mlp.up_proj"])
    assert main(["export", "--run", str(rec), "--out", str(exp)]) == 0
    assert "exported proxsparse+recovery to" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32).eval()
    prunable = find_prunable(model)
    assert set(prunable.names) == set(weights)
    for n in prunable.names:
        w = prunable.modules[n].weight.detach()
        assert torch.equal(w.view(torch.int32), weights[n].view(torch.int32)), n      # bit for bit
        assert int((w[~masks[n]] != 0).sum()) == 0
    card = (exp / "README.md").read_text()
    assert "## Recovery" in card and "not the original weights × mask" in card
    assert recipe["command"] in card
    exported = json.loads((exp / "proxsparse/metrics.json").read_text())
    assert exported["result"] == "proxsparse+recovery" and exported["weights_updated"]
    assert exported["top1_agreement_with_dense"] == pytest.approx(metrics["top1_agreement"]["proxsparse+recovery"])
    assert exported["perplexity"]["proxsparse+recovery"] == pytest.approx(metrics["perplexity"]["proxsparse+recovery"])
    assert json.loads((exp / "proxsparse/recipe.json").read_text())["recovery"] == recipe["recovery"]

    # eval on the recover folder evaluates the recovered weights, not W0 × mask
    assert main(["eval", "--masks", str(rec), "--model", str(tiny_folder), *FLAGS[:4], "--eval-ctx", "32",
                 "--eval-windows", "2", "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert ppl["pruned"] == pytest.approx(metrics["perplexity"]["proxsparse+recovery"], rel=1e-6)

    # bad inputs: one line each, nothing written
    for argv, needle in ((["--run", str(rec), "--method", "obs", "--out", str(tmp_path / "x")], "already a recover run"),
                         (["--run", str(tmp_path / "nope"), "--method", "obs", "--out", str(tmp_path / "x")],
                          "does not exist"),
                         (["--run", str(run), "--method", "obs", "--steps", "0", "--out", str(tmp_path / "x")],
                          "steps"),
                         (["--run", str(run), "--method", "obs", "--out", str(run), "--overwrite"], "new folder"),
                         (["--run", str(run), "--method", "sgd", "--out", str(tmp_path / "x")], "invalid choice")):
        try:
            code = main(["recover", *argv])
        except SystemExit as exc:                                # argparse's own errors
            code = exc.code
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_cli_recovers_a_sparsegpt_run_from_its_real_weights(tiny_folder, tmp_path, capsys):
    """A sparsegpt folder (mask only) is recovered from SparseGPT's real weights: `obs` at SparseGPT's own
    damping gives them back bit for bit; recovery's default damping (OBS_DAMP) re-solves them."""
    from proxsparse_core.baselines.sparsegpt import DAMP
    from proxsparse_core.cli import main
    from proxsparse_core.recovery.recover import OBS_DAMP
    from proxsparse_core.workspace import Workspace

    assert OBS_DAMP != DAMP and RecoveryConfig().obs_damp == OBS_DAMP
    run, rec, damped = tmp_path / "sgpt", tmp_path / "rec", tmp_path / "damped"
    assert main(["prune", "--method", "sparsegpt", "--model", str(tiny_folder), *FLAGS, "--out", str(run),
                 "--no-eval"]) == 0
    assert main(["recover", "--run", str(run), "--method", "obs", "--obs-damp", str(DAMP), "--out", str(rec),
                 "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert "rebuilt as the OBS update" in out and "gives them back unchanged" in out
    assert main(["recover", "--run", str(run), "--method", "obs", "--out", str(damped), "--no-eval"]) == 0
    assert "gives them back unchanged" not in capsys.readouterr().out
    ws = Workspace()
    sgpt = ws.prune("sparsegpt", tiny_cfg(tiny_folder, eval_windows=2))
    weights, other = _prunable_of(rec), _prunable_of(damped)
    for n, w in sgpt.weights.items():
        assert torch.equal(weights[n], w), n
    assert any(not torch.equal(other[n], w) for n, w in sgpt.weights.items())
    assert json.loads((damped / "recipe.json").read_text())["recovery"]["obs_damp"] == OBS_DAMP


# ----------------------------------------------------------------------------- the Compare tab

def test_compare_tab_recovers_a_result_and_shows_its_row(tiny_folder):
    import gradio as gr  # noqa: F401 - gr.update dicts

    from test_ui_handlers import wait
    from ui import compare_tab
    from ui.jobs import LEARNED, JobManager

    jobs = JobManager()
    job = jobs.start_learning(tiny_cfg(tiny_folder, eval_windows=2), evaluate=False)
    wait(job)
    assert compare_tab.recoverable_choices(jobs) == [(title(LEARNED), LEARNED)]
    for args, needle in (((LEARNED, "sgd", 3), "Recovery must be one of"), ((LEARNED, "both", 0), "Fine-tuning steps"),
                         (("nope", "both", 3), "no result named"), ((LEARNED, "both", 3, 300, 0), "Samples per step"),
                         ((LEARNED, "both", 3, 300, "4"), "Samples per step must be a whole number")):
        with pytest.raises(UserError, match=needle):
            list(compare_tab.recover_result(jobs, *args))

    long, deep = RECOVERY_LENGTHS["long"], RECOVERY_LENGTHS["deep"]
    assert compare_tab.recovery_length("long") == (long["steps"], long["samples"], long["batch"], RecoveryConfig.lr,
                                                   "stored", 0)
    assert compare_tab.recovery_length("deep") == (deep["steps"], deep["samples"], deep["batch"], deep["lr"],
                                                   "live", deep["text"])
    assert compare_tab.recovery_length("standard") == (RecoveryConfig.steps, RecoveryConfig.samples,
                                                       RecoveryConfig.batch, RecoveryConfig.lr, "stored", 0)
    for args, needle in (((LEARNED, "both", 3, 300, 1, 2e-3, "oracle"), "Teacher must be one of"),
                         ((LEARNED, "both", 3, 300, 1, 2e-3, "live", -5), "Fresh text (tokens) must be between"),
                         ((LEARNED, "both", 3, 300, 1, "fast"), "Fine-tuning learning rate must be a number"),
                         ((LEARNED, "both", 300, 30_000, 128, 2e-3, "stored"), "use teacher live")):
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            list(compare_tab.recover_result(jobs, *args))
    with pytest.raises(UserError, match="Recovery length must be one of"):
        compare_tab.recovery_length("forever")
    updates = list(compare_tab.recover_result(jobs, LEARNED, "both", 4.0, 3.0, 2.0))
    progress, fig, table, variant, _ = updates[-1]
    new = LEARNED + "+recovery"
    assert new in jobs.ws.results and jobs.verified[new] is True
    assert jobs.ws.results[new].info["finetune_samples"] == 3          # the samples widget reaches recovery
    assert jobs.ws.results[new].info["recovery"]["batch"] == 2         # and so does the samples-per-step one
    assert "finished" in progress and "ETA" not in progress
    assert fig.data[0].name.startswith("KL to dense") and list(fig.data[0].x) == [1, 2, 3, 4]
    assert fig.layout.yaxis2.title.text == "KL divergence to the dense model"     # its own axis: not a next-token loss
    rows = {r["method"]: r for _, r in table.iterrows()}
    assert list(rows) == [title("dense"), title(LEARNED), title(new)]
    assert rows[title(new)]["weights"] == "updated by recovery" and rows[title(new)]["2:4 verified"] == "✓"
    for name in (LEARNED, new):
        share = rows[title(name)]["same top-1 as dense"]
        assert share.endswith("%") and share == f"{100 * jobs.ws.agreement(name):.1f}%"
    assert rows[title("dense")]["same top-1 as dense"] == "100.0%"
    assert variant["value"] == new and (title(new), new) in variant["choices"]
    assert all(n != new for _, n in compare_tab.recoverable_choices(jobs))
    with pytest.raises(UserError, match="already recovered"):
        list(compare_tab.recover_result(jobs, new, "obs", 5))


def test_compare_tab_stop_keeps_the_recovered_weights_so_far(tiny_folder):
    from test_ui_handlers import wait
    from ui import compare_tab
    from ui.jobs import LEARNED, JobManager

    jobs = JobManager()
    wait(jobs.start_learning(tiny_cfg(tiny_folder, eval_windows=2), evaluate=False))
    final = None
    for final in compare_tab.recover_result(jobs, LEARNED, "finetune", 200):
        fig = final[1]
        if fig.data and len(fig.data[0].x) >= 1:      # the first step is on the chart: press Stop
            jobs.eval_stop.set()
    progress, fig, table, variant, _ = final
    new = LEARNED + "+recovery"
    steps = len(fig.data[0].x)
    assert "stopped" in progress and "perplexity skipped" in progress and 1 <= steps < 200
    assert new in jobs.ws.results and jobs.ws.results[new].info["finetune_steps"] == steps
    assert jobs.verified[new] is True and variant["value"] == new
    assert title(new) not in set(table["method"])                   # no row until it is measured
    table, _ = compare_tab.compute_perplexities(jobs, [])            # the next Compute adds it
    assert title(new) in set(table["method"])


def test_recovery_summary_names_steps_and_samples_and_shows_only_whole_numbers():
    from proxsparse_core.runs.folder import recovery_summary
    good = recovery_summary({"base_method": "wanda", "obs": True, "finetune_steps": 300, "finetune_samples": 300})
    assert "300 steps of masked fine-tuning" in good and "on 300 calibration samples" in good
    # values read back from a run folder's metrics.json may be anything
    bad = recovery_summary({"base_method": "wanda", "obs": True, "finetune_steps": "<b>9</b>", "finetune_samples": True})
    assert "<b>" not in bad and "True" not in bad and "fine-tuning" not in bad
    assert "dense model's" not in good
    aimed = recovery_summary({"base_method": "wanda", "obs": True, "recovery": {"obs_dense": 0.3}})
    assert "aiming 30% of the way from its own outputs to the dense model's" in aimed
    odd = recovery_summary({"base_method": "wanda", "obs": True, "recovery": {"obs_dense": "<i>1</i>"}})
    assert "<i>" not in odd and "aiming" not in odd
    damped = recovery_summary({"base_method": "wanda", "obs": True, "recovery": {"obs_damp": 0.1}})
    assert "damping 10% of the mean Hessian diagonal (SparseGPT's: 1%)" in damped
    assert "damping" not in recovery_summary({"base_method": "wanda", "obs": True, "recovery": {"obs_damp": 0.01}})
    assert "damping" not in recovery_summary({"base_method": "wanda", "obs": True, "recovery": {"obs_damp": "9"}})


def test_compare_tab_warns_that_a_recovery_with_fresh_text_is_a_gpu_job_on_a_cpu(tiny_folder, tmp_path, monkeypatch):
    from test_ui_handlers import wait
    from ui import compare_tab
    from ui.jobs import LEARNED, JobManager

    _small_fresh_text(monkeypatch, tmp_path)
    warned = []
    monkeypatch.setattr(compare_tab, "notify", lambda text, level="warning": warned.append((level, text)))
    jobs = JobManager()
    wait(jobs.start_learning(tiny_cfg(tiny_folder, eval_windows=2), evaluate=False))
    list(compare_tab.recover_result(jobs, LEARNED, "finetune", 2, 8, 2))
    assert warned == []                                         # a short recovery: no warning
    progress = list(compare_tab.recover_result(jobs, LEARNED, "finetune", 2, 8, 2, 2e-3, "live", 100))[-1][0]
    assert "finished" in progress
    assert len(warned) == 1 and warned[0][0] == "warning" and "after writing 100 tokens of fresh text" in warned[0][1]
    assert "a GPU job, hours on this CPU" in warned[0][1]
