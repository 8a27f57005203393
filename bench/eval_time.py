"""Time the held-out perplexity the Learn tab measures after the steps, for one model, on the bundled
model with a preset's evaluation settings (its windows × tokens), on this machine's CPU.

    python bench/eval_time.py                      # print the time of a 2:4 mask (--dense: of the dense model too)
    python bench/eval_time.py --record             # also write eval:bundled:cpu to bench/measured.json

The app's ETA estimates this time from the run's own pace (progress.scoring_seconds); this script
measures it, to check that estimate on a machine (bench/RESULTS.md 3g). The 2:4 model is magnitude's
mask on W0, written in place as the learned mask is; the dense model is measured with the memo off
(PROXSPARSE_MEMO=0).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxsparse_core import measured  # noqa: E402

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick-demo", help="whose evaluation settings (windows, tokens) to use")
    ap.add_argument("--dense", action="store_true", help="time the dense model too (the memo off)")
    ap.add_argument("--record", action="store_true", help="write eval:bundled:cpu to bench/measured.json")
    args = ap.parse_args()
    os.environ["PROXSPARSE_MEMO"] = "0"            # the dense model measured, not read
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from proxsparse_core.config import BUNDLED, RunConfig
    from proxsparse_core.results import DENSE
    from proxsparse_core.workspace import Workspace

    cfg = RunConfig(device="cpu", dtype="float32").with_preset(args.preset)
    assert cfg.model == BUNDLED, f"{args.preset} is not a preset of the bundled model"
    ws = Workspace()
    ws.load(cfg)
    windows, tokens = ws.data.held_out.shape
    ws.prune("magnitude", cfg)
    times = {}
    load = os.getloadavg()[0]
    for name in ((DENSE,) if args.dense else ()) + ("magnitude",):
        t0 = time.perf_counter()
        ws.perplexity(name)
        times[name] = time.perf_counter() - t0
        print(f"{name}: {windows} windows × {tokens} tokens in {times[name]:.1f} s (perplexity {ws.ppl[name]:.2f})")
    load = max(load, os.getloadavg()[0])
    print(f"load average of this machine: {load:.1f} (other work shares its {os.cpu_count()} cores)")
    if args.record:
        record(times["magnitude"], windows, tokens, args, load)


def record(seconds: float, windows: int, tokens: int, args, load: float) -> None:
    """Write the figure into bench/measured.json, keeping the file's format and its other figures."""
    path = measured.record("eval:bundled:cpu", {
        "seconds": round(seconds, 1), "windows": windows, "tokens": tokens,
        "what": f"held-out perplexity of one 2:4 model after the steps ({windows} windows × {tokens} tokens, "
                f"{args.preset}'s settings; load average {load:.1f} from other work)",
        "machine": f"{os.cpu_count()} CPU cores", "command": f"python bench/eval_time.py --preset {args.preset}"})
    print(f"recorded eval:bundled:cpu: {seconds:.1f} s in {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
