"""2:4 sparse inference on CUDA: dense vs semi-structured (cuSPARSELt) products and model prefill.

1. Per product, Llama-2-7B shapes (q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008), bf16,
   at 256 … 32 K tokens per product: median time of each, speed-up, relative error vs dense.
2. Whole-model prefill: a 7B-shaped Llama with `--layers` decoder layers and 2:4 weights, dense vs
   its prunable linears converted by proxsparse_core.sparse_infer.sparsify_, at several prompt
   lengths (batch 1): time, speed-up and the logits' relative error.

    python bench/sparse_infer.py [--layers 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from proxsparse_core import sparse_infer  # noqa: E402
from proxsparse_core.masks import mask_2to4  # noqa: E402
from proxsparse_core.prunable import find_prunable  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [256, 1024, 2048, 4096, 8192, 16384, 32768]
PREFILL = [512, 2048, 8192, 16384]


def per_product(out: dict):
    print("per product (bf16):  out×in  tokens  dense ms  2:4 ms  speed-up  rel.err")
    rows = []
    for o, i in SHAPES:
        for t in TOKENS:
            r = sparse_infer.time_linear(o, i, t, reps=30)
            rows.append(dict(out=o, inp=i, tokens=t, dense_ms=r.dense_ms, sparse_ms=r.sparse_ms,
                             speedup=r.speedup, rel_error=r.rel_error))
            print(f"  {o:>5}×{i:<5} {t:>6} {r.dense_ms:9.3f} {r.sparse_ms:8.3f} {r.speedup:8.2f}× {r.rel_error:.1e}")
    for t in TOKENS:
        sel = [r for r in rows if r["tokens"] == t]
        d, s = sum(r["dense_ms"] for r in sel), sum(r["sparse_ms"] for r in sel)
        print(f"  all three shapes at {t:>6} tokens: {d / s:.2f}×")
    out["per_product"] = rows


@torch.no_grad()
def prefill(out: dict, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=max(PREFILL), tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    prunable = find_prunable(model)
    for n in prunable.names:                     # a 2:4 model: top-2 |W| of every group
        w = prunable.modules[n].weight
        w.mul_(mask_2to4(w).to(w.dtype))
    ids = {t: torch.randint(0, 32000, (1, t), device="cuda") for t in PREFILL}
    dense_logits = {t: model(input_ids=ids[t]).logits[0, -64:].float() for t in PREFILL}

    def timed(t):
        return sparse_infer.median_ms(lambda: model(input_ids=ids[t]), reps=10)
    dense_ms = {t: timed(t) for t in PREFILL}
    done, skipped = sparse_infer.sparsify_(prunable)
    rows = []
    print(f"prefill, {layers}-layer 7B-shaped Llama, {len(done)} linears 2:4 ({len(skipped)} skipped):")
    for t in PREFILL:
        sp = timed(t)
        logits = model(input_ids=ids[t]).logits[0, -64:].float()
        err = float((logits - dense_logits[t]).norm() / dense_logits[t].norm())
        rows.append(dict(tokens=t, dense_ms=dense_ms[t], sparse_ms=sp, speedup=dense_ms[t] / sp, logits_rel_error=err))
        print(f"  {t:>6} tokens: dense {dense_ms[t]:8.2f} ms  2:4 {sp:8.2f} ms  {dense_ms[t] / sp:.2f}×  "
              f"logits rel.err {err:.1e}")
    out["prefill"] = dict(layers=layers, rows=rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    ok, why = sparse_infer.status()
    print(why)
    if not ok:
        return
    out = dict(device=torch.cuda.get_device_name())
    per_product(out)
    prefill(out, args.layers)
    _, report = sparse_infer.speedup_report(shapes=SHAPES, token_counts=(256, 16384), reps=10)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
