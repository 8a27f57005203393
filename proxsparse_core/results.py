"""What a pruning result is, and the names every layer uses for results.

A result is one 2:4 model made from the loaded dense model: its masks, and updated weights only
for methods that change the surviving weights (SparseGPT, recovery). The names are shared by the
workspace, the CLI, the app and the export so a result is called the same everywhere.
"""
from __future__ import annotations

import re
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
TAG = "#"                 # "proxsparse#2", "wanda#<run folder>": a second result of one method, named after its run


def split_tag(name: str) -> tuple[str, str]:
    """('proxsparse', '2') for 'proxsparse#2'; (name, '') for a name without a tag. The tag is what
    follows the last '#', and never holds a '+' (so 'proxsparse#2+recovery' has none of its own)."""
    core, sep, tag = name.rpartition(TAG)
    if not sep or not core or not tag or RECOVERED[0] in tag:
        return name, ""
    return core, tag


def tagged(name: str, tag: str) -> str:
    return f"{name}{TAG}{tag}"


def unique(name: str, taken) -> str:
    """`name` when no result has it yet, else `name#2`, `name#3`, …: a new result never replaces one."""
    if name not in taken:
        return name
    k = 2
    while tagged(name, str(k)) in taken:
        k += 1
    return tagged(name, str(k))


def method_of(name: str) -> str:
    """The method a result name stands for, its tags left out: 'proxsparse#2+recovery' →
    'proxsparse+recovery' (what a recipe.json records)."""
    return re.sub(rf"{TAG}[^{TAG}+]*", "", name)


def is_recovered(name: str) -> bool:
    """Whether the result `name` is a recovered one (its survivors updated with the mask fixed)."""
    return RECOVERED in name


def _tag_words(core: str, tag: str) -> str:
    if tag.isdigit():
        return f"{'recovery' if core.endswith(RECOVERED) else 'run'} {tag}"
    return tag


def title(name: str) -> str:
    """The human title of a result name ('wanda' → 'Wanda 2:4 (one-shot)'); a second result of one
    method says which run it is ('proxsparse#2' → 'ProxSparse (learned 2:4) · run 2'), a recovered
    one names the result it recovered; unknown names as is."""
    core, tag = split_tag(name)
    if tag:
        return f"{title(core)} · {_tag_words(core, tag)}"
    if name.endswith(RECOVERED):
        return f"{short_title(name[: -len(RECOVERED)])} + recovery (weights updated)"
    return TITLES.get(name, name)


def short_title(name: str) -> str:
    """The title without its parenthesis: 'ProxSparse', 'ProxSparse · run 2'."""
    return re.sub(r" \([^()]*\)", "", title(name))
