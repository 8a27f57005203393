"""Time a preset as a presenter runs it: the app on this machine, Chromium open on it, Start pressed,
until the run (steps, mask, verification, held-out perplexity) is finished in the page.

    python bench/demo_time.py --preset quick-demo            # as a second run: the memo as it is
    python bench/demo_time.py --preset quick-demo --cold     # a first run: an empty memo (memo.py)
    python bench/demo_time.py --preset quick-demo --record   # also write the time to bench/measured.json
    python bench/demo_time.py --cpu-autocast off             # float32 products, as on a CPU without native bf16
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxsparse_core import measured  # noqa: E402

AUTOCAST_LABEL = "bf16 products when learning on a CPU that has them"    # ui/learn_tab.py LABELS
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick-demo")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--screenshot", default="test-output/demo-time.png")
    ap.add_argument("--cold", action="store_true",
                    help="start the app with an empty memo of dense results, as on a machine's first run")
    ap.add_argument("--cpu-autocast", choices=("auto", "off"), default="auto",
                    help="the Learn tab's setting before Start: off runs the float32 path a CPU without native "
                         "bf16 runs (on one that has it, auto uses bf16 products)")
    ap.add_argument("--record", action="store_true",
                    help="write the time to bench/measured.json (learn:<preset>:cpu, or learn:<preset>:cpu-float32 "
                         "for a run on float32 products), with date, machine, command")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cold = tempfile.TemporaryDirectory(prefix="demo-time-memo-") if args.cold else None
    if cold is not None:
        env["PROXSPARSE_MEMO_DIR"] = cold.name
    runs = tempfile.TemporaryDirectory(prefix="demo-time-runs-")     # the timed run is not added to your saved runs
    app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--preset", args.preset,
                            "--runs-dir", runs.name],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            deadline = time.time() + 120
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}", timeout=5000)
                    break
                except Exception:  # noqa: BLE001 - the app is still starting
                    if time.time() > deadline:
                        raise
                    time.sleep(1)
            page.wait_for_selector("#ps-start")
            if args.cpu_autocast != "auto":
                page.get_by_text("Advanced", exact=True).click()
                page.get_by_label(AUTOCAST_LABEL, exact=True).click()
                page.get_by_role("option", name=args.cpu_autocast, exact=True).click()
                page.wait_for_function("([l, v]) => [...document.querySelectorAll('input')].some("
                                       "i => i.getAttribute('aria-label') === l && i.value === v)",
                                       arg=[AUTOCAST_LABEL, args.cpu_autocast])
                page.evaluate("() => window.scrollTo(0, 0)")
            t0 = time.perf_counter()
            page.click("#ps-start")
            page.wait_for_function("() => /finished|stopped|failed/i.test(document.querySelector('#ps-progress')"
                                   ".innerText) && document.querySelector('#ps-info').innerText.includes('perplexity')",
                                   timeout=args.timeout * 1000)
            seconds = time.perf_counter() - t0
            Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.screenshot, full_page=False)
            info = page.inner_text("#ps-info")
            print(f"{args.preset}: Start → finished with perplexity in the page: {seconds:.0f} s"
                  + (" (empty memo: a first run)" if args.cold else "")
                  + (f" (cpu_autocast {args.cpu_autocast})" if args.cpu_autocast != "auto" else ""))
            print(info[:600])
            print(split(Path(runs.name), seconds))
            browser.close()
    finally:
        app.terminate()
        app.wait(30)
        if cold is not None:
            cold.cleanup()
        runs.cleanup()
    if args.record:
        from proxsparse_core.native import cpu_has_native_bf16

        float32 = args.cpu_autocast == "off" or not cpu_has_native_bf16()    # the products the run used
        record(f"learn:{args.preset}:cpu" + ("-float32" if float32 else ""), seconds, args, float32)


def split(runs: Path, seconds: float) -> str:
    """Where the time went, from the saved run's events: the learner's steps (median parts) and the rest
    (loading, the first step's one-off costs, the mask, verification, held-out perplexity, the page)."""
    import json
    import statistics

    found = sorted(runs.glob("*/events.jsonl"))
    if not found:
        return "(no saved run to split the time by)"
    events = [json.loads(line) for line in found[-1].read_text().splitlines() if line.strip()]
    steps = [e for e in events if isinstance(e.get("step"), int) and "t_step" in e]
    if not steps:
        return "(the saved run has no step events)"
    med = {k: statistics.median(e[k] for e in steps) for k in ("t_fwd_bwd", "t_opt", "t_prox", "t_step")}
    learned = steps[-1]["elapsed"]
    return (f"split: {len(steps)} steps in {learned:.1f} s of the learner (first step {steps[0]['t_step']:.1f} s; "
            f"median step {med['t_step']:.2f} s = fwd+bwd {med['t_fwd_bwd']:.2f} + AdamW {med['t_opt']:.2f} + prox "
            f"{med['t_prox']:.2f}); the other {seconds - learned:.1f} s: start, mask, verification, perplexity, page")


def record(key: str, seconds: float, args, float32: bool) -> None:
    """Write the figure into bench/measured.json, keeping the file's format and its other figures."""
    command = (f"python bench/demo_time.py --preset {args.preset}" + (" --cold" if args.cold else "")
               + (f" --cpu-autocast {args.cpu_autocast}" if args.cpu_autocast != "auto" else ""))
    path = measured.record(key, {"seconds": round(seconds), "what": "Start to held-out perplexity in the page"
                                 + (", first run (empty memo)" if args.cold else ""),
                                 "machine": f"{os.cpu_count()} CPU cores ({measured.cpu_name()}; "
                                 + ("float32 products)" if float32 else "bf16 products)"), "command": command})
    print(f"recorded {key}: {round(seconds)} s in {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
