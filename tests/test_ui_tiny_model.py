"""A tiny random Llama saved as a normal model folder (config, safetensors, tokenizer), so the
app can load it by path exactly like a user's local model — offline and in milliseconds.
The UI tests import `save_tiny_model` from here."""
from pathlib import Path

import torch

from conftest import make_tiny_llama

VOCAB = 320


def _tokenizer():
    """A byte-level BPE tokenizer trained in the test on the built-in corpus (no download)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:40]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_tiny_model(folder: Path) -> Path:
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tokenizer = _tokenizer()
    model = make_tiny_llama(vocab=len(tokenizer))
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_tiny_model_folder_loads_like_a_user_model(tmp_path):
    from proxsparse_core.models.loading import load_model

    lm = load_model(str(save_tiny_model(tmp_path / "tiny")), device="cpu", dtype="float32")
    assert len(lm.prunable.names) == 14          # 2 blocks × (q, k, v, o, gate, up, down)
    ids = lm.tokenizer("What is the capital of France?")["input_ids"]
    assert 0 < max(ids) < lm.model.config.vocab_size
    assert lm.tokenizer.decode(ids) == "What is the capital of France?"
    with torch.no_grad():
        assert lm.model(torch.tensor([ids])).logits.shape[-1] == lm.model.config.vocab_size
