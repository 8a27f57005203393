"""Prox speed: the fast per-group kernels against the published (reference) schedule.

CPU:  a SmolLM2-shaped matrix (576×1536, real bundled weights when present) at λ1 ∈ {0.25, 1, 20},
      as loaded ("real") and in a mid-training state where 90% of groups are already 2:4 ("mid");
      timings alternate fast/reference so both see the same machine load; the objective of the
      fast result is checked against the reference's on every group. Then one learning step's
      prox over all prunable SmolLM2 matrices.
CUDA: the same per-matrix comparison on a 7B-shaped 11008×4096 bf16 matrix, then the prox of
      every prunable weight of a 7B-shaped Llama (32 × q,k,v,o 4096², gate/up 11008×4096,
      down 4096×11008; 6.5 G weights in bf16), as in one learning step.

"groups worse": groups whose fast result has a higher objective (float64, on the stored values)
than the reference schedule's by more than 1e-6·max|z|², which is float32 evaluation noise of the
candidates' objectives (tests/test_prox_speed_paths.py). The fast path must show 0 everywhere;
the last line sums them.

    python bench/prox_speed.py [--device cpu|cuda|both] [--threads N] [--json out.json]
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
from proxsparse_core.method import prox
from proxsparse_core.method import prox_native  # noqa: E402
from proxsparse_core.sparsity.masks import mask_2to4  # noqa: E402

LAMBDAS = (0.25, 1.0, 20.0)
LLAMA7B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def smollm2_weights() -> tuple[dict, str]:
    """The bundled SmolLM2's prunable weights if its cache exists, else random ones of its shapes."""
    from proxsparse_core.paths import cache_dir
    path = cache_dir() / "smollm2-135m-instruct" / "model.safetensors"
    if path.exists():
        from safetensors.torch import load_file
        sd = load_file(str(path))
        return {k: v.float() for k, v in sd.items() if ".layers." in k and k.endswith("proj.weight")}, "real"
    g = torch.Generator().manual_seed(0)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    return {f"layers.{i}.{j}": torch.randn(*s, generator=g) * 0.15 for i in range(30)
            for j, s in enumerate(shapes)}, "random (bundled model not cached)"


