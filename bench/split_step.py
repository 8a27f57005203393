"""Learning with a model split over devices (issue 13): a 7B-shaped Llama spread by accelerate.

Builds a Llama with 7B layer shapes (hidden 4096, MLP 11008, 32 heads; `--layers` decoder
blocks, random weights, bf16), lets accelerate place it within `--max-memory` (on one GPU:
a small GPU share forces the later blocks onto the CPU, where they also compute), learns a few
ProxSparse steps, verifies the mask, and prints the step time, the prox share and the peak
memory of every device.

    python bench/split_step.py --layers 8 --max-memory "0=3GiB,cpu=100GiB" --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from proxsparse_core.config import RunConfig  # noqa: E402
from proxsparse_core.method.learner import ProxSparseLearner  # noqa: E402
from proxsparse_core.sparsity.masks import pruned_weights, snapshot, swapped, verify  # noqa: E402
from proxsparse_core.models.loading import LoadedModel  # noqa: E402
from proxsparse_core.config import parse_max_memory  # noqa: E402
from proxsparse_core.models.placement import devices_of, split_over_devices  # noqa: E402
from proxsparse_core.sparsity.prunable import find_prunable  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-memory", default="0=3GiB,cpu=100GiB")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default="")
    ap.add_argument("--masks", default="", help="save the masks here (torch.save) to compare runs")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    dt = getattr(torch, args.dtype)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=max(args.ctx, 512), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dt).eval()
    model = split_over_devices(model, parse_max_memory(args.max_memory))
    prunable = find_prunable(model)
    where = {}
    for n in prunable.names:
        where.setdefault(str(prunable.modules[n].weight.device), []).append(n)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters over {devices_of(model)}; "
          + ", ".join(f"{d}: {len(v)} prunable layers" for d, v in where.items()), flush=True)
    lm = LoadedModel(model, None, "7B-shaped", "7B-shaped", "auto", dt, prunable, args.ctx)
    run = RunConfig(lambda1=0.25, lr=1e-4, steps=args.steps, ctx=args.ctx, layer_stats_every=1)
    samples = torch.randint(0, args.vocab, (args.steps, args.ctx), generator=torch.Generator().manual_seed(0))
    before = snapshot(prunable)
    res = ProxSparseLearner(lm, run, samples, on_event=lambda e: print(e.line(), e.mem_by_device, flush=True)).run()
    with swapped(prunable, pruned_weights(before, res.masks), before):
        check = verify(prunable, res.masks, before)
    steps = res.events[1:] or res.events
    t = statistics.median(e.t_step for e in steps)
    prox = statistics.median(e.t_prox for e in steps)
    out = {"devices": devices_of(model), "layers_per_device": {d: len(v) for d, v in where.items()},
           "step_s": t, "prox_s": prox, "prox_share": prox / t, "fwd_bwd_s": statistics.median(e.t_fwd_bwd for e in steps),
           "opt_s": statistics.median(e.t_opt for e in steps), "mem_by_device": res.events[-1].mem_by_device,
           "verified": check.ok, "status": res.status}
    print(check)
    print(json.dumps(out, indent=1))
    if args.masks:
        torch.save(res.masks, args.masks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
