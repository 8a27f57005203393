"""The memo of dense results (proxsparse_core/memo.py): a second workspace (a second run, a second
start of the app) reads the dense model's perplexity and top-1 predictions, its calibration channel
norms, its held-out loss and the tokenised text instead of computing them again — and never when
the model's weights, the text or the windows changed."""
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from proxsparse_core import memo
from proxsparse_core import workspace as workspace_module
from proxsparse_core.config import RunConfig
from proxsparse_core.inference.evaluate import score
from proxsparse_core.method import learner as learner_module
from proxsparse_core.models.loading import load_model
from proxsparse_core.results import DENSE
from proxsparse_core.workspace import Workspace


def _tokenizer():
    """A real fast tokenizer (word level, built offline from the built-in text)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = " ".join(topics[k] for k in sorted(topics))
    special = ["[PAD]", "[EOS]", "[UNK]"]
    words = [w for w, _ in Counter(re.findall(r"\w+|[^\w\s]", text)).most_common(253)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def _save(folder: Path, nudge: float = 0.0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if nudge:
        with torch.no_grad():                       # one weight of one layer
            model.model.layers[1].mlp.down_proj.weight[3, 5] += nudge
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("memo-models")
    return _save(root / "a"), _save(root / "b", nudge=0.5)


def _cfg(folder, **kw) -> RunConfig:
    base = dict(model=str(folder), device="cpu", dtype="float32", samples=8, ctx=32, eval_ctx=32, eval_windows=4,
                steps=2, lambda1=0.5, lr=1e-3, layer_stats_every=1, score="activation", lambda_scale="layer")
    return RunConfig(**{**base, **kw})


@pytest.fixture
def counted(monkeypatch):
    """How often the dense model's held-out score and channel norms are really computed."""
    calls = Counter()
    real_score, real_norms = workspace_module.score, learner_module.channel_weights

    def spy_score(*a, **k):
        calls["score"] += 1
        return real_score(*a, **k)

    def spy_norms(*a, **k):
        calls["norms"] += 1
        return real_norms(*a, **k)
    monkeypatch.setattr(workspace_module, "score", spy_score)
    monkeypatch.setattr(learner_module, "channel_weights", spy_norms)
    return calls


def _dense(cfg):
    ws = Workspace()
    ws.load(cfg)
    return ws, ws.perplexity(DENSE), ws.top1[DENSE]


def _measured(cfg):
    """The dense score measured directly, without any workspace or memo."""
    lm = load_model(cfg.model, "cpu", "float32")
    ws = Workspace()
    ws.load(cfg)
    with ws.scoring_products():        # the products every workspace score uses here
        return score(lm.model, ws.data.held_out)


def test_a_second_workspace_reads_the_dense_score_norms_and_held_out_loss(folders, counted):
    a, _ = folders
    first, events, events2 = Workspace(), [], []
    first.load(_cfg(a))
    assert not first.dense_score_known()                  # never measured: its phase will take time
    first.learn(_cfg(a), events.append)
    p1 = first.perplexity(DENSE)
    assert counted == {"score": 1, "norms": 1}
    assert first.memo.hits == 0

    second = Workspace()                 # a second run, or the app started again
    second.load(_cfg(a))
    assert second.dense_score_known() and not Workspace().dense_score_known()   # kept on disk; nothing loaded
    second.memo.hits = 0
    second.learn(_cfg(a), events2.append)
    p2 = second.perplexity(DENSE)
    assert counted == {"score": 1, "norms": 1}            # nothing of the dense model measured again
    assert second.memo.hits == 3                          # channel norms, held-out loss, dense score
    assert p2 == p1 and torch.equal(second.top1[DENSE], first.top1[DENSE])
    assert events2[0].heldout_loss_dense == events[0].heldout_loss_dense
    # the run read the same norms: the same steps, the same mask
    assert [e.lm_loss for e in events2] == [e.lm_loss for e in events]
    assert all(torch.equal(second.results["proxsparse"].masks[n], first.results["proxsparse"].masks[n])
               for n in first.results["proxsparse"].masks)
    direct = _measured(_cfg(a))
    assert p1 == direct.ppl and torch.equal(first.top1[DENSE], direct.top1)


@pytest.mark.parametrize("change", ["weights", "text", "window count", "window length"])
def test_a_change_of_model_text_or_windows_is_measured_again(folders, counted, tmp_path, change):
    a, b = folders
    text = tmp_path / "corpus.txt"
    from pydoc_data.topics import topics
    docs = [topics[k] for k in sorted(topics)][:60]
    text.write_text("\n\n".join(docs))
    before = _cfg(a, data=str(text))
    ws0, p0, top0 = _dense(before)
    assert counted["score"] == 1
    _, again, _ = _dense(before)
    assert counted["score"] == 1 and again == p0          # unchanged: read

    if change == "weights":
        after = _cfg(b, data=str(text))
    elif change == "text":
        text.write_text("\n\n".join(reversed(docs)))        # the same words, another held-out part
        after = before
    elif change == "window count":
        after = _cfg(a, data=str(text), eval_windows=3)
    else:
        after = _cfg(a, data=str(text), eval_ctx=24)
    ws1, p1, top1 = _dense(after)
    assert counted["score"] == 2, "the changed setting must be measured, not read"
    direct = _measured(after)
    assert p1 == direct.ppl and torch.equal(top1, direct.top1)
    assert p1 != p0