def mid_training(w: torch.Tensor, share: float = 0.9, seed: int = 0) -> torch.Tensor:
    """A state where `share` of the groups are already 2:4 (as after some learning steps)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = w.clone()
    groups, mask = out.view(-1, 4), mask_2to4(out).view(-1, 4)
    pick = (torch.rand(groups.shape[0], generator=g) < share).to(w.device)
    groups[pick] = groups[pick] * mask[pick]
    return out


def compare(W: torch.Tensor, lam: float, dev: str, reps: int) -> dict:
    """Alternating fast/reference timings (median), and the objective check on every group."""
    z = W.view(-1, 4)
    tf, tr = [], []
    for _ in range(reps):
        tf.append(_time(lambda: prox.prox_2to4_(W.clone(), lam), dev))
        tr.append(_time(lambda: prox.prox_2to4_(W.clone(), lam, mode="reference"), dev))
    clone = statistics.median(_time(lambda: W.clone(), dev) for _ in range(reps))
    fast = W.clone(); prox.prox_2to4_(fast, lam)
    ref = W.clone(); prox.prox_2to4_(ref, lam, mode="reference")
    of, orf = prox.objective(fast.view(-1, 4), z, lam), prox.objective(ref.view(-1, 4), z, lam)
    scale = z.double().abs().amax(1) ** 2          # per-group float32 noise scale
    worse = (of - orf) > 1e-6 * scale
    f, r = statistics.median(tf) - clone, statistics.median(tr) - clone
    return dict(lam=lam, fast_ms=1e3 * f, ref_ms=1e3 * r, speedup=r / f,
                groups=z.shape[0], groups_worse=int(worse.sum()),
                max_obj_excess=float((of - orf).max()), mean_obj_gain=float((orf - of).mean()))


def all_layers_cpu(weights: dict, lam: float, state: str) -> dict:
    ws = {k: (mid_training(v) if state == "mid" else v).clone() for k, v in weights.items()}
    hist = torch.zeros(5, dtype=torch.long)
    t = _time(lambda: [prox.prox_2to4_(w, lam, hist=hist) for w in ws.values()], "cpu")
    return dict(state=state, lam=lam, matrices=len(ws), weights=sum(w.numel() for w in ws.values()),
                seconds=t, share_24_after=float(hist[:3].sum() / hist.sum()))


def run_cpu(out: list, matrix: str = ""):
    weights, kind = smollm2_weights()
    name = next(k for k in weights if "layers.10." in k and "down_proj" in k) if kind == "real" else \
        next(k for k in weights if weights[k].shape == (576, 1536))
    W = weights[name].contiguous()
    if matrix:   # a saved real matrix, for machines without the bundled model
        W, name, kind = torch.load(matrix).float().contiguous(), matrix, "real, from file"
    print(f"CPU, {torch.get_num_threads()} threads, native kernel: {prox_native.available()}; "
          f"matrix {name} {tuple(W.shape)} ({kind})")
    for state, M in (("real", W), ("mid", mid_training(W))):
        for lam in LAMBDAS:
            r = compare(M, lam, "cpu", reps=5)
            r.update(device="cpu", state=state, shape=list(W.shape), weights=kind)
            out.append(r)
            print(f"  {state:4} λ1={lam:<5} fast {r['fast_ms']:8.2f} ms  reference {r['ref_ms']:8.1f} ms  "
                  f"{r['speedup']:6.1f}×  groups worse {r['groups_worse']}/{r['groups']}  "
                  f"max excess {r['max_obj_excess']:.1e}")
    for state in ("real", "mid"):
        for lam in LAMBDAS:
            r = all_layers_cpu(weights, lam, state)
            r.update(device="cpu", kind="all_layers")
            out.append(r)
            print(f"  all {r['matrices']} SmolLM2 matrices ({r['weights'] / 1e6:.0f} M weights), {state}, "
                  f"λ1={lam}: {r['seconds']:.3f} s per step")


def run_cuda(out: list, layers: int = 32):
    dev = "cuda"
    tri = prox.triton_kernels()
    print(f"CUDA: {torch.cuda.get_device_name()}, Triton kernel: {tri is not None}")
    g = torch.Generator(device=dev).manual_seed(0)
    W = (torch.randn(11008, 4096, device=dev, generator=g) * 0.02).bfloat16()
    print("  one 11008×4096 bf16 matrix: fast = prox_2to4_ (multi-pass kernel), reference = published schedule")
    for state, M in (("real", W), ("mid", mid_training(W))):
        for lam in LAMBDAS:
            r = compare(M, lam, dev, reps=3)
            r.update(device=dev, state=state, shape=list(W.shape), weights="random N(0, 0.02) bf16")
            out.append(r)
            print(f"  {state:4} λ1={lam:<5} fast {r['fast_ms']:7.2f} ms  reference {r['ref_ms']:8.1f} ms  "
                  f"vs reference {r['speedup']:6.1f}×  groups worse {r['groups_worse']}/{r['groups']}", flush=True)
    del W
    # every prunable weight of a 7B-shaped Llama, as in one learning step
    mats = [(torch.randn(o, i, device=dev, generator=g) * 0.02).bfloat16() for _ in range(layers) for o, i in LLAMA7B]
    n = sum(m.numel() for m in mats)
    for state in ("real", "mid"):
        if state == "mid":
            mats = [mid_training(m) for m in mats]
        for lam in LAMBDAS:
            times = []
            for _ in range(2):                      # each repetition on fresh copies of the state
                hist = torch.zeros(5, dtype=torch.long, device=dev)
                work = [m.clone() for m in mats]
                times.append(_time(lambda w=work, h=hist: [prox.prox_2to4_(m, lam, hist=h) for m in w], dev))
                del work
            t = statistics.median(times)
            r = dict(device=dev, kind="all_layers_7b", state=state, lam=lam, weights=n, seconds=t,
                     gbytes_per_s=2 * 2 * n / t / 1e9, matrices=len(mats))
            out.append(r)
            print(f"  all {len(mats)} 7B matrices ({n / 1e9:.2f} G weights, bf16), {state}, λ1={lam}: "
                  f"{1e3 * t:.1f} ms per step ({r['gbytes_per_s']:.0f} GB/s effective)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="both", choices=["cpu", "cuda", "both"])
    ap.add_argument("--json", default="")
    ap.add_argument("--matrix", default="", help="a saved 576×1536 weight (torch.save) for the CPU test")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the 7B-shaped step on CUDA")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out: list = []
    if args.device in ("cpu", "both"):
        run_cpu(out, args.matrix)
    if args.device in ("cuda", "both") and torch.cuda.is_available():
        run_cuda(out, args.layers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    checked = [r for r in out if "groups_worse" in r]
    if checked:
        worse = sum(r["groups_worse"] for r in checked)
        print(f"fast prox worse than the reference on {worse} of {sum(r['groups'] for r in checked)} groups "
              f"checked ({len(checked)} matrix × λ1 × state cases; max excess "
              f"{max(r['max_obj_excess'] for r in checked):.1e}) → {'PASS' if worse == 0 else 'FAIL'}")


if __name__ == "__main__":
    main()
