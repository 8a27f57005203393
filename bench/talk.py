"""Does the 2:4 model still talk? Learn a mask, recover it, and answer the app's example prompts.

One process, the app's own code path (Workspace): learn with a preset, recover the survivors,
then greedy answers of dense, ProxSparse and ProxSparse + recovery to each example prompt of the
Compare tab, with the wall time of every phase (the CPU budget figures of issue 9).

    python bench/talk.py --preset bundled-quality --recover both --recover-steps 300
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from proxsparse_core.config import RunConfig  # noqa: E402
from proxsparse_core.inference.evaluate import EXAMPLE_PROMPTS as PROMPTS, GenerationSettings  # noqa: E402
from proxsparse_core.recovery.recover import RecoveryConfig, recovered_name  # noqa: E402
from proxsparse_core.results import DENSE, LEARNED  # noqa: E402
from proxsparse_core.workspace import Workspace  # noqa: E402

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bundled-quality")
    ap.add_argument("--set", default="", help="overrides, e.g. 'device=cuda steps=100'")
    ap.add_argument("--recover", default="both")
    ap.add_argument("--recover-steps", type=int, default=300)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    over = dict(kv.split("=", 1) for kv in args.set.split())
    cfg = RunConfig().with_preset(args.preset)
    cfg = RunConfig(**{**cfg.to_dict(), **{k: type(getattr(cfg, k))(v) for k, v in over.items()}}).validate()
    out, times = {"preset": args.preset, "config": cfg.to_dict()}, {}
    ws = Workspace()
    t = time.perf_counter()
    ws.load(cfg)
    times["load model + prepare data"] = time.perf_counter() - t
    print(ws.lm.describe(), "|", ws.data.source, flush=True)
    t = time.perf_counter()
    res = ws.learn(cfg, lambda e: print(e.line(), flush=True) if e.step % 25 == 0 or e.step == 1 else None)
    times["learning"] = time.perf_counter() - t
    print(res.message, "|", ws.verify(LEARNED), flush=True)
    rec = recovered_name(LEARNED)
    t = time.perf_counter()
    r = ws.recover(LEARNED, RecoveryConfig(method=args.recover, steps=args.recover_steps, seed=cfg.seed),
                   lambda e: print("recovery", e.line(), flush=True) if e.step % 25 == 0 else None)
    times["recovery"] = time.perf_counter() - t
    print(r.message, "|", ws.verify(rec), flush=True)
    t = time.perf_counter()
    out["perplexity"] = {n: ws.perplexity(n) for n in (DENSE, LEARNED, rec)}
    out["agreement"] = {n: ws.agreement(n) for n in (LEARNED, rec)}
    times["evaluation"] = time.perf_counter() - t
    print("held-out perplexity:", {k: round(v, 2) for k, v in out["perplexity"].items()},
          "top-1 agreement:", {k: round(v, 3) for k, v in out["agreement"].items()}, flush=True)
    s = GenerationSettings(max_new_tokens=args.max_new_tokens)
    out["answers"] = {}
    for p in PROMPTS:
        out["answers"][p] = {n: ws.generate(n, p, s) for n in (DENSE, LEARNED, rec)}
        print(f"\n### {p}")
        for n, a in out["answers"][p].items():
            print(f"- {n}: {a!r}", flush=True)
    out["seconds"] = {k: round(v, 1) for k, v in times.items()}
    print("\nseconds:", out["seconds"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
