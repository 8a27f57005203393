"""Mixture-of-experts blocks whose experts are fused 3-D tensors, made prunable.

In transformers 5 the experts of Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoE, DeepSeek-V3, Jamba and
others are one module holding `gate_up_proj` [experts, 2·inner, hidden] and `down_proj`
[experts, hidden, inner] (the `use_experts_implementation` layout; some store them transposed, some
with biases). No nn.Linear, so nothing in them would be pruned: on a tiny Mixtral 89 % of the
blocks' weights stayed dense.

`unfuse_experts` swaps each such module, right after loading, for `UnfusedExperts`: one nn.Linear
per expert and projection (`…experts.gate_up.3`, `…experts.down.3`), computing the same thing
token by token (each expert reads only the tokens routed to it, as the fused module's loop does).
Llama 4's experts have no such flags and take one stacked input instead, [experts × tokens, hidden],
every token scaled by its router score (0 where the router did not choose that expert), with
`gate_up_proj` stored [experts, hidden, 2·inner]: the same swap serves them ("stacked" mode), each
expert reading its slice of the stack.

From then on every expert is a linear layer like any other: ProxSparse learns its mask, and the
hooks of Wanda, SparseGPT and the OBS update see exactly the inputs the router sends it. Each swap is
checked first on a random probe against the fused module's own forward; a module it does not match
(another layout, another signature) stays fused and is named as dense, as before.

`fold_into` writes the experts back into the fused names and layout for `save_pretrained`, so an
export loads with `transformers` as the original model did (prunable.hf_state_dict calls it).
"""
from __future__ import annotations

import torch
import torch.nn as nn

PROBE_TOKENS = 16
_PROJ = {True: ("gate_up_proj", "gate_up"), False: ("up_proj", "up")}   # has_gate → (fused name, ours)


def _stacked(m: nn.Module) -> bool:
    """Llama 4's layout: no `use_experts_implementation` flags, a stacked input (module docstring)."""
    return not hasattr(m, "has_gate") and hasattr(m, "act_fn")


def _fused_layout(m: nn.Module) -> bool:
    """A module in transformers' fused-experts layout (see module docstring)."""
    if not hasattr(m, "num_experts"):
        return False
    if not _stacked(m) and not all(hasattr(m, a) for a in ("has_gate", "has_bias", "is_transposed")):
        return False
    proj = getattr(m, _PROJ[bool(getattr(m, "has_gate", True))][0], None)
    down = getattr(m, "down_proj", None)
    return (isinstance(proj, nn.Parameter) and isinstance(down, nn.Parameter) and proj.dim() == 3
            and down.dim() == 3 and proj.shape[0] == down.shape[0] == m.num_experts
            and proj.device.type != "meta")


def linear_of(w: torch.Tensor, b: torch.Tensor | None, transposed: bool, requires_grad: bool) -> nn.Linear:
    """The nn.Linear (same device and dtype) computing x·wᵀ + b, or x·w + b when `transposed` (w stored
    [in, out], as a Conv1D's or a transposed expert's)."""
    w = w.t() if transposed else w                       # nn.Linear holds [out, in]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin.requires_grad_(requires_grad)


