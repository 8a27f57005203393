"""What a pruning result is, and the names every layer uses for results.

A result is one 2:4 model made from the loaded dense model: its masks, and updated weights only
for methods that change the surviving weights (SparseGPT, recovery). The names are shared by the
workspace, the CLI, the app and the export so a result is called the same everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DENSE = "dense"          # the unpruned model (not a result; the reference row)
LEARNED = "proxsparse"   # the mask learned by ProxSparse

TITLES = {
    DENSE: "Dense (unpruned)",
    LEARNED: "ProxSparse (learned 2:4)",
    "magnitude": "Magnitude 2:4 (one-shot)",
    "wanda": "Wanda 2:4 (one-shot)",
    "sparsegpt": "SparseGPT 2:4 (one-shot, updates weights)",
    "sparsegpt-maskonly": "SparseGPT 2:4 mask on original weights",
}


@dataclass
class Pruning:
    """One 2:4 result: masks, and updated weights only for methods that change weights."""
    method: str
    masks: dict
    weights: dict | None = None
    info: dict = field(default_factory=dict)

    @property
    def updates_weights(self) -> bool:
        return self.weights is not None


RECOVERED = "+recovery"   # suffix of a result whose survivors were recovered (recovery.py)


def title(name: str) -> str:
    """The human title of a result name ('wanda' → 'Wanda 2:4 (one-shot)'); unknown names as is."""
    if name.endswith(RECOVERED):
        base = name[: -len(RECOVERED)]
        return f"{TITLES.get(base, base).split(' (')[0]} + recovery (weights updated)"
    return TITLES.get(name, name)
