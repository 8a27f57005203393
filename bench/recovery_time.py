"""Time a recovery on the CLI as a user runs it after quick-demo: `python -m proxsparse_core recover
--run BASE --method both` (standard length unless flags say otherwise) on the bundled model, wall clock
of the whole command, with the time of each stage (metrics.json `stage_seconds`), how honest its
printed "ETA … in all" was along the way, and the machine's load average while it ran.

    python bench/recovery_time.py                      # standard recovery; the chat turns written first
    python bench/recovery_time.py --warm-text          # the model's chat turns already cached (a second run)
    python bench/recovery_time.py --record             # also write recover:standard:cpu to bench/measured.json
    python bench/recovery_time.py --steps 20 --samples 40 --out /tmp/rt.json   # a short profile of the stages

BASE is made first (not timed): `prune --preset quick-demo --method magnitude` — the same calibration
samples, text and held-out windows as a quick-demo run (recovery's time does not depend on which 2:4
mask it recovers), its dense perplexity kept in the memo as after a run in the app. Both commands get an
empty memo and, unless --warm-text, an empty cache of self-written text (the bundled model and the
built C kernels are linked from the usual cache), as on a machine's first recovery.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxsparse_core import measured  # noqa: E402

ETA = re.compile(r"ETA (?:(\d+):)?(\d+):(\d\d) in all")


def seconds_of(m: re.Match) -> int:
    h, mnt, s = m.groups()
    return 3600 * int(h or 0) + 60 * int(mnt) + int(s)


def isolated_cache(tmp: Path, warm_text: bool) -> Path:
    """A cache folder with the usual converted model and built kernels, and (unless warm_text) no
    self-written text."""
    from proxsparse_core.paths import cache_dir

    real, cache = cache_dir(), tmp / "cache"
    cache.mkdir()
    for entry in real.iterdir() if real.is_dir() else []:
        if entry.name == "memo" or (entry.name == "selfgen" and not warm_text):
            continue
        (cache / entry.name).symlink_to(entry)
    return cache


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", default="standard")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--samples", type=int)
    ap.add_argument("--warm-text", action="store_true", help="keep the cache of self-written text (chat turns)")
    ap.add_argument("--record", action="store_true",
                    help="write the time to bench/measured.json (recover:<length>:cpu) with date, machine, command")
    ap.add_argument("--out", help="also write the figures as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the base and recovered run folders (≈ 0.4 GB)")
    args = ap.parse_args()
    if args.record and (args.steps or args.samples):
        sys.exit("--record times a named length as it is: no --steps or --samples")

    tmp = Path(tempfile.mkdtemp(prefix="recovery-time-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PROXSPARSE_MEMO_DIR": str(tmp / "memo"),
           "PROXSPARSE_CACHE": str(isolated_cache(tmp, args.warm_text))}
    py = [sys.executable, "-m", "proxsparse_core"]
    base, out = tmp / "base", tmp / "recovered"
    subprocess.run(py + ["prune", "--preset", "quick-demo", "--method", "magnitude", "--out", str(base)],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    command = ["recover", "--run", str(base), "--method", "both", "--length", args.length, "--out", str(out)]
    command += [f for k in ("steps", "samples") if getattr(args, k) for f in (f"--{k}", str(getattr(args, k)))]

    loads, done = [os.getloadavg()[0]], threading.Event()

    def watch_load():
        while not done.wait(15):
            loads.append(os.getloadavg()[0])
    threading.Thread(target=watch_load, daemon=True).start()
    lines, etas = [], []            # (seconds since start, text); (seconds since start, ETA in all)
    t0 = time.perf_counter()
    proc = subprocess.Popen(py + command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    for line in proc.stdout:
        t = time.perf_counter() - t0
        lines.append((t, line.rstrip()))
        m = ETA.search(line)
        if m:
            etas.append((t, seconds_of(m)))
        if not re.match(r"\[[#.]+\] step \d+/", line) or "step 1/" in line or line.count("#") % 6 == 0:
            print(f"{t:7.1f}s {line.rstrip()[:220]}", flush=True)
    rc = proc.wait()
    total = time.perf_counter() - t0
    done.set()
    loads.append(os.getloadavg()[0])
    if rc != 0:
        sys.exit(f"recover failed (exit {rc})")
    metrics = json.loads((out / "metrics.json").read_text())
    stages, work = metrics.get("stage_seconds", {}), metrics.get("stage_work", {})
    before = round(next((t for t, text in lines if text.startswith("[")), 0.0), 1)
    # how honest the "ETA … in all" was: printed against the time that was really left, once 10 % in
    ratios = [eta / (total - t) for t, eta in etas if t >= 0.1 * total and total - t >= 30]
    result = {
        "command": "python -m proxsparse_core " + " ".join(command).replace(str(tmp), "$TMP"),
        "seconds": round(total, 1), "stage_seconds": stages,
        "before_first_stage_s": before,      # interpreter, model load, base result: before the first stage
        "seconds_per_gmac": {k: round(stages[k] / (work[k] / 1e9), 4) for k in stages if work.get(k)},
        "eta_in_all_over_actual": {"first_at_s": round(etas[0][0], 1) if etas else None,
                                   "first_s": etas[0][1] if etas else None,
                                   "min_after_10pct": round(min(ratios), 2) if ratios else None,
                                   "max_after_10pct": round(max(ratios), 2) if ratios else None},
        "load_average": {"min": round(min(loads), 2), "max": round(max(loads), 2),
                         "mean": round(sum(loads) / len(loads), 2)},
        "cpu": f"{os.cpu_count()} cores, {measured.cpu_name()}", "chat_turns_cached_before": args.warm_text,
        "perplexity": metrics.get("perplexity"), "date": datetime.datetime.now(datetime.timezone.utc)
        .strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.record:
        record(f"recover:{args.length}:cpu", result, args)
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def record(key: str, result: dict, args) -> None:
    """Write the figure into bench/measured.json, keeping the file's format and its other figures."""
    load = result["load_average"]
    shared = load["max"] >= 0.5
    machine = f"{os.cpu_count()} CPU cores" + (f", shared (load average {load['min']:.1f}–{load['max']:.1f})"
                                               if shared else "")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["stage_seconds"].items())
    path = measured.record(key, {
        "seconds": round(result["seconds"]),
        "what": f"the whole recover command after quick-demo (model load, the model's chat turns written "
                f"{'before: cached' if args.warm_text else 'first, as on a first use'}, OBS update, teacher, "
                f"fine-tuning, held-out perplexity); by stage: {stages}",
        "date": result["date"][:10], "machine": machine,
        **({"note_seconds": round(result["stage_seconds"]["chat-turns"]),
            "note": "the model writing its chat turns, the first time only (cached after)"}
           if not args.warm_text and result["stage_seconds"].get("chat-turns") else {}),
        "command": "python bench/recovery_time.py" + (" --warm-text" if args.warm_text else "")
                   + f" ({result['command']})"})
    print(f"recorded {key}: {round(result['seconds'])} s in {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
