"""Headless ProxSparse: the same configuration as the app, from a shell.

    python -m proxsparse_core learn --preset quick-demo --out runs/demo
    python -m proxsparse_core prune --method wanda --out runs/wanda
    python -m proxsparse_core eval --masks runs/demo --prompt "What is the capital of France?"
    python -m proxsparse_core recover --run runs/demo --method both --out runs/demo-recovered
    python -m proxsparse_core export --run runs/demo --out exports/demo
    python -m proxsparse_core presets
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

from proxsparse_core.config import PRESETS, PRUNE_SETTINGS, RunConfig, preset_note, reproduce_command
from proxsparse_core.errors import Stopped, UserError
from proxsparse_core.models.loading import allow_remote_code, remote_code_allowed

EXIT_USAGE = 2
TRACEBACK_ENV = "PROXSPARSE_TRACEBACK"   # =1: an unforeseen failure shows its traceback


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit code 2, as for every bad input
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def _help(text) -> str:
    """argparse formats help with %: a literal % (as in "~30% slower") must be written %%."""
    return str(text).replace("%", "%%")


def _add_config_flags(p: argparse.ArgumentParser, only: set[str] | None = None):
    for f in fields(RunConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS,
                           help=_help(f.metadata["help"]))
        else:
            p.add_argument(flag, type=type(default), default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
                           metavar=f.name.upper(), help=_help(f"{f.metadata['help']} (default: {default})"))


REMOTE_CODE_FROM_RECIPE = ("the recipe sets trust_remote_code: true, which runs the model's own Python "
                           "code; pass --trust-remote-code on the command line to allow it (only for "
                           "authors you trust)")


def _remote_code_flag(args: argparse.Namespace) -> bool:
    """--trust-remote-code typed on the command line is the one decision that opens the gate."""
    if getattr(args, "trust_remote_code", False) is True:
        allow_remote_code(True)
        return True
    return False


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    flag = _remote_code_flag(args)
    cfg = base or RunConfig()
    if getattr(args, "recipe", None):
        from proxsparse_core.runs.files import load_recipe
        cfg = load_recipe(args.recipe)
    if getattr(args, "preset", None):
        cfg = cfg.with_preset(args.preset)
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    cfg = RunConfig(**{**cfg.to_dict(), **given}).validate()
    if cfg.trust_remote_code and not flag:
        raise UserError(REMOTE_CODE_FROM_RECIPE)
    return cfg


def _bar(done: int, total: int, width: int = 24) -> str:
    k = int(width * done / max(total, 1))
    return "[" + "#" * k + "." * (width - k) + "]"


@contextlib.contextmanager
def _run_folder(path: str | None, overwrite: bool):
    """The run folder, created and proven writable (a probe file is written and removed) before
    the slow model load. If the run ends without saving anything, the folders it created go again."""
    out = Path(path) if path else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise UserError(f"output folder {str(out)!r} exists and is not empty; "
                            f"pick another --out or pass --overwrite")
        top = out                      # the outermost folder this run creates
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".proxsparse-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {str(out)!r} ({exc.strerror or exc}); "
                        f"pick another --out") from exc
    try:
        yield out
    finally:
        if created:
            _remove_if_empty(out, top)


def _remove_if_empty(folder: Path, top: Path):
    for d in [folder, *folder.parents]:
        try:
            d.rmdir()                  # only succeeds on an empty folder
        except OSError:
            return
        if d == top:
            return


def _print_compare(ws, names, args):
    from proxsparse_core.inference.evaluate import GenerationSettings
    s = GenerationSettings(max_new_tokens=args.max_new_tokens, no_repeat_ngram=args.no_repeat_ngram)
    told = False

    def measuring(done: int, total: int):       # on a GPU, before the first 2:4 answer: once per layer shape
        print(f"measuring the 2:4 kernels on this GPU: {done} of {total} layer shapes", file=sys.stderr)
    for n in names:
        text = ws.generate(n, args.prompt, s, measuring)
        if s.notes and not told:       # e.g. the chat template failed: said once, on stderr
            print(f"note: {s.notes[0]}", file=sys.stderr)
            told = True
        print(f"--- {n}: {text!r}")


def _add_generation_flags(p: argparse.ArgumentParser):
    from proxsparse_core.inference.evaluate import GenerationSettings

    def checked(name: str):
        def read(text: str) -> int:       # checked when the flags are read, before a model loads
            try:
                return getattr(GenerationSettings(**{name: int(text)}).validate(), name)
            except (ValueError, UserError) as exc:
                raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, UserError) else
                                                 f"not a whole number: {text!r}") from None
        return read
    lo, hi = GenerationSettings.LIMITS["max_new_tokens"]
    p.add_argument("--max-new-tokens", type=checked("max_new_tokens"), default=48, metavar="N",
                   help=f"tokens each answer may add ({lo} to {hi})")
    p.add_argument("--no-repeat-ngram", type=checked("no_repeat_ngram"), default=0, metavar="N",
                   help=_help(GenerationSettings.HELP["no_repeat_ngram"]))


def _load(cfg, uses_data: bool = True):
    from proxsparse_core.workspace import Workspace

    ws = Workspace()
    print(f"loading {cfg.model} …", flush=True)
    lm = ws.load(cfg)
    print(lm.describe())
    calibration = f"{ws.data.calibration.shape[0]} calibration samples × {cfg.ctx} tokens, " if uses_data else ""
    print(f"data: {ws.data.source}: {calibration}"
          f"{ws.data.held_out.shape[0]} held-out windows × {cfg.eval_ctx} tokens", flush=True)
    return ws


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _abort(signum, frame):
    """A second Ctrl-C or SIGTERM (or a SIGTERM outside a stoppable step): abort as Ctrl-C does."""
    raise KeyboardInterrupt


def _handle_signals(handler, signals=STOP_SIGNALS):
    """Install `handler` for `signals`; returns what puts the previous handlers back. Only the main
    thread can install handlers: elsewhere nothing changes."""
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:                 # not the main thread
        pass

    def restore():
        for sig, old in previous.items():
            signal.signal(sig, old)
    return restore


@contextlib.contextmanager
def _stop_on_ctrl_c(unit: str, message: str | None = None):
    """Ctrl-C or SIGTERM (a `kill`, a job scheduler, a closing terminal service) sets the yielded
    Event: the work stops after the current `unit`, and what finished is saved. A second one of
    either aborts (KeyboardInterrupt)."""
    stop = threading.Event()

    def on_signal(signum, frame):
        said = message or f"stopping after this {unit} … (Ctrl-C again to abort)"
        print(("\n" if signum == signal.SIGINT else "\nterminate signal (SIGTERM): ") + said, flush=True)
        stop.set()
        for sig in STOP_SIGNALS:
            signal.signal(sig, _abort)
    restore = _handle_signals(on_signal)
    try:
        yield stop
    finally:
        restore()


def _recipe_run_folder(recipe) -> Path | None:
    """The run folder a --recipe reads: the folder given, or the folder of a recipe.json that sits
    next to a masks.npz; None for a recipe file on its own."""
    from proxsparse_core.runs.files import MASKS_FILE

    path = Path(recipe).expanduser()
    if path.is_dir():
        return path
    return path.parent if os.path.lexists(path.parent / MASKS_FILE) else None


def _out_apart_from_recipe(args) -> None:
    """--out must not be, or lie inside, the run folder whose recipe is read (before any load)."""
    from proxsparse_core.runs.folder import check_out_apart

    folder = _recipe_run_folder(args.recipe) if getattr(args, "recipe", None) else None
    if folder is not None:
        check_out_apart(folder, args.out)


INCOMPLETE = "verification, evaluation and generation had not finished when this file was written"


def _finish(ws, args, out: Path, name: str, metrics: dict, uses_data: bool = True) -> int:
    """Verify, evaluate and compare the result `name`. masks.npz and recipe.json are already
    saved; metrics.json says "complete": false until everything here has finished, and a Ctrl-C
    leaves it that way with the reason (exit code 130)."""
    from proxsparse_core.runs.files import save_json
    from proxsparse_core.results import DENSE

    metrics.update({"complete": False, "incomplete": INCOMPLETE, "model": ws.lm.describe(),
                    "data": ws.data.source if uses_data else None,
                    "calibration_tokens": int(ws.data.calibration.numel()) if uses_data else 0,
                    "held_out_tokens": int(ws.data.held_out.numel())})
    save_json(out / "metrics.json", metrics)
    try:
        check = ws.verify(name)
        print(check)
        metrics.update({"verification": str(check), "verified": check.ok})
        if not args.no_eval:
            metrics["perplexity"] = {DENSE: ws.perplexity(DENSE), name: ws.perplexity(name)}
            metrics["perplexity_products"] = "bfloat16" if ws.scoring == "bf16" else "model dtype"
            print("held-out perplexity: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics["perplexity"].items()))
        if args.prompt:
            _print_compare(ws, [DENSE, name], args)
    except KeyboardInterrupt:
        metrics["incomplete"] = ("interrupted (Ctrl-C) during verification, evaluation or generation; "
                                 "masks.npz and recipe.json are complete")
        save_json(out / "metrics.json", metrics)
        print(f"interrupted: the mask was saved in {out / 'masks.npz'}; metrics.json is marked incomplete",
              file=sys.stderr)
        return 130
    metrics["complete"] = True
    del metrics["incomplete"]
    save_json(out / "metrics.json", metrics)
    print(f"wrote {out}/: " + " ".join(sorted(p.name for p in out.iterdir())))
    return 0 if check.ok else 1


def cmd_learn(args) -> int:
    from proxsparse_core.runs.files import save_events, save_json, save_masks, save_recipe
    from proxsparse_core.results import LEARNED

    _out_apart_from_recipe(args)
    cfg = config_from_args(args)
    with _run_folder(args.out, args.overwrite) as out:
        ws = _load(cfg)
        print(f"λ1={cfg.lambda1} (not scaled by lr)  λ2={cfg.lambda2}  ε={cfg.eps}  lr={cfg.lr}  "
              f"steps={cfg.steps}  batch={cfg.batch}  seed={cfg.seed}", flush=True)

        def on_event(ev):
            print(f"{_bar(ev.step, ev.total_steps)} {ev.line()}", flush=True)
        with _stop_on_ctrl_c("step") as stop:
            result = ws.learn(cfg, on_event, stop)
        print(result.message)
        metrics = {"method": LEARNED, "status": result.status, "message": result.message,
                   "steps": result.steps_done, "learned_share_24": result.learned_share_24,
                   "master_weights": result.master_weights, "autocast": result.autocast}
        if result.steps_done == 0:
            save_events(out / "events.jsonl", result.events)
            save_json(out / "metrics.json", {**metrics, "complete": False, "incomplete": "no step finished: no mask"})
            print("no step finished: no mask to save", file=sys.stderr)
            return 1
        # the mask first: whatever happens during verification and evaluation, it is kept
        save_masks(out / "masks.npz", result.masks)
        save_recipe(out, cfg)
        save_events(out / "events.jsonl", result.events)
        return _finish(ws, args, out, LEARNED, metrics)


def cmd_prune(args) -> int:
    from proxsparse_core.runs.files import save_masks, save_recipe
    from proxsparse_core.baselines.oneshot import METHODS

    _out_apart_from_recipe(args)
    cfg = config_from_args(args)
    method = args.method
    uses_data = METHODS[method].uses_data
    with _run_folder(args.out, args.overwrite) as out:
        ws = _load(cfg, uses_data)
        print(f"{method}: " + (f"{ws.data.calibration.shape[0]} calibration samples" if uses_data else
                               f"no calibration data ({method} uses none)"), flush=True)
        try:
            with _stop_on_ctrl_c("block") as stop:
                result = ws.prune(method, cfg, lambda d, t: print(f"{_bar(d, t)} {d}/{t}", flush=True), stop)
        except Stopped:
            print("stopped by the user: nothing was saved", file=sys.stderr)
            return 1
        updates = result.weights is not None
        command = reproduce_command(cfg, method)
        note = ("SparseGPT also updated the kept weights; masks.npz holds only the mask (applied to the "
                "original weights it is the sparsegpt-maskonly model). The updated weights are "
                f"deterministic given this recipe: rerun `{command}` to get them.") if updates else \
            "the pruned model is the original weights times masks.npz"
        save_masks(out / "masks.npz", result.masks)
        save_recipe(out, cfg, method=method, extra={"updates_weights": updates, "weights": note})
        return _finish(ws, args, out, method, {"method": method, "seconds": result.info["seconds"],
                                               "updates_weights": updates, "weights": note}, uses_data)


def cmd_eval(args) -> int:
    """Evaluate the dense model and, with --masks, the result a run folder holds — the very result
    `export --run` exports (W0 · mask, SparseGPT's updated weights rebuilt, a recover folder's
    recovered weights) — or W0 · mask of a bare masks.npz file."""
    from proxsparse_core.runs.files import RECIPE_FILE, load_masks
    from proxsparse_core.sparsity.masks import check_masks_match, layer_shapes
    from proxsparse_core.reopen import add_run_result
    from proxsparse_core.runs.folder import read_run
    from proxsparse_core.results import DENSE, Pruning
    from proxsparse_core.workspace import Workspace

    folder = None
    if args.masks and Path(args.masks).is_dir() and os.path.lexists(Path(args.masks) / RECIPE_FILE):
        folder = read_run(args.masks)          # every file checked before any model loads
    cfg = config_from_args(args, base=folder.cfg if folder is not None and not args.recipe else None)
    ws = Workspace()
    names = [DENSE]
    if folder is not None:
        if folder.rebuilds_weights:            # its weights are rebuilt on the run's own calibration samples
            keep = ("model", "device", "dtype", "trust_remote_code", "device_map", "max_memory")
            ws.load(RunConfig(**{**folder.cfg.to_dict(), **{k: getattr(cfg, k) for k in keep}}).validate())
        lm = ws.load(cfg)
        print(lm.describe())
        with _stop_on_ctrl_c("block") as stop:
            name, note = add_run_result(
                ws, folder, lambda d, t: print(f"{_bar(d, t)} rebuilding the weights: block {d}/{t}", flush=True), stop)
        ws.add_result("pruned", ws.results.pop(name))
        print(f"evaluating {name} from {str(folder.path)!r}: {note}")
        names.append("pruned")
        print(ws.verify("pruned"))
    else:
        lm = ws.load(cfg)
        print(lm.describe())
        if args.masks:
            masks = load_masks(args.masks, layer_shapes(lm.prunable))
            check_masks_match(lm.prunable, masks)
            ws.add_result("pruned", Pruning("masks", masks))
            bare = "a mask file" if not Path(args.masks).is_dir() else "a folder without recipe.json"
            print(f"evaluating the original weights × the mask of {str(args.masks)!r} ({bare}: weights a method "
                  f"updated, like SparseGPT's, are not in it; give its run folder to evaluate those)")
            names.append("pruned")
            print(ws.verify("pruned"))
    result = {}
    if not args.no_eval:
        for n in names:
            result[n] = ws.perplexity(n)
        print("held-out perplexity: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()))
    if args.prompt:
        _print_compare(ws, names, args)
    if args.json:
        print(json.dumps({"perplexity": result}))
    return 0


def cmd_export(args) -> int:
    from proxsparse_core.reopen import export_run
    from proxsparse_core.workspace import Workspace

    _remote_code_flag(args)
    overrides = {k: getattr(args, k) for k in ("device", "dtype", "trust_remote_code") if hasattr(args, k)}
    with _stop_on_ctrl_c("export", "stopping the export … (nothing will be left half-written)") as stop:
        res = export_run(args.run, args.out, Workspace(), overwrite=args.overwrite, evaluate=not args.no_eval,
                         overrides=overrides, stop=stop, progress=lambda t: print(t, flush=True))
    print(res.summary())
    ppl = res.metrics.get("perplexity") or {}
    if ppl:
        print("held-out perplexity: " + "  ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    return 0 if res.metrics["verified"] else 1


def cmd_recover(args) -> int:
    """Recover the surviving weights of a learn/prune run folder; write a run folder of its own."""
    from proxsparse_core.runs.folder import WEIGHTS_FILE, check_out_apart, read_run
    from proxsparse_core.recovery.recover import RECOVERY_LENGTHS, RecoveryConfig

    settings = dict(RECOVERY_LENGTHS[args.length]) if args.length else {}
    settings.update({k: getattr(args, k) for k in ("steps", "lr", "batch", "seed", "samples", "teacher", "text",
                                                   "obs_dense", "obs_damp") if getattr(args, k) is not None})
    rcfg = RecoveryConfig(method=args.method, **settings).validate()
    overrides = {k: getattr(args, k) for k in ("device", "dtype") if hasattr(args, k)}
    check_out_apart(args.run, args.out)
    folder = read_run(args.run, overrides)
    if folder.recovered:
        raise UserError(f"{args.run!r} is already a recover run (it holds {WEIGHTS_FILE}); recover its "
                        f"base run instead")
    with _run_folder(args.out, args.overwrite) as out:
        return _recover_into(args, folder, rcfg, out)


def _recover_into(args, folder, rcfg, out: Path) -> int:
    from proxsparse_core.baselines.sparsegpt import DAMP
    from proxsparse_core.runs.files import save_events, save_json, save_masks
    from proxsparse_core.reopen import add_base_result
    from proxsparse_core.runs.folder import WEIGHTS_FILE, recover_command, save_weights
    from proxsparse_core.recovery.recover import recovered_name
    from proxsparse_core.progress import eta_text
    from proxsparse_core.results import DENSE

    ws = _load(folder.cfg)

    def on_block(done, total):             # the base's own rebuild (a sparsegpt folder), before recovery
        print(f"{_bar(done, total)} weight update (OBS): block {done}/{total}", flush=True)
    last = {}

    def on_event(ev):                      # printed with its ETAs once the timeline has heard of the step
        last["event"] = ev

    def tell(p):
        ev = last.get("event")
        text = ev.line() if p.stage == "finetune" and ev is not None and ev.step == p.done else p.message
        eta = eta_text(p)
        print(f"{_bar(p.done, p.total) + ' ' if p.total > 0 else ''}{text}{'  · ' + eta if eta else ''}", flush=True)
    with _stop_on_ctrl_c("step") as stop:
        try:
            base, note = add_base_result(ws, folder, on_block, stop)
        except Stopped:
            print("stopped by the user: nothing was saved", file=sys.stderr)
            return 1
        print(note)
        if base == "sparsegpt" and rcfg.method == "obs" and rcfg.obs_damp == DAMP and rcfg.obs_dense == 0:
            print("note: SparseGPT's weights already are the OBS update with its mask, so --method obs "
                  f"--obs-damp {DAMP} gives them back unchanged; finetune or both change them")
        samples = rcfg.samples or "the run's own"
        print(f"recovering {base} with {rcfg.method}: steps={rcfg.steps} lr={rcfg.lr} (relative to each "
              f"layer's rms(W0)) batch={rcfg.batch} seed={rcfg.seed} samples={samples} teacher={rcfg.teacher} "
              f"text={rcfg.text}", flush=True)
        name = recovered_name(base)
        timeline = ws.recovery_timeline(base, rcfg, tell, () if args.no_eval else (DENSE, base, name))
        result = ws.recover(base, rcfg, on_event, stop, timeline=timeline)
    print(result.message)
    if result.pruning is None:
        print("nothing was recovered: nothing was saved", file=sys.stderr)
        return 1
    # the weights first: whatever happens during verification and evaluation, they are kept
    save_masks(out / "masks.npz", result.pruning.masks)
    save_weights(out / WEIGHTS_FILE, result.pruning.weights, {"base_method": base, "method": name})
    save_events(out / "events.jsonl", result.events)
    save_json(out / "recipe.json", {
        **folder.recipe, "method": name, "base_method": base, "base_run": str(folder.path),
        "base_command": folder.recipe.get("command"), "recovery": rcfg.to_dict(),
        "command": recover_command(folder.path, rcfg.to_dict(), out),
        "weights": f"{WEIGHTS_FILE} holds the prunable layers' weights after recovery; masks.npz gives "
                   f"the 2:4 pattern (the weights are not the original weights × mask)"})
    info = result.pruning.info
    metrics = {"method": name, "base_method": base, "base_weights": note,
               **{k: info[k] for k in ("obs", "finetune_steps", "finetune_samples", "scaffolding_left_out", "status",
                                       "message", "seconds")
                  if k in info}}
    return _finish_recovery(ws, args, out, base, name, metrics, timeline)


def _finish_recovery(ws, args, out: Path, base: str, name: str, metrics: dict, timeline=None) -> int:
    """Verify and evaluate a recovered result next to dense and its base (the evaluation reports through
    `timeline`, the recovery's: its ETA counted it from the start); write metrics.json, with the seconds
    each stage took."""
    from proxsparse_core.runs.files import save_json
    from proxsparse_core.results import DENSE

    check = ws.verify(name)
    print(check)
    metrics.update({"verification": str(check), "verified": check.ok, "model": ws.lm.describe(),
                    "data": ws.data.source, "calibration_tokens": int(ws.data.calibration.numel()),
                    "held_out_tokens": int(ws.data.held_out.numel())})
    if not args.no_eval:
        metrics["perplexity"] = ws.score_recovery((DENSE, base, name), timeline)
        metrics["perplexity_products"] = "bfloat16" if ws.scoring == "bf16" else "model dtype"
        metrics["top1_agreement"] = {n: ws.agreement(n) for n in (base, name)}
        print("held-out perplexity: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics["perplexity"].items()))
        print("same top-1 next token as dense: " + "  ".join(f"{k} {100 * v:.1f}%"
                                                            for k, v in metrics["top1_agreement"].items()))
    if timeline is not None:
        timeline.finish()
        metrics["stage_seconds"] = timeline.seconds()
        metrics["stage_work"] = {k: timeline.plan[k][0] * timeline.plan[k][1] for k in metrics["stage_seconds"]}
        print("time by stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in metrics["stage_seconds"].items())
              + f" (total {sum(metrics['stage_seconds'].values()):.1f} s)")
    if args.prompt:
        _print_compare(ws, [DENSE, base, name], args)
    save_json(out / "metrics.json", metrics)
    print(f"wrote {out}/: " + " ".join(sorted(p.name for p in out.iterdir())))
    return 0 if check.ok else 1


def cmd_presets(args) -> int:
    for name, p in PRESETS.items():
        s = p["settings"]
        print(f"{name:18s} {s.get('model', '(any model)'):36s} λ1={s['lambda1']:<5} λ2={s.get('lambda2', 0):<5} "
              f"lr={s['lr']:<7} steps={s['steps']:<4} ctx={s['ctx']:<5} {preset_note(name)}")
    return 0


def _add_output_flags(p: argparse.ArgumentParser):
    """What learn and prune share: where the run folder goes and what to evaluate at the end."""
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<time>)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out folder")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--prompt", help="also compare dense and pruned generations for this prompt")
    _add_generation_flags(p)


def _learn_parser(sub):
    """learn: settings from flags, a preset and a recipe; the run folder."""
    learn = sub.add_parser("learn", help="learn a 2:4 mask with ProxSparse",
                           description="Learn a 2:4 mask. Flags override the preset, which overrides "
                                       "the recipe, which overrides the defaults.")
    learn.add_argument("--preset", choices=None, metavar="NAME",
                       help=f"published or demo settings: {', '.join(PRESETS)}")
    learn.add_argument("--recipe", metavar="PATH", help="recipe.json (or its run folder) to reproduce")
    _add_config_flags(learn)
    _add_output_flags(learn)
    learn.set_defaults(func=cmd_learn)


def _prune_parser(sub):
    """prune: a one-shot method on the same calibration samples as learn."""
    from proxsparse_core.baselines.oneshot import METHODS
    pru = sub.add_parser("prune", help="a one-shot 2:4 baseline: magnitude, wanda, sparsegpt(-maskonly)",
                         description="Prune with a one-shot method on the same calibration samples as "
                                     "learn and write the same artefacts (masks.npz, recipe.json, metrics.json).")
    pru.add_argument("--method", required=True, choices=list(METHODS))
    pru.add_argument("--recipe", metavar="PATH", help="take model and data settings from a recipe")
    pru.add_argument("--preset", metavar="NAME", help=argparse.SUPPRESS)
    _add_config_flags(pru, PRUNE_SETTINGS)
    _add_output_flags(pru)
    pru.set_defaults(func=cmd_prune)


def _eval_parser(sub):
    """eval: perplexity and generation of the dense model or a run's result."""
    ev = sub.add_parser("eval", help="perplexity and generation of a dense or pruned model")
    ev.add_argument("--masks", metavar="PATH", help="a run folder or masks.npz to apply to the model")
    ev.add_argument("--recipe", metavar="PATH", help="take model and data settings from a recipe")
    ev.add_argument("--preset", metavar="NAME", help=argparse.SUPPRESS)
    _add_config_flags(ev, {"model", "device", "dtype", "trust_remote_code", "device_map", "max_memory", "data",
                           "data_field", "eval_ctx", "eval_windows", "seed"})
    ev.add_argument("--prompt", help="generate from this prompt with each model (greedy)")
    _add_generation_flags(ev)
    ev.add_argument("--no-eval", action="store_true", help="skip perplexity")
    ev.add_argument("--json", action="store_true", help="print the perplexities as JSON too")
    ev.set_defaults(func=cmd_eval)


def _export_parser(sub):
    """export: a run folder as a Hugging Face model folder."""
    exp = sub.add_parser("export", help="export a run as a Hugging Face folder with masks, recipe and report",
                         description="Write the 2:4-pruned model (safetensors, config, tokenizer), a model "
                                     "card, and proxsparse/ (masks.npz, recipe.json, report.html, plots) "
                                     "to a new folder, atomically.")
    exp.add_argument("--run", required=True, metavar="RUN_FOLDER", help="a run folder written by learn")
    exp.add_argument("--out", required=True, metavar="DIR", help="the export folder to create")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    exp.add_argument("--no-eval", action="store_true", help="skip the perplexity table")
    _add_config_flags(exp, {"device", "dtype", "trust_remote_code"})
    exp.set_defaults(func=cmd_export)


def _recover_parser(sub):
    """recover: the survivors of a run updated with its mask fixed."""
    from proxsparse_core.recovery.recover import RECOVERY_LENGTHS, RECOVERY_METHODS, TEACHERS, RecoveryConfig

    def _passes(length):                  # samples fine-tuning reads in all, e.g. 1,000 steps × 8
        return RECOVERY_LENGTHS[length]["steps"] * RECOVERY_LENGTHS[length]["batch"]
    rec = sub.add_parser("recover", help="recover the surviving weights of a 2:4 run (mask fixed)",
                         description="Update the surviving weights of a learn or prune run folder with its "
                                     "mask held fixed: obs (the optimal-brain-surgeon update layer by layer), "
                                     "finetune (masked fine-tuning by distillation from the dense model) or "
                                     "both. Writes masks.npz, weights.safetensors, recipe.json, events.jsonl "
                                     "and metrics.json; `export --run` on that folder exports the recovered model.")
    rec.add_argument("--run", required=True, metavar="RUN_FOLDER", help="a run folder written by learn or prune")
    rec.add_argument("--method", required=True, choices=RECOVERY_METHODS, help=RecoveryConfig.HELP["method"])
    rec.add_argument("--length", choices=list(RECOVERY_LENGTHS), default=None,
                     help="sets --steps, --samples, --batch, --lr, --teacher and --text together: " + "; ".join(
                         f"{k}: " + ", ".join(f"{n} {v}" for n, v in d.items()) for k, d in RECOVERY_LENGTHS.items())
                     + f" (long and deep are for a GPU: long makes {round(_passes('long') / _passes('standard'))}x "
                       f"the sample passes of standard, deep {round(_passes('deep') / _passes('standard'))}x with "
                       "the live teacher and fresh text); a flag given too wins")
    for flag, kind in (("steps", int), ("lr", float), ("batch", int), ("seed", int), ("samples", int),
                       ("text", int), ("obs_dense", float), ("obs_damp", float)):
        rec.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None, metavar=flag.upper(),
                         help=f"{RecoveryConfig.HELP[flag]} (default: {getattr(RecoveryConfig, flag)})")
    rec.add_argument("--teacher", choices=TEACHERS, default=None,
                     help=f"{RecoveryConfig.HELP['teacher']} (default: {RecoveryConfig.teacher})")
    _add_config_flags(rec, {"device", "dtype"})
    _add_output_flags(rec)
    rec.set_defaults(func=cmd_recover)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m proxsparse_core",
                description="Learn 2:4 semi-structured sparsity masks for causal LMs (ProxSparse).")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for add in (_learn_parser, _prune_parser, _eval_parser, _export_parser, _recover_parser):
        add(sub)
    pr = sub.add_parser("presets", help="list the presets")
    pr.set_defaults(func=cmd_presets)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    gate = remote_code_allowed()
    # SIGTERM outside a stoppable step aborts as Ctrl-C does: the cleanups run (an empty run folder goes)
    restore = _handle_signals(_abort, (signal.SIGTERM,))
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _unforeseen(args, exc)
        print(f"error: the disk is full ({exc.filename or 'writing a run file'}); free some space and run "
              f"the command again", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a failure nobody foresaw is one line too (the traceback on request)
        return _unforeseen(args, exc)
    finally:
        restore()
        allow_remote_code(gate)         # a --trust-remote-code flag lasts for its own command only


def _unforeseen(args, exc: Exception) -> int:
    """A failure no check foresaw (a model the studio does not handle, a file it cannot write): one
    line, exit status 1; with PROXSPARSE_TRACEBACK=1 the exception itself, traceback and all."""
    if os.environ.get(TRACEBACK_ENV) == "1":
        raise exc
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    print(f"error: `{args.cmd}` failed: {type(exc).__name__}: {first} — a model, file or setting the studio "
          f"does not handle ({TRACEBACK_ENV}=1 shows where it failed)", file=sys.stderr)
    return 1


def main_entry():
    """The `proxsparse` console command."""
    sys.exit(main())
