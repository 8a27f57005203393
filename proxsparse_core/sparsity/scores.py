"""What ranks the four weights of a group: |W| alone, or |W| weighted by how much its input carries.

Within a group of 4 consecutive input channels j of one output row, magnitude pruning keeps the
two largest |W_ij|; Wanda keeps the two largest |W_ij|·‖X_j‖₂, where ‖X_j‖₂ is the norm of input
channel j over all calibration tokens. A weight on a channel that carries large values moves the
output more, so the second ranking is the better guess of what matters (on models with large
activation outliers, much better).

The ProxSparse learner can use either ranking (`RunConfig.score`): with "activation" the 2:4
regulariser acts on W·diag(a) instead of W, with a_j = ‖X_j‖₂ of the dense model, normalised to
rms 1 per layer. The prox step then solves the same problem in those coordinates — the proximal
step of R(W·diag(a)) in the metric ‖(W − Z)·diag(a)‖² — so the weights it pushes to zero are those
Wanda would drop unless the loss says otherwise, and the mask is read the same way.
"""
from __future__ import annotations

import threading

import torch

from proxsparse_core.errors import Stopped

MIN_WEIGHT = 1e-2   # a channel's weight a_j never goes below this share of its layer's rms: dividing by
                    # a dead channel's 0 would blow its weights up on the way back from W·diag(a)


class InputNorms:
    """Running Σ x_j² per input channel j of one linear layer (Wanda's activation statistic)."""

    def __init__(self, layer: torch.nn.Linear):
        self.sq = torch.zeros(layer.weight.shape[1], device=layer.weight.device, dtype=torch.float32)

    def add_batch(self, x: torch.Tensor):
        self.sq += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)


def wanda_score(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor | None:
    """|W_ij| · ‖X_j‖₂ — a weight matters more when its input channel carries large values. None
    (rank by |W|) for a layer that read no input at all: an expert the router never chose."""
    return ranking(weight, sq_norms.sqrt()) if bool(sq_norms.any()) else None


class ChannelNorms:
    """While inside `with ChannelNorms(prunable) as norms:`, every forward pass of the model adds its
    inputs to Σ x_j² of every prunable layer; `norms.weights()` turns them into channel weights. So
    a pass the caller makes anyway (the distillation teacher's) reads them at no extra cost."""

    def __init__(self, prunable):
        self.prunable = prunable
        self.norms = {n: InputNorms(prunable.modules[n]) for n in prunable.names}
        self.handles = []

    def __enter__(self):
        self.handles = [self.prunable.modules[n].register_forward_hook(
            lambda m, args, out, c=self.norms[n]: c.add_batch(args[0].detach())) for n in self.prunable.names]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def weights(self) -> dict[str, torch.Tensor]:
        """a_j = ‖X_j‖₂ per prunable layer, scaled to rms 1 and floored at MIN_WEIGHT (float32, on
        each layer's device)."""
        out = {}
        for n, c in self.norms.items():
            if not bool(c.sq.any()):        # read nothing (an expert the router never chose): |W| alone
                out[n] = torch.ones_like(c.sq)
                continue
            a = c.sq.sqrt()
            a = a / a.pow(2).mean().sqrt().clamp_min(1e-30)
            out[n] = a.clamp_min(MIN_WEIGHT)
        return out


@torch.no_grad()
def channel_weights(lm, samples: torch.Tensor, batch: int = 8,
                    stop: threading.Event | None = None) -> dict[str, torch.Tensor]:
    """ChannelNorms.weights() from one pass of the model as it is now (dense) over `samples` [n, ctx]."""
    model = lm.model
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        with ChannelNorms(lm.prunable) as norms:
            for i in range(0, samples.shape[0], batch):
                if stop is not None and stop.is_set():
                    raise Stopped("stopped while reading the calibration activations")
                model(input_ids=samples[i:i + batch].to(device), use_cache=False)
    finally:
        model.train(was_training)
    return norms.weights()


def ranking(w: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor | None:
    """The score the 2:4 mask ranks by: None (|W|, the default) or |W|·a per input channel."""
    return None if cols is None else w.detach().float().abs() * cols.to(w.device).unsqueeze(0)
