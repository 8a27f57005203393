"""Recovery and a chat model's prompt scaffolding (issue 28 item 1): a chat model recovered on text
without chat turns answered every prompt with its own system prompt. Recovery now reads the model's
own chat turns (half the samples, when the run's source holds none) and leaves every position that
predicts the chat template's scaffolding (system prompt, role tags, the user's message) out of the
distillation loss. A tiny random Llama with a tiny word-level tokenizer and a SmolLM2-like chat
template, built here (offline)."""
import re
from collections import Counter

import pytest
import torch

from proxsparse_core.data import selfgen
from proxsparse_core.method.distill import bucket_kl, full_kl
from proxsparse_core.recovery import recover as recovery
from proxsparse_core.recovery.recover import RecoveryConfig

SYSTEM = "You are a helpful assistant named Tiny"
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}{% endif %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["[PAD]", "<|im_end|>", "[UNK]", "<|im_start|>"]


def chat_tokenizer(vocab_size: int = 256):
    """A word-level tokenizer with <|im_start|> / <|im_end|> (end of turn = end of text) and the template."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = " ".join([SYSTEM, "system user assistant", *selfgen.PROMPTS])
    text = " ".join(topics[k] for k in sorted(topics))
    counts = Counter(re.findall(r"\w+|[^\w\s]", text))
    first = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]", words)))
    rest = [w for w, _ in counts.most_common() if w not in first]
    vocab = (SPECIAL + first + rest)[:vocab_size]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="<|im_end|>",
                                   unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    from conftest import make_tiny_llama

    folder = tmp_path_factory.mktemp("chat") / "tiny-chat"
    tok = chat_tokenizer()
    model = make_tiny_llama(vocab=256)
    model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PROXSPARSE_CACHE", str(tmp_path / "cache"))


def _truth(stream: list[int], prompts: list[list[int]], eos: int) -> list[bool]:
    """For a selfgen stream (prompt + answer + end of turn, again and again): which tokens are prompt."""
    flags, i = [], 0
    while i < len(stream):
        p = next(p for p in prompts if stream[i:i + len(p)] == p)       # every sequence starts with one
        end = stream.index(eos, i + len(p)) + 1 if eos in stream[i + len(p):] else len(stream)
        flags += [True] * len(p) + [False] * (end - i - len(p))
        i = end
    return flags


def test_the_scaffolding_is_the_system_prompt_the_role_tags_and_nothing_of_the_message():
    tok = chat_tokenizer()
    head, tail = selfgen.scaffold(tok)
    assert tok.decode(head, skip_special_tokens=False).split() == \
        ["<|im_start|>", "system", *SYSTEM.split(), "<|im_end|>", "<|im_start|>", "user"]
    assert tok.decode(tail, skip_special_tokens=False).split() == ["<|im_end|>", "<|im_start|>", "assistant"]
    assert selfgen.scaffold(type("Plain", (), {"chat_template": None})()) is None


def test_loss_weights_are_zero_exactly_where_the_next_token_is_chat_scaffolding(chat_folder, cache):
    """Windows at every offset of the model's own chat text, as `mix` and fresh text cut them: a
    position counts in the loss iff the token it predicts is an answer's (or its end of turn)."""
    from proxsparse_core.models.loading import load_model

    lm = load_model(str(chat_folder), device="cpu", dtype="float32")
    tok = lm.tokenizer
    stream = selfgen.generated_ids(lm.model, tok, 600, seed=0, max_new=24, batch=4)
    prompts = list(selfgen._prompt_ids(tok, selfgen.PROMPTS).values())
    truth = torch.tensor(_truth(stream.tolist(), prompts, tok.eos_token_id))
    assert 0.2 < truth.float().mean() < 0.8                      # prompts and answers both
    ctx = 48
    starts = range(0, stream.numel() - ctx, 3)
    rows = torch.stack([stream[s:s + ctx] for s in starts])
    weights = selfgen.answer_weights(rows, tok)
    expected = torch.stack([~truth[s + 1:s + ctx] for s in starts]).float()
    assert torch.equal(weights[:, :-1], expected)
    # no scaffolding in plain text: nothing is left out
    plain = torch.tensor(tok(" ".join(["the value of an object is its type"] * 40))["input_ids"][:ctx * 2]).view(2, ctx)
    assert selfgen.answer_weights(plain, tok) is None


def test_weighted_kl_ignores_positions_of_weight_zero():
    torch.manual_seed(0)
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = torch.randn(2, 5, 11)
    t_logp = torch.log_softmax(teacher, -1).topk(4, -1)
    weight = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float32)
    loss = bucket_kl(student, t_logp.values, t_logp.indices, weight)
    loss.backward()
    assert student.grad[weight == 0].abs().max() == 0 and student.grad[weight == 1].abs().max() > 0
    kept = weight.bool()
    alone = bucket_kl(student.detach()[kept][None], t_logp.values[kept][None], t_logp.indices[kept][None])
    assert float(loss.detach()) == pytest.approx(float(alone), rel=1e-6)          # the mean over the positions kept
    student.grad = None
    full_kl(student, teacher, weight).backward()
    assert student.grad[weight == 0].abs().max() == 0
    assert float(full_kl(student.detach(), teacher, weight)) == pytest.approx(
        float(full_kl(student.detach()[kept][None], teacher[kept][None])), rel=1e-6)


def _workspace(chat_folder, **kw):
    from proxsparse_core.workspace import Workspace
    from test_export import tiny_cfg

    ws = Workspace()
    ws.prune("magnitude", tiny_cfg(chat_folder, **kw))
    return ws


def test_recovery_samples_of_a_chat_model_on_the_builtin_text_hold_its_chat_turns(chat_folder, cache):
    ws = _workspace(chat_folder, samples=8)
    tok, run = ws.lm.tokenizer, ws.data.calibration
    head, _ = selfgen.scaffold(tok)
    heard = []
    samples = ws.tuning_samples(12, heard.append)
    assert samples.shape == (12, run.shape[1])
    assert torch.equal(samples[:6], run[:6])                              # half from the run's source …
    assert all(r[:len(head)] == head for r in samples[6:].tolist())      # … half start where a chat turn does
    assert not any(r[:len(head)] == head for r in run.tolist())
    assert any(getattr(h, "stage", "") == "chat-turns" for h in heard)
    assert ws.tuning_samples(0) is run                                   # 0 is still exactly the run's samples


def test_recovery_of_a_chat_model_leaves_the_scaffolding_out_of_its_loss(chat_folder, cache, monkeypatch):
    ws = _workspace(chat_folder, samples=8)
    seen = []
    real = recovery.MaskedFinetuner.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        seen.append((self.samples, self.weights))
    monkeypatch.setattr(recovery.MaskedFinetuner, "__init__", spy)
    for teacher in ("stored", "live"):
        res = ws.recover("magnitude", RecoveryConfig(method="finetune", steps=12, samples=12, teacher=teacher))
        assert res.status == "finished" and all(torch.isfinite(torch.tensor(e.loss)) for e in res.events)
    samples, weights = seen[-1]
    head, tail = selfgen.scaffold(ws.lm.tokenizer)
    inside = selfgen.scaffold_positions(samples, head, tail)
    assert inside[6:].any() and not inside[:6].any()
    assert torch.equal(weights[:, :-1] == 0, inside[:, 1:])              # exactly the positions predicting it
    assert (weights[:6] == 1).all()                                       # plain text: every position counts
