"""Will a learning run fit in memory? A rough estimate made before the first step.

A run needs, on top of the loaded model: gradients and two AdamW states for every trained
weight (on a bf16/fp16 model with master_weights fp32, a float32 copy of every prunable weight,
its float32 gradient and float32 states: 16 bytes each), the λ2 copy of W0 (when λ2 > 0 and it
is not offloaded), the learner's CPU copy of W0,
the activations kept for the backward pass (about batch·ctx·layers·(8·hidden + 6·intermediate)
values; with gradient checkpointing only each layer's input, plus one layer in full; with eager
attention also the heads·ctx² attention weights per layer) and the logits (batch·ctx·vocab, plus
three float32 copies: log-probabilities and gradients). Measured on the bundled SmolLM2-135M on
a CPU, the estimate is within about 20% of the real peak (1.9 vs 1.9 GiB at ctx 128, batch 1;
10.9 vs 10.5 GiB at ctx 1024, batch 4; 5.1 vs 5.4–6.0 GiB with gradient checkpointing).
The estimate is compared with what the device has free (CUDA: torch.cuda.mem_get_info plus the
allocator's unused cache; CPU: MemAvailable in /proc/meminfo), and a run that clearly cannot fit
is refused with one line instead of failing (or swapping the machine to a halt) minutes later.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from proxsparse_core.errors import UserError

GiB = 2**30


@dataclass
class MemoryEstimate:
    weights_state: int       # gradients + AdamW states (+ λ2 copy of W0 on the device)
    activations: int
    logits: int
    host_copies: int         # the learner's CPU copy of W0 (and of other trained parameters)
    on_device: bool          # False: the host copies live on the same memory as the rest (CPU)

    @property
    def total(self) -> int:
        return self.weights_state + self.activations + self.logits + (0 if self.on_device else self.host_copies)


def _config_int(config, *names, default=0) -> int:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def _master_copies(lm, cfg) -> bool:
    """Does the learner keep float32 copies of the prunable weights (training.MaskedTraining)?"""
    return cfg.master_weights == "fp32" and lm.dtype in (torch.bfloat16, torch.float16)


def estimate_learning_memory(lm, cfg) -> MemoryEstimate:
    """Extra bytes a ProxSparse run with `cfg` needs on `lm`'s device (models.LoadedModel)."""
    model, config = lm.model, lm.model.config
    el = torch.empty((), dtype=lm.dtype).element_size()
    prunable = sum(lm.prunable.modules[n].weight.numel() for n in lm.prunable.names)
    every = sum(p.numel() for p in model.parameters())
    trained = every if cfg.train_all else prunable
    on_gpu = str(lm.device).startswith("cuda")
    w0_on_device = on_gpu and cfg.lambda2 > 0 and not cfg.w0_offload   # on the CPU, W0 is the learner's copy
    # a bf16/fp16 model with master_weights fp32: per prunable weight its float32 copy, the copy's float32
    # gradient and float32 moments (16 bytes at the update) instead of a gradient and moments in `el`
    master = _master_copies(lm, cfg)
    weights_state = ((16 if master else 3 * el) * prunable + 3 * (trained - prunable) * el
                     + (prunable * el if w0_on_device else 0))

    emb = model.get_input_embeddings().weight
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model", default=emb.shape[1])
    inter = _config_int(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers", default=1)
    heads = _config_int(config, "num_attention_heads", "n_head", default=1)
    vocab = _config_int(config, "vocab_size", default=emb.shape[0])
    tokens = cfg.batch * cfg.ctx
    per_layer = tokens * (8 * hidden + 6 * inter) * el
    if getattr(config, "_attn_implementation", None) == "eager":
        per_layer += cfg.batch * heads * cfg.ctx * cfg.ctx * el
    activations = (tokens * hidden * el * layers + per_layer) if cfg.grad_ckpt else per_layer * layers
    logits = tokens * vocab * (el + 3 * 4)          # the logits, float32 log-probabilities and gradients

    host = prunable * el + ((every - prunable) * el if cfg.train_all else 0)
    return MemoryEstimate(weights_state, activations, logits, host, on_device=on_gpu)


def available_memory(device: str) -> int | None:
    """Bytes free for a run on `device`, or None where it cannot be told (MPS, several devices)."""
    device = str(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_learning_memory(lm, cfg) -> MemoryEstimate:
    """Refuse (UserError, one line) settings whose estimate exceeds the memory available."""
    est = estimate_learning_memory(lm, cfg)
    free = available_memory(lm.device)
    if free is not None and est.total > free:
        raise UserError(
            f"these settings need about {est.total / GiB:.1f} GiB more memory to learn than the "
            f"{free / GiB:.1f} GiB available on {lm.device} (activations {est.activations / GiB:.1f} GiB and "
            f"logits {est.logits / GiB:.1f} GiB for batch {cfg.batch} × ctx {cfg.ctx}, gradients and optimizer "
            f"{est.weights_state / GiB:.1f} GiB): lower ctx or batch, or turn on gradient checkpointing"
            + (", or set master_weights off (float32 copies of bf16 weights: 10 more bytes per prunable weight)"
               if _master_copies(lm, cfg) else ""))
    return est
