"""Which weights ProxSparse prunes: every nn.Linear inside the decoder blocks whose input
dimension is divisible by 4 — found by walking the model, not by a list of names, so new
architectures work. Embeddings, lm_head and norms are never pruned."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass
class PrunableSet:
    names: list[str]                      # qualified module names, in model order
    modules: dict[str, nn.Linear]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (name, reason)
    block_path: str = ""                  # where the decoder blocks live, e.g. "model.layers"

    def weights(self) -> dict:
        return {n: self.modules[n].weight for n in self.names}

    @property
    def n_params(self) -> int:
        return sum(self.modules[n].weight.numel() for n in self.names)

    def summary(self) -> str:
        s = (f"{len(self.names)} prunable linear layers ({self.n_params / 1e6:.1f} M weights) "
             f"in {self.block_path or 'the model'}")
        if self.skipped:
            s += f"; skipped {len(self.skipped)}: " + ", ".join(f"{n} ({r})" for n, r in self.skipped[:5])
            if len(self.skipped) > 5:
                s += ", …"
        return s


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
    names, modules, skipped = [], {}, []
    for i, block in enumerate(blocks):
        for sub, m in block.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            name = f"{path}.{i}.{sub}"
            if m.in_features % 4:
                skipped.append((name, f"input dimension {m.in_features} not divisible by 4"))
                continue
            names.append(name)
            modules[name] = m
    return PrunableSet(names, modules, skipped, path)
