"""Self-distillation: the dense model is the teacher of its own 2:4 version.

Instead of the next *token* of the calibration text (the LM loss), the student matches the
dense model's whole next-token *distribution* at every position. That carries far more signal
per token than one label and, above all, it asks the pruned model to behave like the dense one
rather than to fit the calibration text: masks learned this way hold up better on text of other
domains (measured in bench/RESULTS.md).

The teacher is the same model with its original weights W0, run once over the calibration
samples before learning starts. Storing whole distributions would cost samples × ctx × vocab
floats, so each position keeps its top-k tokens' log-probabilities and the rest is one "tail"
bucket. The loss is the KL divergence between the teacher's and the student's distributions
over those k + 1 buckets: zero exactly when the student assigns the same probability to each
of the teacher's top-k tokens (and hence to the tail), a lower bound of the full KL otherwise.

For long recoveries (millions of tokens) storing even top-k targets is too much, so the teacher
can also run *live*: the same model with W0 swapped in for the prunable weights
(`torch.func.functional_call`, no second copy of the rest of the model), on the same batch as
the student, and the loss is the full KL divergence over the vocabulary (`full_kl`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_K = 64            # teacher tokens kept per position (≥ 95% of the mass for typical LMs)
_TINY = 1e-12


@dataclass
class TeacherTargets:
    """The teacher's top-k next-token log-probabilities for every calibration sample."""
    logp: torch.Tensor      # [n, ctx, k] float16, log-probabilities of the top-k tokens
    index: torch.Tensor     # [n, ctx, k] int32, their token ids

    def batch(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.logp[rows].to(device, torch.float32, non_blocking=True),
                self.index[rows].to(device, torch.long, non_blocking=True))


@torch.no_grad()
def teacher_targets(model, samples: torch.Tensor, k: int = TOP_K, batch: int = 4,
                    progress=None, stop=None) -> TeacherTargets:
    """Run the (dense) model over `samples` [n, ctx] and keep each position's top-k log-probs."""
    from proxsparse_core.errors import Stopped

    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    logps, idxs = [], []
    try:
        for i in range(0, samples.shape[0], batch):
            if stop is not None and stop.is_set():
                raise Stopped("stopped while the teacher read the calibration samples")
            x = samples[i:i + batch].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            lp = torch.log_softmax(logits, dim=-1)
            top = lp.topk(min(k, lp.shape[-1]), dim=-1)
            logps.append(top.values.to("cpu", torch.float16))
            idxs.append(top.indices.to("cpu", torch.int32))
            if progress:
                progress(min(i + batch, samples.shape[0]), samples.shape[0])
    finally:
        model.train(was_training)
    return TeacherTargets(torch.cat(logps), torch.cat(idxs))


def bucket_kl(student_logits: torch.Tensor, t_logp: torch.Tensor, t_index: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(teacher ‖ student) over positions, on the teacher's top-k tokens plus one tail bucket.

    student_logits [b, t, vocab]; t_logp, t_index [b, t, k]. Differentiable in the student. `weight`
    [b, t] (optional): each position's weight, the mean then taken over the weights (positions of weight
    0 — a chat prompt's scaffolding, see selfgen.answer_weights — teach nothing; all 0 gives 0)."""
    s_logp = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, t_index)     # [b, t, k]
    p = t_logp.exp()
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - s_logp.exp().sum(-1)).clamp_min(0)
    head = (p * (t_logp - s_logp)).sum(-1)
    tail = p_tail * (torch.log(p_tail + _TINY) - torch.log(q_tail + _TINY))
    if weight is None:
        return (head + tail).mean()
    return ((head + tail) * weight).sum() / weight.sum().clamp_min(1.0)


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over positions of KL(teacher ‖ student) over the whole vocabulary, each position times its
    `weight` [b, t] when given (callers divide by the number of positions, or the sum of the weights).
    Differentiable in the student; [b, t, vocab] each."""
    s_logp = torch.log_softmax(student_logits.float(), dim=-1)
    t_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    if weight is None:
        return torch.nn.functional.kl_div(s_logp, t_logp, reduction="sum", log_target=True)
    per_position = torch.nn.functional.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)
    return (per_position * weight).sum()


def live_teacher_logits(model, originals: dict, batch: torch.Tensor) -> torch.Tensor:
    """The dense model's logits on `batch`: `model` run with the weights `originals` (module name →
    W0 on the module's device) in place of its current prunable weights, without gradients and in
    eval mode (no dropout), then left as it was."""
    from torch.func import functional_call

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return functional_call(model, {f"{n}.weight": w for n, w in originals.items()}, (),
                                   {"input_ids": batch, "use_cache": False}).logits
    finally:
        model.train(was_training)


def distill_loss(model, batch: torch.Tensor, t_logp: torch.Tensor, t_index: torch.Tensor,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """The student's bucket KL to the teacher on one batch of calibration token ids (positions
    weighted by `weight` [b, t] when given)."""
    logits = model(input_ids=batch, use_cache=False).logits
    return bucket_kl(logits, t_logp, t_index, weight)