def test_changed_weights_or_samples_read_their_own_channel_norms(folders, counted):
    a, b = folders
    Workspace().learn(_cfg(a))
    assert counted["norms"] == 1
    Workspace().learn(_cfg(b))                            # other weights
    assert counted["norms"] == 2
    Workspace().learn(_cfg(a, seed=1))                    # other samples
    assert counted["norms"] == 3
    Workspace().learn(_cfg(a, samples=9))                 # other samples
    assert counted["norms"] == 4
    Workspace().learn(_cfg(a))                            # the first again: read
    assert counted["norms"] == 4


def test_tokenised_text_is_read_back_only_for_the_same_tokenizer_and_text(folders):
    from proxsparse_core.data.text import tokenize

    a, _ = folders
    tok = load_model(str(a), "cpu", "float32").tokenizer
    calls = []

    class Counting:
        """The tokenizer, counting its encodings (its fingerprint is the real one's)."""
        backend_tokenizer = tok.backend_tokenizer

        def __call__(self, *args, **kw):
            calls.append(1)
            return tok(*args, **kw)
    counting = Counting()
    first = tokenize(counting, "def f(x): return x + 1")
    assert tokenize(counting, "def f(x): return x + 1").tolist() == first.tolist() and len(calls) == 1
    assert tokenize(counting, "def f(y): return y + 1").tolist() != first.tolist() and len(calls) == 2
    assert first.dtype == torch.long and first.tolist() == tok("def f(x): return x + 1",
                                                               add_special_tokens=False)["input_ids"]


def test_memo_off_broken_entries_and_models_off_the_cpu_compute_anew(folders, counted, monkeypatch):
    a, _ = folders
    _, p0, _ = _dense(_cfg(a))
    monkeypatch.setenv("PROXSPARSE_MEMO", "0")
    _dense(_cfg(a))
    assert counted["score"] == 2
    monkeypatch.delenv("PROXSPARSE_MEMO")
    for f in memo.folder().rglob("*.pt"):                 # cut short: read as absent, then rewritten
        f.write_bytes(f.read_bytes()[:20])
    _, p1, _ = _dense(_cfg(a))
    assert counted["score"] == 3 and p1 == p0
    _dense(_cfg(a))
    assert counted["score"] == 3
    meta = torch.nn.Linear(4, 4, device="meta")
    assert not memo.ModelMemo(meta).usable and memo.ModelMemo(meta).lookup("x", 1) is None


def test_fingerprint_sees_every_bit_of_every_weight_and_buffer():
    lin = torch.nn.Linear(8, 4).to(torch.bfloat16)
    fp = memo.model_fingerprint(lin)
    clone = torch.nn.Linear(8, 4).to(torch.bfloat16)
    clone.load_state_dict(lin.state_dict())
    assert memo.model_fingerprint(clone) == fp
    with torch.no_grad():
        clone.weight.view(torch.int16)[0, 0] ^= 1          # the last bit of one weight
    memo.forget(clone)
    assert memo.model_fingerprint(clone) != fp
    assert memo.digest(torch.zeros(4)) != memo.digest(torch.zeros(4, dtype=torch.float64))
    assert memo.digest(torch.zeros(2, 2)) != memo.digest(torch.zeros(4))
    assert memo.digest("ab", "c") != memo.digest("a", "bc")


def test_the_memo_keeps_the_newest_entries_of_each_kind(monkeypatch):
    import os
    import time

    monkeypatch.setattr(memo, "MAX_ENTRIES", 3)
    for i in range(5):
        memo.save("kind", f"k{i}", {"v": i})
        path = memo.folder() / "kind" / f"k{i}.pt"
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
    memo.save("kind", "k5", {"v": 5})
    assert sorted(p.stem for p in (memo.folder() / "kind").glob("*.pt")) == ["k3", "k4", "k5"]
    assert memo.load("kind", "k5") == {"v": 5} and memo.load("kind", "k0") is None


def test_a_read_keeps_an_entry_and_a_kind_stays_within_its_bytes(monkeypatch):
    """Trimming drops the least recently *used* entry (a read counts), so the values of the model shown
    every day outlive a round of trying other models; and a kind never holds more than its bytes."""
    import os
    import time

    monkeypatch.setattr(memo, "MAX_ENTRIES", 3)
    for i in range(3):
        memo.save("lru", f"k{i}", {"v": i})
        os.utime(memo.folder() / "lru" / f"k{i}.pt", (time.time() - 100 + i, time.time() - 100 + i))
    assert memo.load("lru", "k0") == {"v": 0}          # the oldest written, read just now
    memo.save("lru", "k3", {"v": 3})
    assert sorted(p.stem for p in (memo.folder() / "lru").glob("*.pt")) == ["k0", "k2", "k3"]
    monkeypatch.setattr(memo, "MAX_ENTRIES", 100)
    size = (memo.folder() / "lru" / "k3.pt").stat().st_size
    monkeypatch.setattr(memo, "MAX_KIND_BYTES", 2 * size + size // 2)
    memo.save("lru", "k4", {"v": 4})
    assert sorted(p.stem for p in (memo.folder() / "lru").glob("*.pt")) == ["k3", "k4"]
