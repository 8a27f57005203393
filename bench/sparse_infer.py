"""2:4 sparse inference on CUDA: dense vs 2:4 per product and for a whole prefill, timed alike.

1. Per product, Llama-2-7B shapes (q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008), bf16,
   256 … 32 K tokens: dense F.linear, the old path (a torch.sparse semi-structured weight) and the
   new one (proxsparse_core.inference.sparse24.SparseLinear24: cuSPARSELt called directly), all timed
   the same way: 10 back-to-back calls between two CUDA events, warm, median of 10. Also, for
   reference, the same calls captured in a CUDA graph (GPU time only) and triton's do_bench.
   Errors: 2:4 vs dense, and each vs an fp32 product (the bf16 noise floor).
2. Prefill (batch 1) of a 7B-shaped Llama with `--layers` decoder layers (random init, 2:4 by
   top-2 |W|): dense vs 2:4 at 512 … 16 K tokens, eager and as CUDA graphs (both sides alike),
   next-token agreement over all positions, logits error on the last 64; the old path eagerly at
   2 K and 16 K; at 2 K, agreement of dense bf16 and of 2:4 with an fp32 copy of the model.
3. A compact table and the targets (per product ≥ 1.3× at 16 K tokens; prefill ≥ 1.15× at 16 K
   with ≥ 99% next-token agreement).

    python bench/sparse_infer.py [--layers 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from proxsparse_core.inference import sparse24 as si  # noqa: E402
from proxsparse_core.sparsity.masks import apply_masks, extract_masks  # noqa: E402
from proxsparse_core.sparsity.prunable import find_prunable  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [256, 1024, 2048, 4096, 8192, 16384, 32768]
PREFILL = [512, 2048, 8192, 16384]
OLD_PREFILL = [2048, 16384]
NOISE_AT = 2048
TARGET_PRODUCT, TARGET_PREFILL, TARGET_AGREEMENT, TARGET_TOKENS = 1.3, 1.15, 0.99, 16384


def _x(a, b):
    return f"{a / b:.2f}×" if a and b else "—"


def per_product(shapes=SHAPES, tokens=TOKENS, reps=10, device="cuda") -> list[dict]:
    print("per product, bf16 (loop = 10 calls between CUDA events; graph = same calls in a CUDA graph):")
    print(f"  {'out×in':>11} {'tokens':>6} {'dense ms':>9} {'old ms':>8} {'new ms':>8} {'old':>6} {'new':>6}"
          f" {'graph':>6} {'do_bench':>8}  {'err vs dense':>12} {'err fp32 dense/2:4':>19}")
    rows = []
    for o, i in shapes:
        for t in tokens:
            r = si.time_linear(o, i, t, reps=reps, old=True, graphs=True, do_bench=True, device=device)
            rows.append(dataclasses.asdict(r))
            print(f"  {o:>5}×{i:<5} {t:>6} {r.dense_ms:9.3f} {r.old_ms:8.3f} {r.sparse_ms:8.3f} "
                  f"{_x(r.dense_ms, r.old_ms):>6} {_x(r.dense_ms, r.sparse_ms):>6} "
                  f"{_x(r.dense_graph_ms, r.sparse_graph_ms):>6} {_x(r.dense_bench_ms, r.sparse_bench_ms):>8}  "
                  f"{r.rel_error:12.1e} {r.dense_error_fp32:9.1e}/{r.sparse_error_fp32:.1e}", flush=True)
    return rows


def by_tokens(rows: list[dict], key_dense: str, key_sparse: str) -> dict:
    """All shapes together: Σ dense / Σ 2:4 per token count (None where a time is missing)."""
    out = {}
    for t in sorted({r["tokens"] for r in rows}):
        sel = [r for r in rows if r["tokens"] == t]
        d, s = [r[key_dense] for r in sel], [r[key_sparse] for r in sel]
        out[t] = sum(d) / sum(s) if None not in d and None not in s else None
    return out


def build_model(layers: int, device="cuda", hidden=4096, inter=11008, heads=32, vocab=32000,
                max_positions=max(PREFILL)):
    """A 7B-shaped Llama with random init whose prunable weights are 2:4 by top-2 |W|."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    prunable = find_prunable(model)
    apply_masks(prunable, extract_masks(prunable))
    return model, prunable


