"""Experiment: recovery that also reads text the dense model writes from no prompt at all.

Recovery distils the dense model into its 2:4 version on calibration text: built-in
documentation and the model's own answers to a fixed list of instructions. Neither mentions
most of what the model knows (capitals, authors, planets), and facts are what a 2:4 model loses
first. Text the model samples from its start-of-text token alone covers its pre-training
distribution instead (news, stories, how-tos, code: what it happens to know), the idea of
data-free distillation (LLM-QAT, Liu et al. 2023). This script is `bench/quality.py` with one
change: a share FREE_SHARE of recovery's fine-tuning samples is replaced by windows of such text
(FREE_TOKENS tokens, sampled at temperature 1, top-p 0.95, in sequences of 256 new tokens, seeded
by the run's seed). Same arguments as quality.py; the free text is written once per process.

    FREE_SHARE=0.33 python bench/free_text.py --device cuda --preset bundled-quality \\
        --baselines '' --recover both:1500:samples=12000:batch=8 --answers 48 --more-prompts
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402
from proxsparse_core.data.text import calibration_samples, special_prefix  # noqa: E402
from proxsparse_core.workspace import Workspace  # noqa: E402

SHARE = float(os.environ.get("FREE_SHARE", "0.33"))
TOKENS = int(os.environ.get("FREE_TOKENS", "160000"))
BATCH, MAX_NEW = 64, 256


@torch.no_grad()
def free_text(model, tokenizer, tokens: int, seed: int) -> torch.Tensor:
    """About `tokens` token ids the model samples from its start-of-text token alone."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = model.get_input_embeddings().weight.device
    stream, k = [], 0
    model.eval()
    while len(stream) < tokens:
        torch.manual_seed(seed * 1_000_003 + k)
        x = torch.full((BATCH, 1), start, device=device)
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_p=0.95,
                             top_k=0, max_new_tokens=MAX_NEW, pad_token_id=tokenizer.eos_token_id)
        for row in out.tolist():
            stream += row
        k += 1
    print(f"free text: {len(stream)} tokens in {k} rounds", flush=True)
    return torch.tensor(stream[:tokens], dtype=torch.long)


_own = Workspace.tuning_samples


def tuning_samples(self, n, on_phase=None):
    """The run's fine-tuning samples with a share SHARE of them replaced by free-text windows."""
    base = _own(self, n, on_phase)
    n_free = int(round(SHARE * base.shape[0]))
    if n_free == 0:
        return base
    ctx, seed = base.shape[1], self._data_key[4]
    ids = free_text(self.lm.model, self.lm.tokenizer, TOKENS, seed)
    free = calibration_samples(ids, n_free, ctx, seed, special_prefix(self.lm.tokenizer))
    keep = torch.randperm(base.shape[0], generator=torch.Generator().manual_seed(seed))[:base.shape[0] - n_free]
    return torch.cat([base[keep.sort().values], free])


Workspace.tuning_samples = tuning_samples

if __name__ == "__main__":
    quality.main()
