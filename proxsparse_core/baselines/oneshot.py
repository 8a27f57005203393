"""One-shot 2:4 baselines that ProxSparse is compared with.

Every method has the same signature, ``prune_<method>(lm, calibration, progress=None, stop=None)
-> Pruning`` (lm: models.LoadedModel, calibration: [n, ctx] token ids), uses the same prunable
layers and groups as ProxSparse, and leaves the model with its dense weights W0:

* magnitude — keep the 2 largest |W| of every group (no data);
* wanda — keep the 2 largest |W_ij|·‖X_j‖₂, X_j: input channel j over all calibration tokens;
* sparsegpt — layer-wise optimal-brain-surgeon pruning that also updates the kept weights;
* sparsegpt-maskonly — SparseGPT's mask applied to W0 (no weight update).

Wanda and SparseGPT run block by block through the decoder, like their published code: the
calibration activations entering one block are collected, its layers are pruned from them, and
the *pruned* block's outputs feed the next block. Only one block's activations are held at once.
``progress(done, total)`` is called after every block; setting ``stop`` ends the run between
blocks with errors.Stopped (the model is restored to W0 either way).

``METHODS`` is the registry the CLI, the app and the benchmark read: adding a baseline means
writing its function and one ``Method`` entry.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from proxsparse_core.errors import Stopped
from proxsparse_core.sparsity.masks import load_weights, mask_2to4, snapshot
from proxsparse_core.sparsity.experts import routed_linears
from proxsparse_core.sparsity.prunable import find_decoder_blocks
from proxsparse_core.results import TITLES, Pruning
from proxsparse_core.sparsity.scores import InputNorms, wanda_score
from proxsparse_core.baselines.sparsegpt import DAMP, SparseGPTLayer

Progress = Callable[[int, int], None] | None


class _Captured(Exception):
    """Raised by the hook on the first decoder block once its inputs are recorded."""


def _move(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_move(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


def _first_block_inputs(model, blocks, calibration: torch.Tensor, batch: int):
    """What enters block 0, one entry per calibration batch: (hidden states, the other positional
    arguments, the keyword arguments). Most models pass everything but the hidden states by keyword;
    some (RecurrentGemma) pass position ids and the mask positionally, some the hidden states by keyword."""
    entries = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("hidden_states", None)
        entries.append((hidden.detach(), tuple(args[1:]), kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = model.get_input_embeddings().weight.device
    try:
        for i in range(0, calibration.shape[0], batch):
            try:
                model(input_ids=calibration[i:i + batch].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return entries


def _run_block(block, entries):
    """Outputs of `block` for every captured entry (same structure, hidden states replaced)."""
    device = next(block.parameters()).device
    out = []
    for hidden, args, kwargs in entries:
        y = block(hidden.to(device), *_move(args, device), **_move(kwargs, device))
        out.append((y[0] if isinstance(y, tuple) else y, args, kwargs))
    return out


@torch.no_grad()
def layer_by_layer(lm, calibration: torch.Tensor, make_collector, finish_layer,
                progress: Progress, stop: threading.Event | None, batch: int = 8, dense_targets: bool = False):
    """Walk the decoder block by block: collect statistics of every prunable layer of a block
    from its inputs (`make_collector(layer)` returns an object with add_batch), prune them
    (`finish_layer(name, collector)` returns the weight to install), then move on with the
    pruned block's outputs. The caller restores W0. `dense_targets`: the dense model runs beside
    it, block by block, and each layer's collector gets `add_pair(x, x_dense)` — its inputs and the
    dense model's at the same positions — instead of add_batch."""
    model, prunable = lm.model, lm.prunable
    path, blocks = find_decoder_blocks(model)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    was_training = model.training
    model.eval()
    try:
        entries = _first_block_inputs(model, blocks, calibration, batch)
        dense = entries if dense_targets else None
        for b, block in enumerate(blocks):
            if stop is not None and stop.is_set():
                raise Stopped("pruning stopped by the user")
            names = [n for n in prunable.names if n.startswith(f"{path}.{b}.")]
            collectors = {n: make_collector(prunable.modules[n]) for n in names}
            if dense_targets:
                dense = _collect_pairs(block, entries, dense, names, prunable, collectors)
            else:
                with _inputs_to(prunable, names, lambda n, x: collectors[n].add_batch(x)):
                    _run_block(block, entries)
            for n in names:
                prunable.modules[n].weight.data.copy_(finish_layer(n, collectors[n]))
            del collectors
            entries = _run_block(block, entries)
            if progress:
                progress(b + 1, len(blocks))
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)


