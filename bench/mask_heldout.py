"""Held-out perplexity of the masks of saved runs, side by side: on the run's own held-out windows
(the built-in text for the bundled presets) and on other texts, each scored on the same windows
for every run. Says whether the masks are the same bit for bit.

    python bench/mask_heldout.py /tmp/before /tmp/after --heldout bench/texts/*.txt
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxsparse_core.data.text import heldout_windows, special_prefix, tokenize  # noqa: E402
from proxsparse_core.inference.evaluate import score  # noqa: E402
from proxsparse_core.results import DENSE, Pruning  # noqa: E402
from proxsparse_core.runs.files import load_masks, load_recipe  # noqa: E402
from proxsparse_core.sparsity.masks import layer_shapes  # noqa: E402
from proxsparse_core.workspace import Workspace  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders (learn --out) made with the same model and data")
    ap.add_argument("--heldout", nargs="*", default=[], help="more held-out text files")
    ap.add_argument("--windows", type=int, default=40, help="windows per extra text")
    args = ap.parse_args()
    cfg = load_recipe(args.runs[0])
    ws = Workspace()
    ws.load(cfg)
    prefix = special_prefix(ws.lm.tokenizer)
    texts = {"built-in": ws.data.held_out}
    for path in args.heldout:
        ids = tokenize(ws.lm.tokenizer, Path(path).read_text())
        texts[Path(path).stem] = heldout_windows(ids, cfg.eval_ctx, args.windows, prefix)
    rows = {}
    for run in [DENSE] + args.runs:
        if run != DENSE:
            masks = load_masks(run, layer_shapes(ws.lm.prunable))
            digest = hashlib.sha256(b"".join(masks[n].numpy().tobytes() for n in sorted(masks))).hexdigest()[:16]
            ws.add_result(run, Pruning("proxsparse", masks, None, {}))
        else:
            digest = "-"
        ppl = {}
        for text, windows in texts.items():
            with ws.lock, ws.variant(run):
                ppl[text] = score(ws.lm.model, windows).ppl
        rows[run] = (digest, ppl)
        print(f"{run}: mask {digest}  " + "  ".join(f"{t} {p:.4f}" for t, p in ppl.items()), flush=True)
    print("\n| run | mask (sha256) | " + " | ".join(texts) + " |")
    print("|---|---|" + "---|" * len(texts))
    for run, (digest, ppl) in rows.items():
        print(f"| {run} | {digest} | " + " | ".join(f"{ppl[t]:.4f}" for t in texts) + " |")
    digests = {d for r, (d, _) in rows.items() if r != DENSE}
    print("\nmasks " + ("identical bit for bit" if len(digests) == 1 else "differ"))


if __name__ == "__main__":
    main()
