"""Placing a model too large for one device over several: accelerate's device map.

`device_map = auto` asks accelerate to fill the GPUs in order (and the CPU after them) within
`max_memory`. Learning needs every layer's weights to be real tensors it can train, so layers
placed on the CPU must *run* on the CPU: transformers' own dispatch would instead offload them
(weights streamed to the GPU per call, parameters left on the meta device, nothing to train).
So the model is loaded first and dispatched here, with the CPU as the main device whenever the
map holds CPU layers; activations move between devices at block boundaries through accelerate's
hooks, gradients flow back the same way, and every per-layer operation of the learner (prox, λ2
term, statistics) runs on the layer's own device.
"""
from __future__ import annotations


from proxsparse_core.errors import UserError

def split_over_devices(model, max_memory: dict | None = None):
    """Dispatch a loaded model over the GPUs (and the CPU) with accelerate; returns the model.
    The device map is chosen by accelerate within `max_memory`, never splitting a decoder block."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                 dtype=next(model.parameters()).dtype)
    if "disk" in dmap.values():
        raise UserError("the model does not fit in the memory allowed (max_memory) even with the CPU; "
                        "allow more memory or use a smaller model")
    places = set(dmap.values())
    if places == {"cpu"} and torch.cuda.is_available():
        raise UserError("device_map=auto put the whole model on the CPU: allow GPU memory in max_memory")
    main = "cpu" if "cpu" in places else None
    return dispatch_model(model, device_map=dmap, main_device=main, force_hooks=len(places) > 1)


def devices_of(model) -> list[str]:
    """The devices a model's parameters live on (one entry per device, sorted)."""
    return sorted({str(p.device) for p in model.parameters()})
