"""2:4 generation speed: the packed 2:4 kernel (proxsparse_core.inference.decode24) against dense.

1. Per product, Llama-2-7B shapes (4096×4096, 11008×4096, 4096×11008), bf16, 1/2/4/8/16 tokens:
   dense F.linear against every candidate kernel configuration. Each side is timed as a CUDA graph
   of calls that cycle through `--copies` different weights (more bytes than the L2 cache holds, as
   in generation, where every layer's weights come from memory); median of replays. Errors: kernel
   vs the dense product of the same 2:4 weight, and each vs float32.
2. Whole decoder stack: a 7B-shaped LlamaForCausalLM (`--layers`, random init, bf16, prunable
   weights 2:4 by top-2 |W|), batch 1, greedy decoding with a KV cache, dense vs
   `use_24_kernels(model)`:
   - graph: one decoding step (all layers, lm_head, argmax) captured in a CUDA graph and replayed
     token after token (a static KV cache, the model's own modules), the time per token;
   - eager: the model's own forward with its DynamicCache, token by token (what generate() does).
   Tokens/s both ways, and how many greedy tokens 2:4 and dense share.

    python bench/decode24.py [--layers 32] [--json out.json] [--quick]
    python bench/decode24.py --device cpu --layers 2 --hidden 256 --inter 512 --vocab 1000 --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from proxsparse_core.inference import decode24 as d24  # noqa: E402
from proxsparse_core.inference.sparse24 import random_24_weight  # noqa: E402
from proxsparse_core.sparsity.masks import apply_masks, extract_masks  # noqa: E402
from proxsparse_core.sparsity.prunable import find_prunable  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [1, 2, 4, 8, 16]
TARGET_PRODUCT, TARGET_STACK = 1.3, 1.2


def graph_call_ms(fns, rounds: int = 5, reps: int = 15) -> float:
    """Per call: `fns` (one per weight copy) called `rounds` times over in one CUDA graph; median."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(rounds):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / (rounds * len(fns)))
    del g
    return statistics.median(times)


def _err(a, ref):
    return float((a.float() - ref).norm() / ref.norm().clamp_min(1e-30))


