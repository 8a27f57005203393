"""Chat turns in recovery's fine-tuning (chats.py, RecoveryConfig.chat): every other step reads a
chat from its prompt on; with ``pruned`` the 2:4 model writes the answers from the weights being
trained and the dense model labels them; the mask stays exact, Stop and failures keep the work."""
import threading

import pytest
import torch

from conftest import TinyTokenizer
from proxsparse_core import chats, recovery, selfgen
from proxsparse_core.chats import chat_windows
from proxsparse_core.errors import UserError
from proxsparse_core.masks import mask_2to4, snapshot
from proxsparse_core.recovery import RecoveryConfig, recover
from proxsparse_core.results import Pruning


@pytest.fixture
def setup(tiny_lm, monkeypatch, tmp_path):
    """The tiny model with short chat rounds (4 answers of 16 tokens), calibration ids, W0 and a
    magnitude 2:4 result to recover."""
    monkeypatch.setenv("PROXSPARSE_CACHE", str(tmp_path))
    monkeypatch.setattr(chats, "BATCH", 4)
    monkeypatch.setattr(chats, "MAX_NEW", 16)
    torch.manual_seed(1)
    calibration = torch.randint(2, 256, (8, 32))
    originals = snapshot(tiny_lm.prunable)
    masks = {n: mask_2to4(w) for n, w in originals.items()}
    return tiny_lm, calibration, originals, Pruning("magnitude", masks)


def _prompt_heads() -> list[list[int]]:
    tok = TinyTokenizer()
    return [tok(p + "\n")["input_ids"] for p in selfgen.PROMPTS]


def _starts_with_a_prompt(row: torch.Tensor) -> bool:
    ids = row.tolist()
    return any(ids[:len(h)] == h[:len(ids)] for h in _prompt_heads())     # a window may cut a long prompt


def _spy_batches(monkeypatch) -> list[torch.Tensor]:
    seen = []
    real = recovery.distill_loss
    monkeypatch.setattr(recovery, "distill_loss", lambda model, batch, *t: seen.append(batch.clone()) or
                        real(model, batch, *t))
    return seen


def test_chat_windows_start_at_each_chat_and_run_on_into_the_next():
    stream = torch.arange(100, 120)
    w = chat_windows(stream, [0, 5, 17], 4, 8)
    assert w.shape == (4, 8)
    assert w[0].tolist() == list(range(100, 108)) and w[1].tolist() == list(range(105, 113))
    assert w[2].tolist() == [117, 118, 119, 100, 101, 102, 103, 104]      # past the end: from the start
    assert torch.equal(w[3], w[0])                                          # more windows than chats: cycled