class UnfusedExperts(nn.Module):
    """The experts of one block as nn.Linear layers; `shell` is the fused module without its expert
    tensors (its activation, gate function and optional post-expert norm are used as they are)."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.stacked = _stacked(fused)
        gate = self.stacked or bool(fused.has_gate)
        fused_name, ours = _PROJ[gate]
        self.names = (fused_name, ours)
        self.transposed = self.stacked or bool(fused.is_transposed)
        self.has_bias = not self.stacked and bool(fused.has_bias)
        self.num_experts = int(fused.num_experts)
        proj, down = getattr(fused, fused_name), fused.down_proj
        pb = getattr(fused, f"{fused_name}_bias", None) if self.has_bias else None
        db = getattr(fused, "down_proj_bias", None) if self.has_bias else None
        grad = proj.requires_grad
        self.add_module(ours, nn.ModuleList(
            linear_of(proj[e], None if pb is None else pb[e], self.transposed, grad) for e in range(self.num_experts)))
        self.down = nn.ModuleList(
            linear_of(down[e], None if db is None else db[e], self.transposed, grad) for e in range(self.num_experts))
        self.shell = fused

    def release_fused(self):
        """Drop the fused tensors from the shell (after the probe agreed)."""
        fused_name = self.names[0]
        for n in (fused_name, f"{fused_name}_bias", "down_proj", "down_proj_bias"):
            if n in self.shell._parameters:
                delattr(self.shell, n)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        shell = self.shell
        h = getattr(self, self.names[1])[e](x)
        if self.stacked:
            gate, up = h.chunk(2, dim=-1)
            h = up * shell.act_fn(gate)
        else:
            h = shell._apply_gate(h) if shell.has_gate else shell.act_fn(h)
        y = self.down[e](h)
        if getattr(shell, "has_post_expert_norm", False):
            y = shell.post_expert_norm(y)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.stacked:                     # [experts × tokens, hidden]: expert e reads slice e
            x = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
            return torch.stack([self._expert(e, x[e]) for e in range(self.num_experts)]).view(
                -1, hidden_states.shape[-1])
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:          # expert-parallel sentinels: no expert here
                continue
            token, slot = torch.where(top_k_index == e)
            y = self._expert(e, hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def fold_into(self, sd: dict, prefix: str):
        """Rewrite the state dict `sd` (model.state_dict()) so that this module's entries are the fused
        module's again: names `prefix.gate_up_proj` …, layout [experts, …], shell entries unprefixed."""
        fused_name, ours = self.names
        for src, dst in ((ours, fused_name), ("down", "down_proj")):
            ws = [sd.pop(f"{prefix}.{src}.{e}.weight") for e in range(self.num_experts)]
            sd[f"{prefix}.{dst}"] = torch.stack([w.t() if self.transposed else w for w in ws]).contiguous()
            if self.has_bias:
                sd[f"{prefix}.{dst}_bias"] = torch.stack(
                    [sd.pop(f"{prefix}.{src}.{e}.bias") for e in range(self.num_experts)])
        for key in [k for k in sd if k.startswith(f"{prefix}.shell.")]:
            sd[f"{prefix}.{key[len(prefix) + 7:]}"] = sd.pop(key)


def routed_linears(module: nn.Module) -> set[int]:
    """id() of every expert nn.Linear inside `module`: layers that see only the tokens routed to them."""
    return {id(lin) for m in module.modules() if isinstance(m, UnfusedExperts)
            for lin in (*getattr(m, m.names[1]), *m.down)}


@torch.no_grad()
def _agrees(fused: nn.Module, unfused: UnfusedExperts, hidden: int) -> bool:
    """Do both compute the same on a random routed probe (within the dtype's rounding)?"""
    p = next(fused.parameters())
    g = torch.Generator().manual_seed(0)
    k = min(2, unfused.num_experts)
    rows = PROBE_TOKENS * (unfused.num_experts if unfused.stacked else 1)
    x = torch.randn(rows, hidden, generator=g).to(p.device, p.dtype)
    idx = torch.rand(PROBE_TOKENS, unfused.num_experts, generator=g).argsort(-1)[:, :k].to(p.device)
    w = torch.rand(PROBE_TOKENS, k, generator=g).softmax(-1).to(p.device, p.dtype)
    try:
        a, b = (fused(x), unfused(x)) if unfused.stacked else (fused(x, idx, w), unfused(x, idx, w))
    except Exception:                   # another signature or layout: leave the module as it is
        return False
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    tol = 1e-4 if p.dtype == torch.float32 else 2e-2
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= tol * max(float(a.abs().max()), 1e-6)


def unfuse_experts(blocks: list[tuple[str, nn.Module]]) -> list[str]:
    """Swap every fused-experts module inside `blocks` ((qualified name, block)) for UnfusedExperts,
    where a probe shows both compute the same. Returns the qualified names swapped."""
    done = []
    for path, block in blocks:
        for sub, m in list(block.named_modules()):
            if not sub or not _fused_layout(m):
                continue
            unfused = UnfusedExperts(m)
            w = getattr(m, unfused.names[0])
            hidden = w.shape[1] if unfused.transposed else w.shape[2]
            if not _agrees(m, unfused, hidden):
                continue
            unfused.release_fused()
            parent = block.get_submodule(sub.rpartition(".")[0]) if "." in sub else block
            setattr(parent, sub.rpartition(".")[2], unfused)
            done.append(f"{path}.{sub}")
    return done
