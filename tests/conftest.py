"""Shared test fixtures: offline, CPU, tiny random models built in the test."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PROXSPARSE_TRACEBACK", "1")    # a failing test shows where; the CLI says one line without it
# the memo of dense results (proxsparse_core/memo.py) of this session, never the user's; each test
# gets an empty one of its own (own_memo below)
os.environ["PROXSPARSE_MEMO_DIR"] = __import__("tempfile").mkdtemp(prefix="proxsparse-test-memo-")
# the run folders the app saves every result in (proxsparse_core/paths.py), never the user's
os.environ["PROXSPARSE_RUNS"] = __import__("tempfile").mkdtemp(prefix="proxsparse-test-runs-")

import pytest  # noqa: E402
import torch  # noqa: E402


def make_tiny_llama(seed: int = 0, hidden: int = 64, inter: int = 128, layers: int = 2, vocab: int = 256):
    """A random Llama small enough to train in milliseconds, with real Llama structure."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


class TinyTokenizer:
    """Byte-level stand-in for a tokenizer: enough for data preparation and generation."""
    pad_token_id = 0
    eos_token_id = 1
    chat_template = None

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False, return_tensors=None):
        ids = [2 + (b % 250) for b in text.encode("utf-8")]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids])}
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) - 2 for i in ids if int(i) >= 2).decode("utf-8", "replace")


@pytest.fixture(autouse=True)
def own_memo(tmp_path_factory, monkeypatch):
    """Each test starts with an empty memo of dense results (proxsparse_core/memo.py), so no test
    reads what another computed; tests/test_memo.py checks the memo itself."""
    monkeypatch.setenv("PROXSPARSE_MEMO_DIR", str(tmp_path_factory.mktemp("memo")))


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_lm():
    """A models.LoadedModel around a tiny random Llama (no files, no network)."""
    from proxsparse_core.models.loading import LoadedModel
    from proxsparse_core.sparsity.prunable import find_prunable

    model = make_tiny_llama()
    return LoadedModel(model, TinyTokenizer(), "tiny", "tiny-llama", "cpu", torch.float32,
                       find_prunable(model), 512)


def pytest_sessionfinish(session, exitstatus):
    """Stop any job a failed test left running (e.g. a 100,000-step run whose test failed before its
    Stop): a job thread still inside torch when the interpreter exits aborts the process (SIGABRT),
    which would turn one failed test into a crashed run."""
    import gc
    import sys
    jobs_module = sys.modules.get("ui.jobs")
    if jobs_module is None:
        return
    for manager in [o for o in gc.get_objects() if type(o) is jobs_module.JobManager]:
        job = manager.job
        if job is not None and job.thread is not None and job.thread.is_alive():
            job.stop.set()
            job.thread.join(30)
