"""Text the model writes itself (selfgen.py): deterministic per model and seed, cached, and a
longer request extends the cached stream so that it equals what one run would have made."""
import pytest
import torch

from conftest import TinyTokenizer
from proxsparse_core.data import selfgen
from proxsparse_core.errors import UserError


@pytest.fixture
def small(monkeypatch, tmp_path):
    """Short rounds (4 answers of 16 tokens) so a test generates in well under a second."""
    monkeypatch.setenv("PROXSPARSE_CACHE", str(tmp_path))
    return dict(max_new=16, batch=4)


def _files(tmp_path):
    return sorted((tmp_path / "selfgen").glob("*.pt"))


def test_the_stream_is_deterministic_cached_and_holds_the_tokens_asked_for(tiny_llama, small, tmp_path, monkeypatch):
    tok = TinyTokenizer()
    a = selfgen.generated_ids(tiny_llama, tok, 150, seed=3, **small)
    assert a.numel() >= 150 and a.dtype == torch.long and len(_files(tmp_path)) == 1
    calls = []
    real = selfgen._generate
    monkeypatch.setattr(selfgen, "_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = selfgen.generated_ids(tiny_llama, tok, 150, seed=3, **small)
    assert torch.equal(a, again) and not calls           # read from the cache, not generated again
    other = selfgen.generated_ids(tiny_llama, tok, 150, seed=4, **small)
    assert not torch.equal(a[:100], other[:100])          # another seed, other text
    # every sequence is a prompt of the fixed list followed by the model's answer and end-of-text
    first = a[: a.tolist().index(tok.eos_token_id)].tolist()
    assert any(tok(p + "\n")["input_ids"] == first[:len(tok(p + "\n")["input_ids"])] for p in selfgen.PROMPTS)


def test_a_longer_request_extends_the_stream_exactly_as_one_run(tiny_llama, small, tmp_path, monkeypatch):
    tok = TinyTokenizer()
    short = selfgen.generated_ids(tiny_llama, tok, 150, seed=1, **small)
    long = selfgen.generated_ids(tiny_llama, tok, 600, seed=1, **small)
    assert long.numel() >= 600 and torch.equal(long[:short.numel()], short)
    assert torch.equal(selfgen.generated_ids(tiny_llama, tok, 150, seed=1, **small), short)   # still the same
    monkeypatch.setenv("PROXSPARSE_CACHE", str(tmp_path / "fresh"))
    assert torch.equal(selfgen.generated_ids(tiny_llama, tok, 600, seed=1, **small), long)    # = one run of 600


def test_a_damaged_cache_file_is_made_again(tiny_llama, small, tmp_path):
    tok = TinyTokenizer()
    a = selfgen.generated_ids(tiny_llama, tok, 150, seed=2, **small)
    _files(tmp_path)[0].write_bytes(b"not a tensor file")
    assert torch.equal(selfgen.generated_ids(tiny_llama, tok, 150, seed=2, **small), a)


def test_a_model_that_ends_every_answer_at_once_is_a_clear_error(tiny_llama, small, monkeypatch):
    tok = TinyTokenizer()

    def ends_at_once(input_ids, max_new_tokens, **kw):      # every answer: end-of-text right away
        return torch.cat([input_ids, torch.full((input_ids.shape[0], max_new_tokens), tok.eos_token_id)], 1)
    monkeypatch.setattr(tiny_llama, "generate", ends_at_once)
    with pytest.raises(UserError, match="ended almost every answer"):
        selfgen.generated_ids(tiny_llama, tok, 150, seed=0, **small)


def test_fresh_text_alternates_instruction_rounds_and_free_rounds_from_the_start_token(tiny_llama, small, tmp_path,
                                                                                      monkeypatch):
    """fresh_ids: round 0 answers instructions (the prompt is in the stream), round 1 samples from the
    start-of-text token alone (no prompt in the stream, and generate was given only that token)."""
    tok = TinyTokenizer()
    monkeypatch.setattr(selfgen, "FRESH_BATCH", 4)
    monkeypatch.setattr(selfgen, "FRESH_NEW", 16)
    given = []
    real = tiny_llama.generate
    monkeypatch.setattr(tiny_llama, "generate", lambda x, **kw: given.append((x.clone(), kw["temperature"])) or real(x, **kw))
    ids = selfgen.fresh_ids(tiny_llama, tok, 400, seed=0)
    assert len(given) >= 2
    assert given[0][1] == 0.8 and given[0][0].shape[1] > 1                       # instructions
    assert given[1][1] == 1.0 and given[1][0].tolist() == [[tok.eos_token_id]] * 4  # no bos: end-of-text starts it
    stream = ids.tolist()
    prompts = [tok(p + "\n")["input_ids"] for p in selfgen.PROMPTS]
    seqs, cur = [], []
    for t in stream:
        cur.append(t)
        if t == tok.eos_token_id:
            seqs.append(cur)
            cur = []
    with_prompt = [any(s[:len(p)] == p for p in prompts) for s in seqs]
    assert any(with_prompt) and not all(with_prompt)                              # both kinds of round are there


def test_a_small_fresh_text_request_is_written_in_small_batches(tiny_llama, small, monkeypatch):
    """A CPU user asking for a few thousand tokens must not wait for 512-answer rounds: the batch is
    about a quarter of the request in answers (at least FRESH_MIN_BATCH), capped at FRESH_BATCH."""
    tok = TinyTokenizer()
    monkeypatch.setattr(selfgen, "FRESH_NEW", 16)
    batches = []
    real = tiny_llama.generate
    monkeypatch.setattr(tiny_llama, "generate", lambda x, **kw: batches.append(x.shape[0]) or real(x, **kw))
    selfgen.fresh_ids(tiny_llama, tok, 100, seed=0)
    assert batches and set(batches) == {selfgen.FRESH_MIN_BATCH}
    batches.clear()
    selfgen.fresh_ids(tiny_llama, tok, 16 * 4 * 20, seed=1)                    # 20 answers a round
    assert batches and set(batches) == {20}
    monkeypatch.setattr(selfgen, "FRESH_BATCH", 12)
    batches.clear()
    selfgen.fresh_ids(tiny_llama, tok, 16 * 4 * 20, seed=2)
    assert batches and set(batches) == {12}
