"""Chat turns for recovery's fine-tuning: whole answers, read from the prompt on.

A 2:4 model that must still *answer* is best recovered on what it will be asked to do: a prompt
in the chat template followed by an answer. With `RecoveryConfig.chat` set, every other
fine-tuning step reads such chat turns instead of calibration windows, each window starting where
a prompt starts (so the first tokens of an answer, on which a greedy reply hinges, are always
seen; a window cut at a random offset of text rarely starts there). The prompts are selfgen's
fixed list (none of them is one of the app's example prompts). Two kinds of answers:

* ``dense`` — the dense model's own sampled answers (selfgen.py: written once per model and seed,
  cached), labelled by the dense model before fine-tuning starts.
* ``pruned`` — the 2:4 model's own sampled answers, written afresh from the weights being
  trained every `selfgen.BATCH` chats and labelled by the dense model (on-policy distillation):
  the teacher corrects exactly the mistakes the pruned model makes in its own replies (loops,
  derailing), which text the dense model wrote never shows it.
"""
from __future__ import annotations

import math

import torch

from .distill import teacher_targets
from .errors import UserError
from .masks import load_weights
from .selfgen import BATCH, MAX_NEW, PROMPTS, answer_round, generated_chats, prompt_order

CHAT_KINDS = ("none", "dense", "pruned")


def chat_windows(stream: torch.Tensor, starts: list[int], n: int, ctx: int) -> torch.Tensor:
    """n windows of ctx tokens ([n, ctx]); window i starts at chat `starts[i % len(starts)]` and
    runs on into the chats after it (from the stream's start again after its end)."""
    if not starts:
        raise ValueError("no chats to cut windows from")
    ext = stream.repeat(math.ceil((max(starts) + ctx) / stream.numel()) + 1)
    return torch.stack([ext[starts[i % len(starts)]:starts[i % len(starts)] + ctx] for i in range(n)])


class ChatTurns:
    """The chat half of a fine-tuning run: batch(k) gives the k-th chat step's token ids and the
    dense model's targets for them. `originals` are the dense weights W0 (the teacher)."""

    def __init__(self, lm, kind: str, ctx: int, seed: int, originals: dict, stop=None):
        self.lm, self.kind, self.ctx, self.seed, self.originals, self.stop = lm, kind, ctx, seed, originals, stop
        self.windows = self.targets = None
        self.first = 0                 # index (in chats) of the first row of `windows`
        self.rounds = 0                # rounds of the pruned model's own answers written so far

    def prepare(self, n: int) -> None:
        """With the model dense: for ``dense``, cut n windows from the dense model's own chats
        (seeded order) and label them now; ``pruned`` writes its chats later, as it goes."""
        if self.kind != "dense":
            return
        stream, starts = generated_chats(self.lm.model, self.lm.tokenizer, tokens=max(n, 1) * self.ctx,
                                         seed=self.seed)
        order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.windows = chat_windows(stream, [starts[i] for i in order], n, self.ctx)
        self.targets = teacher_targets(self.lm.model, self.windows, stop=self.stop)

    def batch(self, k: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [size, ctx], teacher log-probs, teacher token ids) of chat step k (0, 1, …)."""
        rows = torch.arange(k * size, (k + 1) * size)
        if self.kind == "pruned":
            while self.windows is None or rows[-1] >= self.first + self.windows.shape[0]:
                self._own_round()
            rows = rows - self.first
        else:
            rows = rows % self.windows.shape[0]
        return (self.windows[rows].to(device), *self.targets.batch(rows, device))

    @torch.no_grad()
    def _own_round(self) -> None:
        """The pruned model (the weights in the model now) answers the next BATCH prompts; the
        dense model labels the answers; the pruned weights are put back."""
        model, prunable = self.lm.model, self.lm.prunable
        order = prompt_order(self.seed)
        chats: list[list[int]] = []
        for _ in range(4):             # a round whose answers all ended at once teaches nothing: the next
            i = self.rounds * BATCH
            texts = [PROMPTS[order[(i + j) % len(order)]] for j in range(BATCH)]
            chats = answer_round(model, self.lm.tokenizer, texts, self.seed * 1_000_003 + 7_919 + i, MAX_NEW)
            self.rounds += 1
            if chats:
                break
        else:
            raise UserError("the 2:4 model ended every answer at once, so it has no answers of its own to "
                            "learn from; recover with chat 'dense' (the dense model's answers) instead")
        stream = torch.tensor([t for c in chats for t in c], dtype=torch.long)
        starts = [sum(len(c) for c in chats[:j]) for j in range(len(chats))]
        windows = chat_windows(stream, starts, len(chats), self.ctx)
        current = {n: w.detach().clone() for n, w in prunable.weights().items()}
        try:
            load_weights(prunable, self.originals)
            targets = teacher_targets(model, windows, stop=self.stop)
        finally:
            load_weights(prunable, current)
        self.first = 0 if self.windows is None else self.first + self.windows.shape[0]
        self.windows, self.targets = windows, targets
