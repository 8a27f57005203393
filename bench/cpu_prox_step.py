"""The CPU prox of one real learning step: as built, without reading runs of 32 groups in place,
and (optionally) as an earlier commit built it.

While learning, AdamW moves every weight, zeros included, so every group the prox sees has ≥ 3
non-zeros; the C kernel (method/prox_native.py) then reads and writes runs of 32 consecutive groups
where they lie (`run32`) instead of gathering them one by one. This learns `--preset` (default
quick-demo, the bundled model) for `--step` steps, keeps the prox's input of that step (every
prunable matrix, its λ1 and column weights), and times the one-call prox of it:

  in place   the kernel as it is
  gathered   the same source without the run32 path (every group gathered one by one, as before)
  REV        with --vs REV: the kernel source and compiler flags of commit REV (read with git show)

alternating, `--rounds` times each, on the same input; the results must be bit-identical.

    python bench/cpu_prox_step.py [--preset quick-demo] [--step 20] [--rounds 7] [--vs fe1aec2]
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from proxsparse_core import native  # noqa: E402
from proxsparse_core.config import RunConfig  # noqa: E402
from proxsparse_core.method import prox_native  # noqa: E402
from proxsparse_core.method.prox import FAST_TOL, MAX_SWEEPS  # noqa: E402
from proxsparse_core.workspace import Workspace  # noqa: E402

RUN32_CALL = """        if (n == 0 && i >= retry && i + L <= g1) {
            if (run32(t, i, tol, max_sweeps, h)) { i += L - 1; continue; }
            retry = i + L;
        }
"""


def build_at(rev: str) -> native.Library:
    """The prox kernel as commit `rev` built it: its C source and its compiler flags."""
    def show(path):
        return subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True,
                              cwd=os.path.join(os.path.dirname(__file__), "..")).stdout
    source = re.search(r'_SOURCE = r"""(.*?)"""', show("proxsparse_core/method/prox_native.py"), re.S).group(1)
    flags = ast.literal_eval(re.search(r"FLAGS = (\[.*?\])", show("proxsparse_core/native.py"), re.S).group(1))
    lib = native.Library(f"prox24_{rev}", source, prox_native._setup)
    lib.lib = native.build(f"prox24_{rev}", source, flags)
    lib.setup(lib.lib)
    return lib


def step_input(preset: str, step: int) -> dict:
    """The prox's input at learning step `step` of `preset` (copies)."""
    cfg = RunConfig().with_preset(preset)
    real, seen, stop = prox_native.prox_layers_, {}, threading.Event()

    def spy(weights, lams, tol, max_sweeps, cols=None):
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == step:
            seen["input"] = dict(w=[w.detach().clone() for w in weights], lams=list(lams),
                                 cols=None if cols is None else [None if c is None else c.clone() for c in cols])
            stop.set()
        return real(weights, lams, tol, max_sweeps, cols)

    prox_native.prox_layers_ = spy
    try:
        ws = Workspace()
        ws.load(cfg)
        ws.learn(cfg, lambda ev: None, stop)
    finally:
        prox_native.prox_layers_ = real
    if "input" not in seen:
        raise SystemExit(f"the run made only {seen.get('calls', 0)} prox calls (the one-call CPU prox not used?)")
    return seen["input"]


def timed(lib, inp: dict) -> tuple[float, list]:
    prox_native._LIB = lib
    ws = [w.clone() for w in inp["w"]]
    t = time.perf_counter()
    prox_native.prox_layers_(ws, inp["lams"], FAST_TOL, MAX_SWEEPS, inp["cols"])
    return time.perf_counter() - t, ws


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick-demo")
    ap.add_argument("--step", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--vs", metavar="REV", help="also time the kernel of this earlier commit")
    args = ap.parse_args()
    assert RUN32_CALL in prox_native._SOURCE, "the run32 call in range() changed: update RUN32_CALL"
    in_place = prox_native._LIB
    gathered = native.Library("prox24_gathered", prox_native._SOURCE.replace(RUN32_CALL, ""), prox_native._setup)
    inp = step_input(args.preset, args.step)
    groups = sum(w.numel() for w in inp["w"]) // 4
    print(f"{args.preset}, the prox input of step {args.step}: {len(inp['w'])} matrices, {groups:,} groups, "
          f"{torch.get_num_threads()} threads", flush=True)
    libs = {"in place": in_place, "gathered": gathered}
    if args.vs:
        libs[args.vs] = build_at(args.vs)
    times = {k: [] for k in libs}
    same = True
    for _ in range(args.rounds):
        out = {}
        for k, lib in libs.items():
            t, out[k] = timed(lib, inp)
            times[k].append(t)
        same = same and all(torch.equal(x, y) for k in libs if k != "in place"
                            for x, y in zip(out["in place"], out[k]))
    prox_native._LIB = in_place
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:9} median {med[k] * 1000:.1f} ms  (min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f})")
    ratios = "; ".join(f"{k} / in place: {med[k] / med['in place']:.2f}×" for k in libs if k != "in place")
    print(f"{ratios}; results bit-identical: {same}")


if __name__ == "__main__":
    main()