def test_the_stream_records_where_every_chat_starts(tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setenv("PROXSPARSE_CACHE", str(tmp_path))
    tok = TinyTokenizer()
    ids, starts = selfgen.generated_chats(tiny_llama, tok, 300, seed=3, max_new=16, batch=4)
    assert len(starts) >= 4 and starts[0] == 0 and starts == sorted(set(starts))
    assert all(_starts_with_a_prompt(ids[s:]) for s in starts)
    ends = [s - 1 for s in starts[1:]]
    assert all(int(ids[e]) == tok.eos_token_id for e in ends)               # each chat ends with end-of-text
    again, starts_again = selfgen.generated_chats(tiny_llama, tok, 300, seed=3, max_new=16, batch=4)   # cached
    assert torch.equal(again, ids) and starts_again == starts


@pytest.mark.parametrize("kind", ["dense", "pruned"])
def test_every_other_step_reads_a_chat_from_its_prompt_and_the_mask_stays_exact(setup, monkeypatch, kind):
    lm, calibration, originals, base = setup
    seen = _spy_batches(monkeypatch)
    res = recover(lm, calibration, base, "magnitude", originals,
                  RecoveryConfig(method="finetune", steps=6, lr=1e-2, samples=0, chat=kind))
    assert res.status == "finished" and len(res.events) == 6 and len(seen) == 6
    cal_rows = {tuple(r.tolist()) for r in calibration}
    for step, batch in enumerate(seen, 1):
        if step % 2:
            assert tuple(batch[0].tolist()) in cal_rows, step                 # odd steps: the run's samples
        else:
            assert batch.shape[1] == calibration.shape[1] and _starts_with_a_prompt(batch[0]), step
    assert res.pruning.info["finetune_samples"] == 3 and res.pruning.info["recovery"]["chat"] == kind
    for n, w in res.pruning.weights.items():
        assert int((w[~base.masks[n]] != 0).sum()) == 0, n                    # pruned stays exactly zero
    assert all(torch.equal(lm.prunable.modules[n].weight, w) for n, w in originals.items())   # back at W0


def test_pruned_chats_are_written_by_the_weights_being_trained_and_labelled_by_the_dense_model(setup, monkeypatch):
    lm, calibration, originals, base = setup
    writers, teachers, after = [], [], {}

    def weights_now():
        return {n: lm.prunable.modules[n].weight.detach().clone() for n in lm.prunable.names}
    real_answer, real_teacher = chats.answer_round, chats.teacher_targets
    monkeypatch.setattr(chats, "answer_round", lambda *a, **k: writers.append((len(after), weights_now())) or
                        real_answer(*a, **k))
    monkeypatch.setattr(chats, "teacher_targets", lambda *a, **k: teachers.append(weights_now()) or
                        real_teacher(*a, **k))

    def on_event(ev):
        after[ev.step] = weights_now()
    res = recover(lm, calibration, base, "magnitude", originals,
                  RecoveryConfig(method="finetune", steps=30, lr=1e-2, samples=0, chat="pruned"), on_event)
    assert res.status == "finished" and len(writers) >= 3 and len(teachers) == len(writers)
    assert writers[0][0] == 1                               # the first chat step (2) needs the first round
    for done, w in writers:
        assert done % 2 == 1                                # a round is written just before a chat step
        assert all(torch.equal(w[n], after[done][n]) for n in w)                # the pruned model of that moment
    for t in teachers:
        assert all(torch.equal(t[n], originals[n]) for n in t)                  # the dense model labels them
    assert any(not torch.equal(writers[0][1][n], writers[1][1][n]) for n in originals)   # it changed in between


def test_stop_during_a_round_of_own_answers_keeps_the_steps_done(setup, monkeypatch):
    lm, calibration, originals, base = setup
    stop, after, rounds = threading.Event(), {}, []
    real = chats.answer_round

    def answers(*a, **k):
        rounds.append(len(after))
        if len(rounds) == 2:
            stop.set()                      # Stop pressed while the 2:4 model writes its second round
        return real(*a, **k)
    monkeypatch.setattr(chats, "answer_round", answers)

    def on_event(ev):
        after[ev.step] = {n: lm.prunable.modules[n].weight.detach().clone() for n in lm.prunable.names}
    res = recover(lm, calibration, base, "magnitude", originals,
                  RecoveryConfig(method="finetune", steps=100, lr=1e-2, samples=0, chat="pruned"), on_event, stop)
    done = rounds[1]
    assert done >= 3 and res.status == "stopped" and len(res.events) == done and f"after {done}" in res.message
    assert all(torch.equal(res.pruning.weights[n], after[done][n]) for n in after[done])
    assert all(torch.equal(lm.prunable.modules[n].weight, w) for n, w in originals.items())


def test_a_pruned_model_that_ends_every_answer_at_once_fails_clearly_and_keeps_its_steps(setup, monkeypatch):
    lm, calibration, originals, base = setup
    eos = TinyTokenizer.eos_token_id
    real_generate = lm.model.generate
    calls, after = [], {}

    def generate(input_ids, max_new_tokens, **kw):
        calls.append(len(after))
        if len(calls) == 1:                 # the first round answers, every later one ends at once
            return real_generate(input_ids, max_new_tokens=max_new_tokens, **kw)
        return torch.cat([input_ids, torch.full((input_ids.shape[0], max_new_tokens), eos)], 1)
    monkeypatch.setattr(lm.model, "generate", generate)
    res = recover(lm, calibration, base, "magnitude", originals,
                  RecoveryConfig(method="finetune", steps=40, lr=1e-2, samples=0, chat="pruned"),
                  lambda ev: after.__setitem__(ev.step, 1))
    assert res.status == "failed" and "ended every answer at once" in res.message and "chat 'dense'" in res.message
    assert len(calls) == 5 and calls[1] >= 3                 # the second round tried 4 times, then gave up
    assert len(res.events) == calls[1] and res.pruning is not None                # the steps before it are kept
    for n, w in res.pruning.weights.items():
        assert int((w[~base.masks[n]] != 0).sum()) == 0 and not torch.equal(w, originals[n] * base.masks[n]), n


@pytest.mark.parametrize("chat", ["all", "", 1, None])
def test_a_bad_chat_setting_is_one_line(chat):
    with pytest.raises(UserError, match="recovery chat must be one of none, dense, pruned"):
        RecoveryConfig(chat=chat).validate()