@torch.no_grad()
def prefill(layers: int, lengths=PREFILL, old_lengths=OLD_PREFILL, noise_at=NOISE_AT, reps=10,
            device="cuda", **shape) -> dict:
    model, prunable = build_model(layers, device, **shape)
    t0 = time.perf_counter()
    rows, done, skipped = si.prefill_speedup(model, prunable, lengths, reps=reps, graphs=True, logits=True)
    print(f"prefill, {layers}-layer 7B-shaped Llama, batch 1, {len(done)} linears 2:4 ({len(skipped)} "
          f"kept dense), {time.perf_counter() - t0:.0f} s:")
    print(f"  {'tokens':>6} {'dense ms':>9} {'2:4 ms':>8} {'speed-up':>8} {'timing':>10} | {'eager dense':>11} "
          f"{'eager 2:4':>9} {'eager':>6} | {'next token =':>12} {'logits err':>10}")
    for r in rows:
        if r.speedup is None:
            print(f"  {r.tokens:>6} not measured: {r.note}")
            continue
        print(f"  {r.tokens:>6} {r.dense_ms:9.2f} {r.sparse_ms:8.2f} {r.speedup:7.2f}× {r.timing:>10} | "
              f"{r.dense_eager_ms:11.2f} {r.sparse_eager_ms:9.2f} {_x(r.dense_eager_ms, r.sparse_eager_ms):>6} | "
              f"{100 * r.agreement:11.2f}% {r.logits_rel_error:10.1e}" + (f"  ({r.note})" if r.note else ""),
              flush=True)
    out = dict(layers=layers, converted=len(done), skipped=len(skipped),
               rows=[dict(dataclasses.asdict(r), speedup=r.speedup) for r in rows])

    # the old path (semi-structured tensors), eager, same timing as the eager columns above
    old = []
    for t in old_lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, t), device=device)
        kw = si._forward_kwargs(model)
        dense_ms = si.median_ms(lambda: model(input_ids=ids, **kw), reps=3)
        with si.sparse_linears(prunable, path="semi"):
            old_ms = si.median_ms(lambda: model(input_ids=ids, **kw), reps=3)
        old.append(dict(tokens=t, dense_eager_ms=dense_ms, old_eager_ms=old_ms, speedup=dense_ms / old_ms))
        print(f"  old path (semi-structured tensors), eager, {t:>6} tokens: dense {dense_ms:.2f} ms, "
              f"2:4 {old_ms:.2f} ms → {dense_ms / old_ms:.2f}×", flush=True)
    out["old_path"] = old

    # the bf16 noise floor: how often do dense bf16 and 2:4 bf16 pick the fp32 model's next token?
    if noise_at:
        ids = torch.randint(0, model.config.vocab_size, (1, noise_at), device=device)
        dense_next = si.next_tokens(model, ids)
        with si.sparse_linears(prunable):
            sparse_next = si.next_tokens(model, ids)
        fp32 = copy.deepcopy(model).float()
        ref = si.next_tokens(fp32, ids)
        del fp32
        si._free()
        noise = dict(tokens=noise_at, dense_vs_fp32=float((dense_next == ref).float().mean()),
                     sparse_vs_fp32=float((sparse_next == ref).float().mean()),
                     sparse_vs_dense=float((sparse_next == dense_next).float().mean()))
        print(f"  next-token agreement at {noise_at} tokens: dense bf16 vs fp32 {100 * noise['dense_vs_fp32']:.2f}%, "
              f"2:4 bf16 vs fp32 {100 * noise['sparse_vs_fp32']:.2f}%, 2:4 vs dense {100 * noise['sparse_vs_dense']:.2f}%")
        out["noise_floor"] = noise
    del model
    si._free()
    return out


