"""Quality benchmark: ProxSparse against the one-shot 2:4 baselines.

The bundled SmolLM2-135M and the built-in corpus; every method gets the same calibration tokens
and is scored on the same held-out windows. A "job" is one row: a baseline, or ProxSparse with
some settings on top of the base configuration.

    # dense, every baseline, ProxSparse with the quick-demo preset
    python bench/quality.py --preset quick-demo

    # a sweep at a fixed token budget (ProxSparse only), 6 processes sharing one GPU
    python bench/quality.py --device cuda --baselines '' --workers 6 \\
        --grid "lambda1=0.05,0.1,0.2 lambda2=0,0.25"

    # every row also on held-out texts of other domains (bench/texts.py), with recovery rows (two
    # recoveries of every mask: OBS + 300 fine-tuning steps, and 300 fine-tuning steps alone), and
    # each row's greedy answers to the Compare tab's example prompts
    python bench/quality.py --preset bundled-quality --heldout bench/texts/*.txt \\
        --recover both:300,finetune:300 --answers 48

Each row is scored on the built-in held-out windows and on every --heldout text (the same
windows for every row): perplexity, and the share of positions where the 2:4 model's top-1
next token equals the dense model's ("agree").

Rows go to --out (JSON lines, one per job) and a Markdown table is printed at the end, headed
by the date, the machine and the command, ready for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxsparse_core import measured  # noqa: E402
from proxsparse_core.config import RunConfig  # noqa: E402
from proxsparse_core.data.text import heldout_windows, special_prefix, tokenize  # noqa: E402
from proxsparse_core.inference.evaluate import EXAMPLE_PROMPTS, GenerationSettings, agreement, score  # noqa: E402
from proxsparse_core.recovery.recover import RecoveryConfig, recovered_name  # noqa: E402
from proxsparse_core.results import DENSE, Pruning  # noqa: E402
from proxsparse_core.workspace import Workspace  # noqa: E402

BASELINES = ["magnitude", "wanda", "sparsegpt"]   # sparsegpt also yields the mask-only row


def parse_grid(spec: str) -> list[dict]:
    """'lambda1=0.1,0.2 lr=1e-4' → the cartesian product as a list of overrides."""
    axes = []
    for part in spec.split():
        key, _, values = part.partition("=")
        kind = type(getattr(RunConfig(), key))
        axes.append([(key, kind(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def jobs_for(args) -> list[dict]:
    jobs = [{"method": DENSE}]
    jobs += [{"method": m} for m in args.baselines.split(",") if m]
    if args.grid is not None:
        jobs += [{"method": "proxsparse", **g} for g in parse_grid(args.grid)]
    elif not args.no_proxsparse:
        jobs.append({"method": "proxsparse"})
    return jobs


def _label(job: dict) -> str:
    extra = " ".join(f"{k}={v}" for k, v in job.items() if k != "method")
    return f"{job['method']} {extra}".strip()


def run_job(ws: Workspace, cfg: RunConfig, job: dict) -> list[dict]:
    """Run one job and return its row(s); the workspace forgets the result afterwards."""
    method = job["method"]
    t0 = time.perf_counter()
    if method == DENSE:
        scores = _scores(ws, DENSE)
        return [{"job": _label(job), "method": DENSE, "ppl": scores["builtin"][0], "scores": scores,
                 "seconds": 0.0, **_answers(ws, DENSE)}]
    if method != "proxsparse":
        pruning = ws.prune(method, cfg)
        seconds = time.perf_counter() - t0
        rows = _recovered(ws, method, method, job) + [_row(ws, method, _label(job), seconds)]
        if method == "sparsegpt":   # the same run's mask on W0 = prune_sparsegpt_maskonly's result
            ws.add_result("sparsegpt-maskonly", Pruning("sparsegpt-maskonly", pruning.masks))
            rows.append(_row(ws, "sparsegpt-maskonly", "sparsegpt-maskonly", seconds))
        return rows
    run_cfg = RunConfig(**{**cfg.to_dict(), **{k: v for k, v in job.items() if k != "method"}})
    name = _label(job)
    def log(ev):
        if ev.step <= 3 or ev.step % 25 == 0:
            print(f"[{name}] {ev.line()}", flush=True)
    result = ws.learn(run_cfg, log, name=name)
    seconds = result.events[-1].elapsed if result.events else 0.0
    if result.steps_done == 0:
        return [{"job": name, "method": "proxsparse", "ppl": float("nan"), "seconds": seconds,
                 "status": result.message}]
    rows = _recovered(ws, name, name, job)
    row = _row(ws, name, name, seconds)
    row.update(method="proxsparse", settings={k: v for k, v in job.items() if k != "method"},
               status=result.status, learned_share_24=result.learned_share_24,
               final_lm_loss=result.events[-1].lm_loss)
    return [row] + rows


RECOVER: list[RecoveryConfig] = []   # set from --recover
RECOVER_UNTIL = 0.0                  # --recover-until (Unix time; 0 = no deadline)
BARRIER: tuple = ()                  # --recover-barrier DIR N: wait for N processes before each recovery
ANSWERS = 0                          # new tokens per example answer (--answers; 0 = none)
GUARD = 0                            # --guard: also answer with no repeated n-gram of this length
# prompts no calibration or fine-tuning text contains (neither the app's examples nor selfgen's
# list): with --more-prompts every row answers them too, to judge answers beyond the four examples
MORE_PROMPTS = [
    "Who wrote the play Romeo and Juliet?", "What is the largest planet in the solar system?",
    "Name three primary colours.", "How many legs does a spider have?",
    "Explain in one sentence what gravity is.", "Give two reasons to drink water every day.",
    "Suggest a name for a pet goldfish.", "What is the boiling point of water at sea level?",
]
PROMPTS_ASKED = list(EXAMPLE_PROMPTS)


def loops(answer: str, n: int = 4, times: int = 3) -> bool:
    """Does the answer go round in circles: some phrase of n words (or punctuation marks) comes
    back at least `times` times? (The usual failure of a damaged model under greedy decoding.)"""
    words = re.findall(r"\w+|[^\w\s]", answer.lower())
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def parse_recover(spec: str, steps: int, lr: float, seed: int) -> list[RecoveryConfig]:
    """'both:300,finetune,both:300:lr=0.002:samples=300' → one RecoveryConfig per item (steps
    default to --recover-steps, lr to --recover-lr; any other RecoveryConfig field as name=value)."""
    out = []
    for item in filter(None, spec.split(",")):
        method, *rest = item.split(":")
        d = {"method": method, "steps": steps, "lr": lr, "seed": seed}
        for part in rest:
            key, eq, value = part.partition("=")
            if not eq:
                d["steps"] = int(part)
            else:
                d[key] = type(getattr(RecoveryConfig, key))(value)      # lr 0.002, samples 300, batch 8
        # today's defaults for what the item leaves out (from_dict alone reads a missing obs_damp as an
        # old recipe's 1 %)
        out.append(RecoveryConfig.from_dict({**asdict(RecoveryConfig()), **d}))
    return out


def _recovered(ws: Workspace, name: str, label: str, job: dict) -> list[dict]:
    """The recovery rows of result `name`, one per --recover item (none for magnitude's mask)."""
    if job["method"] == "magnitude":
        return []
    rows = []
    for rc in RECOVER:
        if BARRIER:
            wait_for_others(*BARRIER, f"{label}:{rc.method}")
        t0 = time.perf_counter()
        def log(ev, every=max(1, rc.steps // 10)):
            if ev.step % every == 0:
                print(f"[{label} recovery] {ev.line()}", flush=True)
        stop = threading.Event()      # --recover-until: a run that would outlast the deadline stops there
        timer = threading.Timer(max(0.0, RECOVER_UNTIL - time.time()), stop.set) if RECOVER_UNTIL else None
        if timer:
            timer.start()
        try:
            res = ws.recover(name, rc, log, stop)
        finally:
            if timer:
                timer.cancel()
        if res.pruning is None:
            print(f"[{label} recovery] no row: {res.status}: {res.message}", flush=True)
            continue
        steps = f", {rc.steps} steps" if rc.method != "obs" else ""
        default = RecoveryConfig(method=rc.method, steps=rc.steps, seed=rc.seed)
        steps += "".join(f", {k} {getattr(rc, k)}" for k in ("lr", "samples", "batch", "teacher", "text",
                                                                 "obs_dense", "obs_damp")
                         if getattr(rc, k) != getattr(default, k))
        row = _row(ws, recovered_name(name), f"{label} + recovery ({rc.method}{steps})", time.perf_counter() - t0)
        row["recovery"] = rc.to_dict()
        row["recovery_loss"] = res.events[-1].lm_loss if res.events else None
        row["recovery_status"] = f"{res.status}: {res.message}"
        print(f"[{label} recovery] row: {json.dumps(row)}", flush=True)     # kept in the log even if cut off later
        rows.append(row)
    return rows


def wait_for_others(folder: str, n: int, what: str) -> None:
    """--recover-barrier: say this process is ready to recover (a file in `folder`), then wait until `n`
    processes are (or the --recover-until deadline passes), so that recoveries sharing one GPU and one
    deadline start together and are cut at about the same step, whatever each did before (learning a
    mask takes longer than SparseGPT)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{os.getpid()}-{time.time_ns()}").write_text(what)
    while len(list(Path(folder).iterdir())) < n and (not RECOVER_UNTIL or time.time() < RECOVER_UNTIL):
        time.sleep(0.5)
    print(f"[{what}] recovery starts with {len(list(Path(folder).iterdir()))} of {n} processes ready", flush=True)


EXTRA: dict = {}        # held-out text name → windows (set in run_shard from --heldout)
_DENSE_TOP1: dict = {}  # held-out text name → the dense model's top-1 predictions


def _scores(ws: Workspace, name: str) -> dict:
    """{text: [perplexity, agreement with dense]} on the built-in held-out part and every extra text."""
    out = {"builtin": [ws.perplexity(name), ws.agreement(name) if name != DENSE else 1.0]}
    for text, windows in EXTRA.items():
        with ws.lock, ws.variant(name), ws.scoring_products():     # as the built-in text's score
            s = score(ws.lm.model, windows)
        if name == DENSE:
            _DENSE_TOP1[text] = s.top1
        out[text] = [s.ppl, agreement(s.top1, _DENSE_TOP1[text]) if text in _DENSE_TOP1 else float("nan")]
    return out


def _answers(ws: Workspace, name: str) -> dict:
    """{"answers": {prompt: greedy answer}} for the example prompts (with --answers), else {}."""
    if not ANSWERS:
        return {}
    s = GenerationSettings(max_new_tokens=ANSWERS)
    out = {"answers": {p: ws.generate(name, p, s) for p in PROMPTS_ASKED}}
    if GUARD:       # --guard N: the same answers with the Compare tab's loop guard
        s = GenerationSettings(max_new_tokens=ANSWERS, no_repeat_ngram=GUARD)
        out["answers_guarded"] = {p: ws.generate(name, p, s) for p in PROMPTS_ASKED}
    return out


def _row(ws: Workspace, name: str, label: str, seconds: float) -> dict:
    check = ws.verify(name)
    scores = _scores(ws, name)
    row = {"job": label, "method": ws.results[name].method, "ppl": scores["builtin"][0], "scores": scores,
           "seconds": round(seconds, 1), "verified": check.ok, **_answers(ws, name)}
    del ws.results[name]     # masks of a 135 M model are ~100 MB: keep memory flat over a sweep
    return row


def run_shard(args, base: RunConfig, jobs: list[dict]):
    import torch
    torch.manual_seed(base.seed)
    ws = Workspace()
    ws.load(base)
    prefix = special_prefix(ws.lm.tokenizer)
    for path in args.heldout:
        ids = tokenize(ws.lm.tokenizer, Path(path).read_text())
        EXTRA[Path(path).stem] = heldout_windows(ids, base.eval_ctx, args.heldout_windows, prefix)
    global RECOVER, ANSWERS, RECOVER_UNTIL, GUARD, BARRIER
    RECOVER = parse_recover(args.recover, args.recover_steps, args.recover_lr, base.seed)
    RECOVER_UNTIL = args.recover_until
    BARRIER = (args.recover_barrier[0], int(args.recover_barrier[1])) if args.recover_barrier else ()
    ANSWERS, GUARD = args.answers, args.guard
    if args.more_prompts:
        PROMPTS_ASKED.extend(MORE_PROMPTS)
    print(f"{ws.lm.describe()}\ncalibration {tuple(ws.data.calibration.shape)} from {ws.data.source}, "
          f"held-out {tuple(ws.data.held_out.shape)}; other held-out texts: "
          + ", ".join(f"{k} {tuple(v.shape)}" for k, v in EXTRA.items()), flush=True)
    _scores(ws, DENSE)                  # the dense top-1 choices every agreement is measured against
    with open(args.out, "a") as f:
        for job in jobs:
            for row in run_job(ws, base, job):
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")
                f.flush()


def run_workers(args, jobs: list[dict]) -> None:
    """Split the jobs over `--workers` copies of this script (they share the GPU well: a model
    this small leaves it mostly idle in one process)."""
    procs = []
    for i in range(args.workers):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--shard", f"{i}/{args.workers}",
               "--out", f"{args.out}.{i}"]
        log = open(f"{args.out}.{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    for p, log in procs:
        p.wait()
        log.close()
    with open(args.out, "a") as f:
        for i in range(args.workers):
            part = Path(f"{args.out}.{i}")
            if part.exists():
                f.write(part.read_text())
                part.unlink()


def machine() -> str:
    import torch

    cpu = measured.cpu_name() or "unknown CPU"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores ({cpu}){gpu}, torch {torch.__version__}"


def markdown(rows: list[dict], base: RunConfig, command: str) -> str:
    lines = [f"Date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {machine()}",
             f"Command: `{command}`",
             f"Model {base.model}, {base.dtype} on {base.device}; data {base.data}: {base.samples} calibration "
             f"samples × {base.ctx} tokens (seed {base.seed}); held-out perplexity on "
             f"{base.eval_windows or 'all'} windows × {base.eval_ctx} tokens.", "",
             "Each text column: held-out perplexity / share of positions whose top-1 next token equals "
             "the dense model's.", ""]
    texts = list(next((r["scores"] for r in rows if "scores" in r), {"builtin": None}))
    lines += ["| row | " + " | ".join(texts) + " | seconds | verified 2:4 | learned groups already 2:4 |",
              "|---|" + "---:|" * len(texts) + "---:|:-:|---:|"]
    for r in rows:
        sc = r.get("scores", {"builtin": [r["ppl"], float("nan")]})
        cells = " | ".join(f"{sc[t][0]:.2f} / {100 * sc[t][1]:.1f}%" if t in sc else "" for t in texts)
        share = f"{100 * r['learned_share_24']:.1f}%" if "learned_share_24" in r else ""
        ver = "" if r["method"] == DENSE else ("yes" if r.get("verified") else "NO")
        lines.append(f"| {r['job']} | {cells} | {r['seconds']:.0f} | {ver} | {share} |")
    for r in rows:
        if "answers" in r:
            answers = list(r["answers"].values())
            lines += ["", f"Answers of {r['job']} (greedy; {sum(map(loops, answers))} of {len(answers)} go round "
                          f"in circles, {sum(not a.strip() for a in answers)} empty):"]
            lines += [f"- {p!r} → {a!r}" for p, a in r["answers"].items()]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="base ProxSparse settings (e.g. quick-demo)")
    p.add_argument("--set", default="", help="more base settings, e.g. 'steps=120 ctx=128 samples=120'")
    p.add_argument("--grid", default=None, help="ProxSparse sweep, e.g. 'lambda1=0.05,0.1 lambda2=0,0.25'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--baselines", default=",".join(BASELINES), help="comma-separated; '' for none")
    p.add_argument("--no-proxsparse", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench/quality.jsonl")
    p.add_argument("--heldout", nargs="*", default=[], help="more held-out text files (bench/texts.py)")
    p.add_argument("--heldout-windows", type=int, default=40, help="windows per extra held-out text")
    p.add_argument("--recover", default="", help="also recover each result: obs, finetune or both, several "
                                                 "comma-separated, each optionally :STEPS and :NAME=VALUE of any "
                                                 "other recovery setting (e.g. both:300,both:300:samples=300:lr=0.002)")
    p.add_argument("--recover-steps", type=int, default=300, help="fine-tuning steps of a --recover item without :STEPS")
    p.add_argument("--answers", type=int, default=0, help="also record each row's greedy answers to the example "
                                                          "prompts, with this many new tokens")
    p.add_argument("--more-prompts", action="store_true", help="with --answers: also answer MORE_PROMPTS")
    p.add_argument("--guard", type=int, default=0, help="with --answers: also record each answer with the loop "
                   "guard (no repeated n-gram of this length, the Compare tab's Block repeats) as answers_guarded")
    p.add_argument("--recover-lr", type=float, default=RecoveryConfig.lr)
    p.add_argument("--recover-until", type=float, default=0.0, help="Unix time at which a recovery still "
                   "running is stopped (its last good weights are scored, the row says 'stopped'); for runs "
                   "on a machine lent for a limited time")
    p.add_argument("--recover-barrier", nargs=2, metavar=("DIR", "N"), default=None,
                   help="wait before each recovery until N processes given the same DIR are ready (recoveries "
                        "that share a GPU and --recover-until then start together and stop at about the same step)")
    p.add_argument("--table", nargs="*", default=None, help="print the table of rows already written (JSON-lines "
                                                             "files of --out) and stop")
    args = p.parse_args()
    if args.table is not None:
        rows = [json.loads(line) for f in args.table for line in open(f) if line.strip()]
        return print("\n".join(markdown(rows, RunConfig(), shlex.join(["python", "bench/quality.py", *sys.argv[1:]]))
                                .splitlines()[5:]))     # the rows' own runs said the date, machine and settings

    base = RunConfig(device=args.device, eval_windows=0)
    if args.preset:
        base = base.with_preset(args.preset)
    overrides = parse_grid(args.set)[0]
    base = RunConfig(**{**base.to_dict(), **overrides, "device": args.device}).validate()
    jobs = jobs_for(args)
    if args.shard:
        i, n = map(int, args.shard.split("/"))
        return run_shard(args, base, jobs[i::n])
    command = shlex.join(["python", "bench/quality.py", *sys.argv[1:]])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    start = Path(args.out).stat().st_size if Path(args.out).exists() else 0
    if args.workers > 1:
        run_workers(args, jobs)
    else:
        run_shard(args, base, jobs)
    with open(args.out) as f:
        f.seek(start)
        rows = [json.loads(line) for line in f if line.strip()]
    print(markdown(rows, base, command))


if __name__ == "__main__":
    main()