@contextlib.contextmanager
def _inputs_to(prunable, names, take):
    """While open, every forward of the layers `names` hands its input to `take(name, x)`."""
    handles = [prunable.modules[n].register_forward_hook(lambda m, args, out, n=n: take(n, args[0].detach()))
               for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _collect_pairs(block, entries, dense, names, prunable, collectors):
    """One block, still dense, batch by batch: its dense-path inputs (`dense`) through it with every
    layer's input kept, then the pruned path's (`entries`), each layer's collector folding in both;
    returns the dense path's outputs (the next block's dense inputs). An expert of a mixture-of-experts
    block sees other tokens on the two paths (the router may choose differently), so it keeps its own
    outputs as the target (pairs each input with itself)."""
    routed = routed_linears(block)
    kept, out = {}, []

    def pair(n, x):
        own = id(prunable.modules[n]) in routed
        collectors[n].add_pair(x, x if own else kept[n])
    for entry, dense_entry in zip(entries, dense):
        with _inputs_to(prunable, names, kept.__setitem__):
            out += _run_block(block, [dense_entry])
        with _inputs_to(prunable, names, pair):
            _run_block(block, [entry])
    return out


def _info(method: str, calibration: torch.Tensor, t0: float, **extra) -> dict:
    return {"method": method, "calibration_samples": int(calibration.shape[0]),
            "calibration_tokens": int(calibration.numel()),
            "seconds": round(time.perf_counter() - t0, 2), **extra}


# ----------------------------------------------------------------------------- methods

def prune_magnitude(lm, calibration: torch.Tensor, progress: Progress = None,
                    stop: threading.Event | None = None) -> Pruning:
    """Keep the two largest |W| of every group; the calibration data is not used."""
    t0 = time.perf_counter()
    names = lm.prunable.names
    masks = {}
    for i, n in enumerate(names):
        if stop is not None and stop.is_set():
            raise Stopped("pruning stopped by the user")
        masks[n] = mask_2to4(lm.prunable.modules[n].weight.detach()).cpu()
        if progress:
            progress(i + 1, len(names))
    return Pruning("magnitude", masks, None, _info("magnitude", calibration, t0, calibration_samples=0,
                                                   calibration_tokens=0))


def prune_wanda(lm, calibration: torch.Tensor, progress: Progress = None,
                stop: threading.Event | None = None) -> Pruning:
    t0 = time.perf_counter()
    originals = snapshot(lm.prunable)
    masks = {}

    def finish(name, norms):
        w = lm.prunable.modules[name].weight.detach()
        m = mask_2to4(w, wanda_score(w, norms.sq))
        masks[name] = m.cpu()
        return w * m

    try:
        layer_by_layer(lm, calibration, InputNorms, finish, progress, stop)
    finally:
        load_weights(lm.prunable, originals)
    return Pruning("wanda", masks, None, _info("wanda", calibration, t0))


def sparsegpt_layers(lm, calibration, progress=None, stop=None, keep: dict | None = None,
                     dense_share: float = 0.0, damp: float = DAMP) -> tuple[dict, dict]:
    """SparseGPT over every prunable layer, block by block: (masks, updated weights), on the CPU.
    With `keep` (name → mask) the masks are given and only the weight update runs. `dense_share` α
    > 0: the dense model runs beside it and every layer reconstructs W0·(x + α(x_dense − x)) — a
    share α of the way from its own outputs on the pruned model's inputs x to the dense model's
    outputs, so it also makes up for part of the error of the layers before it (SparseGPTLayer.prune;
    0 is published SparseGPT). `damp`: the share of the mean Hessian diagonal added to its diagonal
    (SparseGPT's 1 % by default)."""
    originals = snapshot(lm.prunable)
    masks, weights = {}, {}

    def finish(name, layer: SparseGPTLayer):
        w, keep_mask = layer.prune(damp, keep=None if keep is None else keep[name], dense_share=dense_share)
        masks[name], weights[name] = keep_mask.cpu(), w.cpu()
        return w

    try:
        layer_by_layer(lm, calibration, SparseGPTLayer, finish, progress, stop, dense_targets=dense_share > 0)
    finally:
        load_weights(lm.prunable, originals)
    return masks, weights


def prune_sparsegpt(lm, calibration: torch.Tensor, progress: Progress = None,
                    stop: threading.Event | None = None) -> Pruning:
    """SparseGPT 2:4 with its weight update: `Pruning.weights` holds the updated weights."""
    t0 = time.perf_counter()
    masks, weights = sparsegpt_layers(lm, calibration, progress, stop)
    return Pruning("sparsegpt", masks, weights,
                   _info("sparsegpt", calibration, t0, updates_weights=True))


def prune_sparsegpt_maskonly(lm, calibration: torch.Tensor, progress: Progress = None,
                             stop: threading.Event | None = None) -> Pruning:
    """SparseGPT's 2:4 mask on the original weights W0 (its weight update dropped)."""
    t0 = time.perf_counter()
    masks, _ = sparsegpt_layers(lm, calibration, progress, stop)
    return Pruning("sparsegpt-maskonly", masks, None, _info("sparsegpt-maskonly", calibration, t0))


@dataclass(frozen=True)
class Method:
    """A one-shot pruning method: every one has the same signature, so the UI and CLI treat them alike."""
    name: str
    prune: Callable[..., Pruning]     # prune(lm, calibration, progress=None, stop=None) -> Pruning
    updates_weights: bool             # its pruned model is not W0 * mask
    uses_data: bool                   # reads the calibration samples
    cpu_default: bool                 # preselected in the app on a CPU-only machine (fast there)

    @property
    def title(self) -> str:
        return TITLES[self.name]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("magnitude", prune_magnitude, updates_weights=False, uses_data=False, cpu_default=True),
    Method("wanda", prune_wanda, updates_weights=False, uses_data=True, cpu_default=False),
    Method("sparsegpt", prune_sparsegpt, updates_weights=True, uses_data=True, cpu_default=False),
    Method("sparsegpt-maskonly", prune_sparsegpt_maskonly, updates_weights=False, uses_data=True,
           cpu_default=False),
)}
