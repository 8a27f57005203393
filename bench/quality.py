"""Quality benchmark: ProxSparse against the one-shot 2:4 baselines.

The bundled SmolLM2-135M and the built-in corpus; every method gets the same calibration tokens
and is scored on the same held-out windows. A "job" is one row: a baseline, or ProxSparse with
some settings on top of the base configuration.

    # the recorded comparison: dense, every baseline, ProxSparse with the quick-demo preset
    python bench/quality.py --preset quick-demo

    # a sweep at a fixed token budget (ProxSparse only), 6 processes sharing one GPU
    python bench/quality.py --device cuda --baselines '' --workers 6 \\
        --grid "lambda1=0.05,0.1,0.2 lambda2=0,0.25"

Rows go to --out (JSON lines, one per job) and a Markdown table is printed at the end, headed
by the date, the machine and the command, ready for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxsparse_core.config import RunConfig  # noqa: E402
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
        return [{"job": _label(job), "method": DENSE, "ppl": ws.perplexity(DENSE), "seconds": 0.0}]
    if method != "proxsparse":
        pruning = ws.prune(method, cfg)
        seconds = time.perf_counter() - t0
        rows = [_row(ws, method, _label(job), seconds)]
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
    row = _row(ws, name, name, seconds)
    row.update(method="proxsparse", settings={k: v for k, v in job.items() if k != "method"},
               status=result.status, learned_share_24=result.learned_share_24,
               final_lm_loss=result.events[-1].lm_loss)
    return [row]


def _row(ws: Workspace, name: str, label: str, seconds: float) -> dict:
    check = ws.verify(name)
    row = {"job": label, "method": ws.results[name].method, "ppl": ws.perplexity(name),
           "seconds": round(seconds, 1), "verified": check.ok}
    del ws.results[name]     # masks of a 135 M model are ~100 MB: keep memory flat over a sweep
    return row


def run_shard(args, base: RunConfig, jobs: list[dict]):
    import torch
    torch.manual_seed(base.seed)
    ws = Workspace()
    ws.load(base)
    print(f"{ws.lm.describe()}\ncalibration {tuple(ws.data.calibration.shape)}, "
          f"held-out {tuple(ws.data.held_out.shape)}", flush=True)
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
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores ({cpu}){gpu}, torch {torch.__version__}"


def markdown(rows: list[dict], base: RunConfig, command: str) -> str:
    dense = next((r["ppl"] for r in rows if r["method"] == DENSE), None)
    lines = [f"Date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {machine()}",
             f"Command: `{command}`",
             f"Model {base.model}, {base.dtype} on {base.device}; data {base.data}: {base.samples} calibration "
             f"samples × {base.ctx} tokens (seed {base.seed}); held-out perplexity on "
             f"{base.eval_windows or 'all'} windows × {base.eval_ctx} tokens.", "",
             "| row | held-out ppl | × dense | seconds | verified 2:4 | ProxSparse: learned groups already 2:4 |",
             "|---|---:|---:|---:|:-:|---:|"]
    for r in rows:
        ratio = f"{r['ppl'] / dense:.2f}" if dense else ""
        share = f"{100 * r['learned_share_24']:.1f}%" if "learned_share_24" in r else ""
        ver = "" if r["method"] == DENSE else ("yes" if r.get("verified") else "NO")
        lines.append(f"| {r['job']} | {r['ppl']:.3f} | {ratio} | {r['seconds']:.0f} | {ver} | {share} |")
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
    args = p.parse_args()

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