@torch.no_grad()
def per_product(shapes, tokens, copies: int, quick: bool) -> list[dict]:
    rows = []
    print("per product, bf16, CUDA graphs cycling through", copies, "weight copies "
          "(dense = F.linear; 2:4 = the kernel, best configuration; ratio = dense / 2:4):")
    for (o, i) in shapes:
        ws = [random_24_weight(o, i, seed=s) for s in range(copies)]
        packed = [d24.pack_24(w) for w in ws]
        sem = torch.zeros(o // 4 + 1, dtype=torch.int32, device="cuda")
        for t in tokens:
            cfgs = d24.candidate_configs(o, i, t)
            if quick:                          # the default of each kind
                cfgs = [cfgs[0]] + [c for c in cfgs if c.kind == "fma"][:1]
            x = torch.randn(t, i, device="cuda", dtype=torch.bfloat16)
            dense_ms = graph_call_ms([lambda w=w: F.linear(x, w) for w in ws])
            ref = x.float() @ ws[0].float().t()
            dense = F.linear(x, ws[0])
            timings = {}
            for cfg in cfgs + ([] if quick else [d24.Config(**{**cfgs[0].__dict__, "asm": False})]):
                try:
                    y = d24.mm24(x, *packed[0], i, None, cfg, sem)
                    err = _err(y, dense.float())
                    ms = graph_call_ms([lambda p=p: d24.mm24(x, *p, i, None, cfg, sem) for p in packed])
                except Exception as exc:       # noqa: BLE001 - a configuration that fails is reported
                    print(f"    {o}×{i} t={t} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                timings[str(cfg)] = (ms, err)
            best = min((v[0], k) for k, v in timings.items())
            default = str(cfgs[0])
            r = dict(out=o, inp=i, tokens=t, dense_ms=dense_ms, best_ms=best[0], best=best[1],
                     default_ms=timings.get(default, (None,))[0], default=default,
                     err_vs_dense=timings[best[1]][1], dense_err_fp32=_err(dense, ref),
                     kernel_err_fp32=_err(d24.mm24(x, *packed[0], i, None, None, sem), ref),
                     configs={k: v[0] for k, v in timings.items()})
            rows.append(r)
            gb = (ws[0].numel() * 2) / 1e6
            print(f"  {o:>5}×{i:<5} t={t:>2}  dense {1e3 * dense_ms:7.1f} µs ({gb / dense_ms:5.0f} GB/s)  "
                  f"2:4 {1e3 * best[0]:7.1f} µs [{best[1]}]  → {dense_ms / best[0]:.2f}×   default "
                  f"{1e3 * r['default_ms']:.1f} µs  err vs dense {r['err_vs_dense']:.1e}, fp32: dense "
                  f"{r['dense_err_fp32']:.1e} 2:4 {r['kernel_err_fp32']:.1e}", flush=True)
        del ws, packed
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- whole stack

def build_model(layers: int, device: str, hidden=4096, inter=11008, heads=32, vocab=32000, ctx=1024):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=ctx, tie_word_embeddings=False)
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


class StaticDecoder:
    """One greedy decoding step of a Llama-style HF model with a static KV cache, built from the
    model's own modules (norms, projections, rotary embedding, MLP, head): every tensor has a fixed
    shape and address, so the step can be captured in a CUDA graph. Position `pos` is a device
    tensor; attention masks the cache beyond it."""

    def __init__(self, model, max_len: int):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        self.rope_apply = apply_rotary_pos_emb
        self.model, self.inner = model, model.model
        c = model.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        p = next(model.parameters())
        shape = (1, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.inner.layers]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.inner.layers]
        self.max_len = max_len
        self.pos = torch.zeros(1, dtype=torch.long, device=p.device)
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=p.device)
        self.slots = torch.arange(max_len, device=p.device)

    def step(self) -> torch.Tensor:
        """Feed self.tok at self.pos; returns the argmax next token [1, 1]."""
        h = self.inner.embed_tokens(self.tok)
        pos_ids = self.pos.view(1, 1)
        cos, sin = self.inner.rotary_emb(h, pos_ids)
        visible = (self.slots <= self.pos).view(1, 1, 1, -1)
        for i, layer in enumerate(self.inner.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(1, 1, self.heads, self.head_dim).transpose(1, 2)
            k = a.k_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = a.v_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.rope_apply(q, k, cos, sin)
            self.k[i].index_copy_(2, self.pos, k)
            self.v[i].index_copy_(2, self.pos, v)
            att = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=visible,
                                                 enable_gqa=self.kv_heads != self.heads)
            h = h + a.o_proj(att.transpose(1, 2).reshape(1, 1, -1))
            x = layer.post_attention_layernorm(h)
            m = layer.mlp
            h = h + m.down_proj(m.act_fn(m.gate_proj(x)) * m.up_proj(x))
        logits = self.model.lm_head(self.inner.norm(h))
        return logits[:, -1:].argmax(-1)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed a prompt token by token (fills the cache); returns the next token."""
        for j in range(ids.shape[1]):
            self.tok.copy_(ids[:, j:j + 1])
            self.pos.fill_(j)
            nxt = self.step()
        return nxt


@torch.no_grad()
def decode_graph(model, prompt: torch.Tensor, new: int, reps: int = 3) -> tuple[float, list[int]]:
    """ms per generated token (CUDA graph of one step, replayed), and the greedy tokens."""
    dec = StaticDecoder(model, prompt.shape[1] + new + 1)
    nxt = dec.prefill(prompt)
    start = prompt.shape[1]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                # warm-up (kernels chosen and compiled here)
        dec.tok.copy_(nxt)
        dec.pos.fill_(start)
        dec.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = dec.step()
    times, toks = [], []
    for r in range(reps):
        dec.tok.copy_(nxt)
        dec.pos.fill_(start)
        got = []
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(new):
            g.replay()
            dec.tok.copy_(out)
            dec.pos.add_(1)
            if r == 0:
                got.append(out.view(()).clone())
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / new)
        if r == 0:
            toks = [int(x) for x in got]
    del g
    return statistics.median(times[1:] if len(times) > 1 else times), toks


@torch.no_grad()
def decode_eager(model, prompt: torch.Tensor, new: int) -> tuple[float, list[int]]:
    """ms per generated token with the model's own forward and cache, token by token."""
    from transformers import DynamicCache
    cache = DynamicCache()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    toks = []
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    for j in range(new + 2):
        if j == 2:                              # two warm-up tokens
            sync()
            t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        toks.append(int(tok))
    sync()
    return 1e3 * (time.perf_counter() - t0) / new, toks[2:]


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def stack(layers: int, device: str, prompt_len: int, new: int, graphs: bool, **shape) -> dict:
    t0 = time.perf_counter()
    model, prunable = build_model(layers, device, **shape)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    print(f"decoder stack: {layers}-layer Llama, hidden {model.config.hidden_size}, MLP "
          f"{model.config.intermediate_size}, {len(prunable.names)} prunable linears 2:4, prompt "
          f"{prompt_len} tokens, {new} new tokens, built in {time.perf_counter() - t0:.0f} s", flush=True)
    res = dict(layers=layers, prompt=prompt_len, new=new)
    if graphs:
        res["dense_graph_ms"], dense_toks = decode_graph(model, prompt, new)
    res["dense_eager_ms"], dense_eager_toks = decode_eager(model, prompt, new)
    t1 = time.perf_counter()
    done, skipped = d24.use_24_kernels(model, prunable)
    res["converted"], res["skipped"] = len(done), len(skipped)
    if graphs:
        res["sparse_graph_ms"], sparse_toks = decode_graph(model, prompt, new)
        res["shared_greedy_graph"] = _shared_prefix(dense_toks, sparse_toks)
        res["same_greedy_graph"] = sum(x == y for x, y in zip(dense_toks, sparse_toks))
    res["sparse_eager_ms"], sparse_eager_toks = decode_eager(model, prompt, new)
    res["shared_greedy_eager"] = _shared_prefix(dense_eager_toks, sparse_eager_toks)
    res["choices"] = {f"{k[0]}×{k[1]} t≤{k[2]}": (str(v.config) if v.config else "dense", v.dense_ms, v.kernel_ms)
                      for k, v in d24._CHOICES.items()}
    res["convert_and_measure_s"] = time.perf_counter() - t1
    d24.restore_dense(model)
    for k in ("graph", "eager"):
        if f"dense_{k}_ms" in res:
            res[f"{k}_speedup"] = res[f"dense_{k}_ms"] / res[f"sparse_{k}_ms"]
            print(f"  {k:5}: dense {res[f'dense_{k}_ms']:.2f} ms/token ({1e3 / res[f'dense_{k}_ms']:.1f} tok/s), "
                  f"2:4 {res[f'sparse_{k}_ms']:.2f} ms/token ({1e3 / res[f'sparse_{k}_ms']:.1f} tok/s) → "
                  f"{res[f'{k}_speedup']:.2f}× tokens/s", flush=True)
    print(f"  greedy tokens shared with dense before the first difference: graph "
          f"{res.get('shared_greedy_graph', '—')}/{new}, eager {res['shared_greedy_eager']}/{new}; "
          f"conversion + first-use measurement {res['convert_and_measure_s']:.1f} s")
    print("  kernel choices:", res["choices"])
    del model
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="per product: the default configuration only")
    ap.add_argument("--tokens", default="1,2,4,8,16", help="token counts per product")
    ap.add_argument("--skip-products", action="store_true")
    ap.add_argument("--skip-stack", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: eager stack only, dense kernels")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out = {}
    if args.device == "cuda":
        print(torch.cuda.get_device_name(), "| torch", torch.__version__, flush=True)
        if not args.skip_products:
            out["products"] = per_product(SHAPES, [int(t) for t in args.tokens.split(",")], args.copies, args.quick)
    if not args.skip_stack:
        out["stack"] = stack(args.layers, args.device, args.prompt, args.new, graphs=args.device == "cuda",
                             hidden=args.hidden, inter=args.inter, vocab=args.vocab)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    print("=" * 100)
    for r in out.get("products", []):
        print(f"  {r['out']:>5}×{r['inp']:<5} t={r['tokens']:>2}: {r['dense_ms'] / r['best_ms']:.2f}× "
              f"(default configuration {r['dense_ms'] / r['default_ms']:.2f}×)")
    if "products" in out:
        worst = min(r["dense_ms"] / r["best_ms"] for r in out["products"])
        print(f"per-product target ≥ {TARGET_PRODUCT}× at 1–16 tokens: worst {worst:.2f}× → "
              f"{'met' if worst >= TARGET_PRODUCT else 'NOT met'}")
    st = out.get("stack", {})
    if "graph_speedup" in st:
        print(f"stack target ≥ {TARGET_STACK}× tokens/s: graph {st['graph_speedup']:.2f}×, eager "
              f"{st['eager_speedup']:.2f}× → {'met' if st['graph_speedup'] >= TARGET_STACK else 'NOT met'} (graph)")


if __name__ == "__main__":
    main()
