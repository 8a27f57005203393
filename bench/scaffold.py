"""Does recovery teach a 2:4 chat model its prompt scaffolding? (issue 28 item 1)

Reopens a learn run (e.g. `python -m proxsparse_core learn --preset quick-demo --out /tmp/qd`), then
recovers its mask once per --variant on the same OBS update and the same fine-tuning budget, and prints
for every model (dense, the mask, each recovery) the greedy answers to the app's example prompts plus two
more, whether an answer recites the system prompt, and held-out perplexity on the built-in text and every
--heldout text.

    python bench/scaffold.py --run /tmp/qd --steps 100 --variants plain,turns
    python bench/scaffold.py --run /tmp/qd --steps 300 --variants plain,turns --heldout bench/texts/legal.txt

Variants (fine-tuning samples; each fine-tunes the same OBS update for --steps steps of one 128-token sample,
every sample read once, so all read the same number of tokens):
* ``plain``  — the run's calibration source only (what recovery read before issue 28);
* ``turns``  — the package's recovery samples (workspace.tuning_samples: for a chat model on a source
  without chat turns, half of them its own chat turns, each window starting where a turn starts);
* ``mix``    — half the source, half random windows of the model's own text (what data `mix` reads);
* a ``-unmasked`` suffix: the same samples with the loss on every position (the chat scaffolding too).
The OBS update alone is always a row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from proxsparse_core.data.text import calibration_only, heldout_windows, special_prefix, tokenize  # noqa: E402
from proxsparse_core.inference.evaluate import EXAMPLE_PROMPTS, GenerationSettings, _encode, agreement, score  # noqa: E402
from proxsparse_core.data import selfgen  # noqa: E402
from proxsparse_core.recovery import recover as recovery  # noqa: E402
from proxsparse_core.recovery.recover import RecoveryConfig, recover  # noqa: E402
from proxsparse_core.reopen import add_base_result  # noqa: E402
from proxsparse_core.results import DENSE  # noqa: E402
from proxsparse_core.runs.folder import read_run  # noqa: E402
from proxsparse_core.workspace import Workspace  # noqa: E402

PROMPTS = EXAMPLE_PROMPTS + ["Name three primary colours.", "What is the boiling point of water at sea level?"]
SYSTEM_START = "You are a helpful AI assistant"


def recites(answer: str) -> bool:
    """The answer recites the system prompt (SmolLM2's: "You are a helpful AI assistant named SmolLM, …")."""
    return SYSTEM_START.lower() in answer.lower()


def opens_like_it(answer: str) -> bool:
    """The answer opens with the system prompt's first words ("You are …"), the milder form of the same."""
    return answer.lstrip().lower().startswith("you are")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--variants", default="plain,turns,turns-unmasked")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--answers", type=int, default=48, help="new tokens per greedy answer")
    p.add_argument("--heldout", nargs="*", default=[])
    p.add_argument("--heldout-windows", type=int, default=40)
    p.add_argument("--out", default=None, help="JSON lines, one per model")
    args = p.parse_args()
    torch.manual_seed(0)

    folder = read_run(args.run, {"device": "cpu"})
    ws = Workspace()
    ws.load(folder.cfg)
    base, _ = add_base_result(ws, folder)
    tok = ws.lm.tokenizer
    extra = {Path(f).stem: heldout_windows(tokenize(tok, Path(f).read_text()), folder.cfg.eval_ctx,
                                           args.heldout_windows, special_prefix(tok)) for f in args.heldout}
    dense_top1 = {}
    rows = []

    turns, logits = [], {}

    @torch.no_grad()
    def chat_kl(name: str) -> float:
        """Mean KL(dense ‖ model) over the positions that predict the dense model's own greedy answers to
        PROMPTS, each in the chat template — the model's chat behaviour, where the held-out text has none."""
        total, count = 0.0, 0
        with ws.lock, ws.variant(name):
            for i, ids in enumerate(turns):
                out = ws.lm.model(input_ids=ids[None], use_cache=False).logits[0].float()
                if name == DENSE:
                    logits[i] = out
                start = len(ids) - len(tok(answers_of[i], add_special_tokens=False)["input_ids"]) - 1
                t, m = torch.log_softmax(logits[i][start:-1], -1), torch.log_softmax(out[start:-1], -1)
                total += float((t.exp() * (t - m)).sum())
                count += t.shape[0]
        return total / max(count, 1)

    answers_of: list[str] = []

    def report(name: str, label: str, seconds: float = 0.0):
        ppl = {"builtin": [ws.perplexity(name), ws.agreement(name) if name != DENSE else 1.0]}
        for text, windows in extra.items():
            with ws.lock, ws.variant(name):
                s = score(ws.lm.model, windows)
            if name == DENSE:
                dense_top1[text] = s.top1
            ppl[text] = [s.ppl, agreement(s.top1, dense_top1[text])]
        gs = GenerationSettings(max_new_tokens=args.answers)
        answers = {q: ws.generate(name, q, gs) for q in PROMPTS}
        if name == DENSE:      # the chat turns the dense model answers: prompt in the template, its greedy answer
            answers_of.extend(answers.values())
            turns.extend(torch.tensor(_encode(tok, q, GenerationSettings())[0].tolist()
                                      + tok(a, add_special_tokens=False)["input_ids"]) for q, a in answers.items())
        row = {"row": label, "ppl": ppl, "chat_kl": chat_kl(name), "recites": sum(map(recites, answers.values())),
               "opens_you_are": sum(map(opens_like_it, answers.values())), "answers": answers,
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    report(DENSE, "dense")
    report(base, f"{base}, mask only")
    n = args.steps
    t0 = time.perf_counter()
    obs = recover(ws.lm, ws.data.calibration, ws.results[base], base, ws.originals, RecoveryConfig(method="obs"))
    ws.add_result(f"{base}+obs", obs.pruning)
    report(f"{base}+obs", f"{base} + OBS update", time.perf_counter() - t0)
    source, fld, _, ctx, seed = ws._data_key[:5]
    for variant in filter(None, args.variants.split(",")):
        kind, unmasked = variant.removesuffix("-unmasked"), variant.endswith("-unmasked")
        t0 = time.perf_counter()
        if kind == "plain":
            tuning = calibration_only(tok, source, n, ctx, seed, fld, ws.lm.model)
        elif kind == "turns":
            tuning = ws.tuning_samples(n, print)
        elif kind == "mix":
            tuning = torch.cat([calibration_only(tok, source, n - n // 2, ctx, seed, fld, ws.lm.model),
                                calibration_only(tok, "generated", n // 2, ctx, seed, fld, ws.lm.model)])
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        weights = selfgen.answer_weights(tuning, tok)
        left_out = 0.0 if weights is None else float((weights == 0).double().mean())
        print(f"[{variant}] {tuning.shape[0]} samples, {100 * left_out:.1f}% of positions predict chat scaffolding"
              + (" (kept in the loss)" if unmasked else " (left out of the loss)"), flush=True)
        real = recovery.answer_weights
        recovery.answer_weights = (lambda rows, t: None) if unmasked else real

        def log(ev, every=max(1, n // 5)):
            if ev.step % every == 0:
                print(f"[{variant}] {ev.line()}", flush=True)
        try:
            res = recover(ws.lm, ws.data.calibration, ws.results[f"{base}+obs"], base, ws.originals,
                          RecoveryConfig(method="finetune", steps=n, samples=n), log, tuning=tuning)
        finally:
            recovery.answer_weights = real
        name = f"{base}+{variant}"
        ws.add_result(name, res.pruning)
        report(name, f"{base} + OBS + {n} steps on {variant} ({100 * left_out:.0f}% scaffolding positions)",
               time.perf_counter() - t0)
        del ws.results[name]

    print("\n| row | " + " | ".join(rows[0]["ppl"]) + " | KL to dense on its chat answers | recites the system "
          "prompt | opens with \"You are\" |")
    print("|---|" + "---:|" * (len(rows[0]["ppl"]) + 3))
    for r in rows:
        cells = " | ".join(f"{v[0]:.2f} / {100 * v[1]:.1f}%" for v in r["ppl"].values())
        print(f"| {r['row']} | {cells} | {r['chat_kl']:.3f} | {r['recites']} of {len(PROMPTS)} | "
              f"{r['opens_you_are']} of {len(PROMPTS)} |")
    for r in rows:
        print(f"\n{r['row']}:")
        for q, a in r["answers"].items():
            print(f"- {q!r} → {a!r}")


if __name__ == "__main__":
    main()