def summary(out: dict) -> str:
    """The compact table printed last, with the targets."""
    lines = ["", "=" * 78, f"2:4 on {out.get('device', '?')} ({out.get('backend', '?')})"]
    pp = out.get("per_product") or []
    if pp:
        loop = by_tokens(pp, "dense_ms", "sparse_ms")
        old = by_tokens(pp, "dense_ms", "old_ms")
        graph = by_tokens(pp, "dense_graph_ms", "sparse_graph_ms")
        bench = by_tokens(pp, "dense_bench_ms", "sparse_bench_ms")
        fmt = lambda v: f"{v:.2f}×" if v else "—"   # noqa: E731
        lines.append("per product, 3 shapes together: tokens  old(loop)  new(loop)  new(graph)  new(do_bench)")
        for t in loop:
            lines.append(f"  {t:>6}  {fmt(old[t]):>9}  {fmt(loop[t]):>9}  {fmt(graph[t]):>10}  {fmt(bench[t]):>12}")
        worst = max(r["rel_error"] for r in pp)
        lines.append(f"  largest 2:4 vs dense error {worst:.1e}")
        verdict = lambda v: "PASS" if v and v >= TARGET_PRODUCT else "FAIL"   # noqa: E731
        at, atg = loop.get(TARGET_TOKENS), graph.get(TARGET_TOKENS)
        lines.append(f"TARGET per product ≥ {TARGET_PRODUCT}× at {TARGET_TOKENS} tokens: back-to-back calls "
                     f"{fmt(at)} → {verdict(at)}; CUDA graph {fmt(atg)} → {verdict(atg)}")
    pf = out.get("prefill")
    if pf:
        lines.append(f"prefill, {pf['layers']}-layer 7B-shaped Llama: tokens  speed-up (timing)  eager  next token =")
        for r in pf["rows"]:
            if r["speedup"] is None:
                lines.append(f"  {r['tokens']:>6}  not measured: {r['note']}")
                continue
            eager = r["dense_eager_ms"] / r["sparse_eager_ms"]
            lines.append(f"  {r['tokens']:>6}  {r['speedup']:.2f}× ({r['timing']})  {eager:.2f}×  {100 * r['agreement']:.2f}%")
        for r in pf.get("old_path", []):
            lines.append(f"  old path, eager, {r['tokens']:>6} tokens: {r['speedup']:.2f}×")
        nf = pf.get("noise_floor")
        if nf:
            lines.append(f"  vs an fp32 copy at {nf['tokens']} tokens: dense bf16 {100 * nf['dense_vs_fp32']:.2f}%, "
                         f"2:4 {100 * nf['sparse_vs_fp32']:.2f}% of next tokens")
        row = next((r for r in pf["rows"] if r["tokens"] == TARGET_TOKENS and r["speedup"]), None)
        ok = row is not None and row["speedup"] >= TARGET_PREFILL and row["agreement"] >= TARGET_AGREEMENT
        lines.append(f"TARGET prefill ≥ {TARGET_PREFILL}× at {TARGET_TOKENS} tokens with ≥ {100 * TARGET_AGREEMENT:.0f}% "
                     f"next-token agreement: " + (f"{row['speedup']:.2f}×, {100 * row['agreement']:.2f}% → "
                                                  f"{'PASS' if ok else 'FAIL'}" if row else "not measured → FAIL"))
    lines.append("=" * 78)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--json", default="")
    ap.add_argument("--skip-products", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    args = ap.parse_args()
    ok, why = si.status()
    print(why)
    if not ok:
        return
    t0 = time.perf_counter()
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, backend=si.backend())
    try:
        if not args.skip_products:
            out["per_product"] = per_product()
        if not args.skip_prefill:
            out["prefill"] = prefill(args.layers)
    finally:
        out["seconds"] = time.perf_counter() - t0
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        print(summary(out))
        print(f"({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
