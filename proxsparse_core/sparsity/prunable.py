"""Which weights ProxSparse prunes: every nn.Linear inside the decoder blocks whose input
dimension is divisible by 4 — found by walking the model, not by a list of names, so new
architectures work. Embeddings, lm_head and norms are never pruned.

Three kinds of weight need a word:

* GPT-2-style `Conv1D` layers (GPT-2, DistilGPT2, OpenAI GPT) are linear layers stored the other
  way round, [in, out]. `linearise_conv1d` swaps each one inside the decoder blocks for an
  nn.Linear holding the transpose, once, right after loading; from then on they are pruned like any
  other linear layer (groups of 4 along the input dimension, masks [out, in]). `hf_state_dict` turns
  them back for `save_pretrained`, so an export loads with `transformers` as the original did.
* The fused expert tensors of a mixture-of-experts model ([experts, out, in]) become one nn.Linear
  per expert and projection (experts.py: `unfuse_experts`, checked against the fused forward on a
  probe), and `hf_state_dict` fuses them back for `save_pretrained`. `linearise` does both swaps.
* Weights in the blocks that are still neither a linear layer nor a norm (an experts layout the
  probe did not accept, a router's matrix) are not pruned. They are listed in
  `PrunableSet.left_dense`, and `summary()` / `coverage_note()` say how much of the blocks stays
  dense, so no result claims 2:4 where it is not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from proxsparse_core.sparsity.experts import UnfusedExperts, linear_of, unfuse_experts

CONV1D_FLAG = "hf_conv1d"      # set on an nn.Linear that was a Conv1D: saved back in Conv1D's layout
NOTE_SHARE = 0.01              # coverage_note speaks when this share of the blocks' weights stays dense


@dataclass
class PrunableSet:
    names: list[str]                      # qualified module names, in model order
    modules: dict[str, nn.Linear]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (name, reason)
    block_path: str = ""                  # where the decoder blocks live, e.g. "model.layers"
    left_dense: list[tuple[str, int]] = field(default_factory=list)   # (parameter, weights): not linear, ≥ 2-D
    skipped_weights: list[tuple[str, int]] = field(default_factory=list)   # (layer, weights) of `skipped`

    def weights(self) -> dict:
        return {n: self.modules[n].weight for n in self.names}

    @property
    def n_params(self) -> int:
        return sum(self.modules[n].weight.numel() for n in self.names)

    @property
    def n_left_dense(self) -> int:
        """Weights in the decoder blocks that stay dense: skipped linear layers and other ≥ 2-D weights."""
        return sum(n for _, n in self.left_dense + self.skipped_weights)

    @property
    def dense_share(self) -> float:
        """Share of the decoder blocks' weight matrices (biases and norms aside) that stays dense."""
        total = self.n_params + self.n_left_dense
        return self.n_left_dense / total if total else 0.0

    def summary(self) -> str:
        s = (f"{len(self.names)} prunable linear layers ({self.n_params / 1e6:.1f} M weights) "
             f"in {self.block_path or 'the model'}")
        if self.skipped:
            s += f"; skipped {len(self.skipped)}: " + ", ".join(f"{n} ({r})" for n, r in self.skipped[:5])
            if len(self.skipped) > 5:
                s += ", …"
        if self.left_dense:
            s += (f"; left dense: {len(self.left_dense)} other weight tensors "
                  f"({sum(n for _, n in self.left_dense) / 1e6:.1f} M weights, e.g. "
                  f"{max(self.left_dense, key=lambda x: x[1])[0]})")
        return s

    def largest_dense(self) -> list[tuple[str, int]]:
        """Every (tensor, weights) of the blocks that no mask covers, the largest first."""
        return sorted(self.left_dense + self.skipped_weights, key=lambda x: -x[1])

    def coverage_note(self) -> str:
        """A warning when a noticeable share of the blocks' weights stays dense, else ""."""
        if self.dense_share < NOTE_SHARE:
            return ""
        kinds = ", ".join(n for n, _ in self.largest_dense()[:2])
        return (f"2:4 covers only the {len(self.names)} prunable linear layers: {self.dense_share:.0%} of the "
                f"decoder blocks' weights ({self.n_left_dense / 1e6:.1f} M, e.g. {kinds}) are in tensors it does "
                "not prune (for example fused expert weights in a layout the studio does not know, or a layer "
                "whose input dimension is not divisible by 4) and stay dense in every result and export")


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the one whose length is the configured number of layers,
    else the longest ModuleList in the model."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError("no decoder blocks found (the model has no nn.ModuleList of layers)")
    exact = [x for x in lists if n_layers is not None and len(x[1]) == n_layers]
    return (exact or sorted(lists, key=lambda x: -len(x[1])))[0]


