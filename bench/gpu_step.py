"""One learning step on a 7B-shaped Llama on one GPU: plain AdamW fine-tuning vs ProxSparse.

Random-initialised Llama-2-7B shapes (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000),
bf16, context 4096, batch 1, gradient checkpointing, fused AdamW, only the prunable weights
trained (the same parameters in every variant). Variants:

  adamw        plain fine-tuning step: fwd+bwd, AdamW on the bf16 weights (what the network costs by itself)
  prox         ProxSparseLearner, λ2 off, on the bf16 weights (master_weights off, as the 7B–14B presets)
  prox_fp32    the same with float32 master copies (master_weights fp32, the default for small models)
  prox_l2      ProxSparseLearner, λ2 on, W0 copy on the GPU
  prox_l2_off  ProxSparseLearner, λ2 on, W0 kept in pinned CPU memory (w0_offload)
  adamw_prox   a prototype, not the learner: the adamw loop, then the prox (λ 0.25) on every prunable
               weight after each AdamW step, in line (should cost what `prox` costs)
  adamw_prox_overlap   the same prox launched on a second CUDA stream, layer by layer; the next step's
               forward waits for each layer's prox just before that layer runs (forward pre-hooks), so
               the prox of later layers runs beside the forward of earlier ones. Step time: from one
               step's start to the next one's, the prox counted where it really ends

The ProxSparse variants run the project's real learner (proxsparse_core.method.learner), so its step
events give the fwd+bwd / optimizer / prox split and the peak memory. Reported: median step time
over the steps after the first, prox share of the step, peak GiB, ratio to adamw, and the
projection for 400 steps.

    python bench/gpu_step.py [--layers 32] [--ctx 4096] [--steps 6] [--json out.json]
    python bench/gpu_step.py --device cpu --layers 2 --hidden 256 --inter 512 --vocab 1000 --ctx 64   # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from proxsparse_core.config import RunConfig  # noqa: E402
from proxsparse_core.method.learner import ProxSparseLearner, memory_in_use  # noqa: E402
from proxsparse_core.models.loading import LoadedModel  # noqa: E402
from proxsparse_core.sparsity.prunable import find_prunable  # noqa: E402


def _sync(dev: str):
    if dev == "cuda":
        torch.cuda.synchronize()


def build(layers: int, ctx: int, hidden: int, inter: int, vocab: int, dev: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=vocab,
                      max_position_embeddings=max(4096, ctx), tie_word_embeddings=False)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    model.config.use_cache = False
    return model.eval()


def adamw_steps(lm: LoadedModel, samples: torch.Tensor, steps: int, lr: float, dev: str,
                prox: str = "", lam: float = 0.25) -> dict:
    """Plain fine-tuning of the prunable weights, no stats; with `prox` "inline" or "overlap" the
    prox after each AdamW step (see the module doc: adamw, adamw_prox*). Step time: from one step's
    start to the next one's."""
    from proxsparse_core.method.prox import prox_2to4_
    model = lm.model
    mods = list(lm.prunable.modules.values())
    ids = {id(m.weight) for m in mods}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    params = [p for p in model.parameters() if p.requires_grad]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=dev == "cuda")
    overlap = prox == "overlap" and dev == "cuda"
    side = torch.cuda.Stream() if overlap else None
    ready: dict = {}
    hooks = []
    if overlap:
        def wait_for_prox(mod, args):
            ev = ready.pop(id(mod), None)
            if ev is not None:
                torch.cuda.current_stream().wait_event(ev)
        hooks = [m.register_forward_pre_hook(wait_for_prox) for m in mods]
    hist = [torch.zeros(5, dtype=torch.long, device=dev) for _ in mods]
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    starts, fb, op, px = [], [], [], []
    for s in range(steps):
        batch = samples[s % samples.shape[0]].unsqueeze(0).to(dev)
        _sync(dev)
        t0 = time.perf_counter()
        starts.append(t0)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        _sync(dev)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        t2 = time.perf_counter()
        if overlap:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for m, h in zip(mods, hist):
                    prox_2to4_(m.weight.data, lam, hist=h)
                    ev = torch.cuda.Event()
                    ev.record(side)
                    ready[id(m)] = ev
        elif prox:
            for m, h in zip(mods, hist):
                prox_2to4_(m.weight.data, lam, hist=h)
            _sync(dev)
        t3 = time.perf_counter()
        fb.append(t1 - t0); op.append(t2 - t1); px.append(t3 - t2)
    if overlap:
        torch.cuda.current_stream().wait_stream(side)
    _sync(dev)
    starts.append(time.perf_counter())
    for h in hooks:
        h.remove()
    counts = torch.stack(hist).sum(0).tolist()
    peak = memory_in_use(dev)
    del opt
    model.gradient_checkpointing_disable()
    model.eval()
    if dev == "cuda":
        torch.cuda.empty_cache()
    times = [b - a for a, b in zip(starts, starts[1:])]
    out = dict(step_s=statistics.median(times[1:]), fwd_bwd_s=statistics.median(fb[1:]),
               opt_s=statistics.median(op[1:]), prox_s=statistics.median(px[1:]), peak_gib=peak / 2**30)
    return {**out, "groups_0_to_4": counts, "overlap": overlap} if prox else {**out, "prox_s": 0.0}


