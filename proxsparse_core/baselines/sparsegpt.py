"""SparseGPT for one linear layer, 2:4 pattern (Frantar & Alistarh, 2023).

SparseGPT prunes a layer so that its outputs on calibration inputs X change as little as
possible, ‖W X − Ŵ X‖². The Hessian of that error with respect to a row of W is H = 2 X Xᵀ (one
matrix shared by all rows). Columns are visited left to right; when a weight is removed, the
optimal-brain-surgeon update spreads its error over the columns not visited yet, using rows of
the inverse Hessian's upper Cholesky factor. In every group of 4 columns the two weights with
the smallest w²/d² (d: the factor's diagonal) are pruned, where w already includes the updates
of earlier columns. Work is done in blocks of 128 columns so the big updates are matrix products.

Unlike the other methods SparseGPT *updates* the surviving weights, so its pruned model is not
W0 * mask; the mask applied to W0 alone ("mask-only") is a separate, fairer comparison.
"""
from __future__ import annotations

import torch

from proxsparse_core.sparsity.masks import mask_2to4

DAMP = 0.01          # dampening: 1 % of the mean Hessian diagonal added to the diagonal
BLOCK = 128          # columns per lazy-update block (a multiple of 4)


class SparseGPTLayer:
    """Collects the Hessian of one nn.Linear from its inputs, then prunes it to 2:4."""

    def __init__(self, layer: torch.nn.Linear):
        self.layer = layer
        cols = layer.weight.shape[1]
        self.H = torch.zeros(cols, cols, device=layer.weight.device, dtype=torch.float32)
        self.M = None   # with add_pair: 2/n Σ x_dense x_pruned^T, the dense model's inputs against the pruned one's
        self.n = 0   # calibration tokens seen

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor):
        """Fold the inputs x [..., cols] into the running mean H = 2/n Σ x xᵀ."""
        x = x.reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        self.H.mul_(self.n / (self.n + t))
        self.n += t
        x = x * (2 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)

    @torch.no_grad()
    def add_pair(self, x: torch.Tensor, x_dense: torch.Tensor):
        """Fold in inputs x (from the model pruned so far) with the dense model's inputs at the same
        positions: then `prune` reconstructs the *dense* model's outputs W0·x_dense from x, so
        that the layer also makes up for the error the layers before it left (see prune)."""
        x = x.reshape(-1, x.shape[-1]).float()
        xd = x_dense.reshape(-1, x_dense.shape[-1]).float()
        t = x.shape[0]
        if self.M is None:
            self.M = torch.zeros_like(self.H)
        self.M.mul_(self.n / (self.n + t))
        self.add_batch(x)
        f = (2 / self.n) ** 0.5
        self.M.addmm_((xd * f).t(), x * f)

    @torch.no_grad()
    def prune(self, damp: float = DAMP, block: int = BLOCK,
              keep: torch.Tensor | None = None, dense_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (updated weight, keep mask), both shaped like the weight; the layer is unchanged.

        Exactly 2 of every 4 consecutive input columns are kept in each row: SparseGPT's choice,
        or the given `keep` mask (then only the weight update runs: the optimal-brain-surgeon
        reconstruction of the layer's outputs with that mask held fixed, used for recovery).
        After add_pair, the target is W0·(x + dense_share·(x_dense − x)): 0 (the default) is the
        layer's own outputs on its inputs (SparseGPT), 1 the dense model's outputs."""
        W = self.layer.weight.detach().float().clone()
        if self.n == 0:     # read no input (an expert the router never chose): no update, |W| decides
            kept = mask_2to4(W) if keep is None else keep.to(W.device, torch.bool)
            return (W * kept).to(self.layer.weight.dtype), kept
        rows, cols = W.shape
        H = self.H.clone()
        dead = H.diagonal() == 0           # inputs that were always zero: nothing to preserve
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        H.diagonal().add_(damp * H.diagonal().mean())
        L = torch.linalg.cholesky(H)
        if self.M is not None and dense_share:
            # the target T = Xa·W0ᵀ with Xa = X + α(Xd − X) (α: dense_share): min ‖T − X·Ŵᵀ‖² =
            # ‖X·(W' − Ŵ)ᵀ‖² + const, W' = W0·Ma·H⁻¹ (Ma = Xaᵀ X = H + α(M − H)) the best dense weight
            # for these inputs, written W0 + α·W0·(M − H)·H⁻¹ (W' = W0 when α = 0 or Xd = X). The OBS
            # sweep below then prunes W' instead of W0
            w0 = self.layer.weight.detach().float()
            W += dense_share * torch.cholesky_solve((self.M - self.H).t() @ w0.t(), L).t()
            W[:, dead] = 0.0
        # Upper Cholesky factor of H⁻¹: row i holds the OBS update of column i onto columns > i.
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        fixed = keep is not None
        pruned = (~keep.to(W.device, torch.bool)) if fixed else torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            W1 = W[:, i1:i2].clone()
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = Hinv1.diagonal()
            Err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                if i % 4 == 0 and not fixed:   # choose this group's 2 pruned columns from the current weights
                    score = W1[:, i:i + 4] ** 2 / d[i:i + 4] ** 2
                    drop = torch.topk(score, 2, dim=1, largest=False).indices
                    pruned[:, i1 + i:i1 + i + 4].scatter_(1, drop, True)
                w = W1[:, i]
                q = torch.where(pruned[:, i1 + i], torch.zeros_like(w), w)
                err = (w - q) / d[i]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                W1[:, i] = q
                Err1[:, i] = err
            W[:, i1:i2] = W1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        W[pruned] = 0.0
        return W.to(self.layer.weight.dtype), ~pruned