def find_prunable(model: nn.Module) -> PrunableSet:
    path, blocks = find_decoder_blocks(model)
    names, modules, skipped, skipped_weights, left = [], {}, [], [], []
    for i, block in enumerate(blocks):
        for sub, m in block.named_modules():
            name = f"{path}.{i}.{sub}" if sub else f"{path}.{i}"
            if isinstance(m, nn.Linear):
                if m.in_features % 4:
                    skipped.append((name, f"input dimension {m.in_features} not divisible by 4"))
                    skipped_weights.append((name, m.weight.numel()))
                    continue
                names.append(name)
                modules[name] = m
                continue
            for pname, p in m.named_parameters(recurse=False):
                if p.dim() >= 2:
                    left.append((f"{name}.{pname}", p.numel()))
    return PrunableSet(names, modules, skipped, path, left, skipped_weights)


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): y = x·W + b with W stored [in, out] and `nf` outputs."""
    return (type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2 and getattr(m, "nf", None) == m.weight.shape[1])


@torch.no_grad()
def linearise_conv1d(model: nn.Module) -> list[str]:
    """Swap every Conv1D inside the decoder blocks for the nn.Linear that computes the same thing
    (weight transposed to [out, in], same bias, device and dtype), flagged so that hf_state_dict saves
    it back as a Conv1D. Returns the names swapped (none for models without Conv1D)."""
    try:
        path, blocks = find_decoder_blocks(model)
    except ValueError:
        return []
    done = []
    for i, block in enumerate(blocks):
        for sub, m in list(block.named_modules()):
            if not sub or not _is_conv1d(m):
                continue
            lin = linear_of(m.weight, m.bias, transposed=True, requires_grad=m.weight.requires_grad)
            setattr(lin, CONV1D_FLAG, True)
            parent = block.get_submodule(sub.rpartition(".")[0]) if "." in sub else block
            setattr(parent, sub.rpartition(".")[2], lin)
            done.append(f"{path}.{i}.{sub}")
    return done


def linearise(model: nn.Module) -> list[str]:
    """Every swap that makes a model's block weights nn.Linear layers, once, right after loading:
    Conv1D layers (linearise_conv1d) and fused experts (experts.unfuse_experts). Returns the
    qualified names of the modules swapped."""
    done = linearise_conv1d(model)
    try:
        path, blocks = find_decoder_blocks(model)
    except ValueError:
        return done
    return done + unfuse_experts([(f"{path}.{i}", b) for i, b in enumerate(blocks)])


def hf_state_dict(model: nn.Module) -> dict | None:
    """The state dict `save_pretrained` should write when some layers were swapped by `linearise`
    (Conv1D weights back in their [in, out] layout, experts fused again); None when none was, so the
    model saves itself."""
    flagged = [n for n, m in model.named_modules() if getattr(m, CONV1D_FLAG, False)]
    unfused = [(n, m) for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    if not flagged and not unfused:
        return None
    sd = model.state_dict()
    for n in flagged:
        sd[f"{n}.weight"] = sd[f"{n}.weight"].t().contiguous()
    for n, m in unfused:
        m.fold_into(sd, n)
    return sd