def prox_steps(lm: LoadedModel, samples: torch.Tensor, steps: int, lr: float, lam2: float,
               offload: bool, master: str = "off") -> dict:
    cfg = RunConfig(lambda1=0.25, lambda2=lam2, eps=0.5, lr=lr, steps=steps, batch=1, warmup=0.1,
                    grad_ckpt=True, w0_offload=offload, layer_stats_every=1, ctx=samples.shape[1],
                    master_weights=master)
    t0 = time.perf_counter()
    res = ProxSparseLearner(lm, cfg, samples).run()
    wall = time.perf_counter() - t0
    ev = res.events[1:]
    assert res.status == "finished", res.message
    med = lambda k: statistics.median(getattr(e, k) for e in ev)  # noqa: E731
    return dict(step_s=med("t_step"), fwd_bwd_s=med("t_fwd_bwd"), opt_s=med("t_opt"), prox_s=med("t_prox"),
                peak_gib=max(e.mem_bytes for e in res.events) / 2**30, run_wall_s=wall,
                setup_s=wall - sum(e.t_step for e in res.events), share_24=res.events[-1].share_24,
                loss_first=res.events[0].lm_loss, loss_last=res.events[-1].lm_loss)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--variants", default="adamw,prox,prox_l2,prox_l2_off")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke test with small shapes")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    dev = args.device
    model = build(args.layers, args.ctx, args.hidden, args.inter, args.vocab, dev)
    prunable = find_prunable(model)
    lm = LoadedModel(model, None, "random-7b-shape", "Llama-2-7B shape (random)", dev,
                     torch.bfloat16, prunable, args.ctx)
    n = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    print(f"{name}: {n / 1e9:.2f} G parameters, {len(prunable.names)} prunable "
          f"matrices, bf16, ctx {args.ctx}, batch 1, gradient checkpointing")
    samples = torch.randint(0, args.vocab, (8, args.ctx), generator=torch.Generator().manual_seed(0))
    rows = {}
    for v in args.variants.split(","):
        if v == "adamw":
            r = adamw_steps(lm, samples, args.steps, args.lr, dev)
        elif v.startswith("adamw_prox"):
            r = adamw_steps(lm, samples, args.steps, args.lr, dev, prox="overlap" if v.endswith("overlap") else "inline")
        else:
            r = prox_steps(lm, samples, args.steps, args.lr, lam2=0.25 if "l2" in v else 0.0,
                           offload=v.endswith("_off"), master="fp32" if v.endswith("fp32") else "off")
        rows[v] = r
        base = rows.get("adamw", {}).get("step_s")
        r["ratio_to_adamw"] = r["step_s"] / base if base else None
        r["prox_share"] = r["prox_s"] / r["step_s"]
        r["projected_400_steps_min"] = 400 * r["step_s"] / 60
        print(f"  {v:12} step {r['step_s']:.3f} s (fwd+bwd {r['fwd_bwd_s']:.3f}, opt {r['opt_s']:.3f}, "
              f"prox {r['prox_s']:.4f} = {100 * r['prox_share']:.1f}%)  peak {r['peak_gib']:.1f} GiB  "
              + (f"{r['ratio_to_adamw']:.3f}× adamw  " if r["ratio_to_adamw"] else "")
              + f"400 steps ≈ {r['projected_400_steps_min']:.1f} min"
              + (f" (+ setup {r['setup_s']:.0f} s)" if "setup_s" in r else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
