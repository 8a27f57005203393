"""The loop guard on saved 2:4 models: greedy answers with and without "Block repeats".

Loads each run folder given (a `learn`/`prune` folder, or a `recover` folder with its updated weights)
the way `eval --masks` does, and answers the Compare tab's example prompts and bench/quality.py's
MORE_PROMPTS with dense and each run, plain greedy and with no repeated N-gram (--guard, default the
tab's 4). One JSON line per (model, setting) on stdout, then the count of answers that go round in a
loop (quality.loops).

    python bench/guard_answers.py runs/sgpt-rec runs/best-long --max-new-tokens 48
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from proxsparse_core.runs.files import load_masks  # noqa: E402
from proxsparse_core.config import RunConfig  # noqa: E402
from proxsparse_core.inference.evaluate import EXAMPLE_PROMPTS, GenerationSettings  # noqa: E402
from proxsparse_core.runs.folder import WEIGHTS_FILE, load_weights_file  # noqa: E402
from proxsparse_core.results import DENSE, Pruning  # noqa: E402
from proxsparse_core.workspace import Workspace  # noqa: E402
from quality import MORE_PROMPTS, loops  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--guard", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    ws = Workspace()
    ws.load(RunConfig(device=args.device, dtype="float32", data="builtin", samples=8, eval_windows=0))
    names = [DENSE]
    for run in args.runs:
        masks = load_masks(run)
        ws.add_result(run, Pruning("masks", masks))
        if Path(run, WEIGHTS_FILE).is_file():
            ws.results[run].weights = load_weights_file(run, ws.lm.prunable, masks)
        assert ws.verify(run).ok
        names.append(run)
    prompts = EXAMPLE_PROMPTS + MORE_PROMPTS
    for name in names:
        for guard in (0, args.guard):
            s = GenerationSettings(max_new_tokens=args.max_new_tokens, no_repeat_ngram=guard)
            answers = {p: ws.generate(name, p, s) for p in prompts}
            print(json.dumps({"model": name, "guard": guard, "loops": sum(map(loops, answers.values())),
                              "answers": answers}), flush=True)


if __name__ == "__main__":
    main()
