"""Reopen a saved run: load the model and data its recipe names into a Workspace and put the
result the folder holds in it, as `export --run`, `eval --masks`, `recover --run` and the app do.

A learn or prune folder gives its mask on the original weights; a SparseGPT folder holds only its
mask, so its updated weights are rebuilt as the OBS update with that mask on the recipe's
calibration samples (SparseGPT's own arithmetic, deterministic); a recover folder gives its
recovered weights (weights.safetensors). `export_run` is reopen + export in one call. `open_saved` puts a run or export
folder the app lists (runs/library.py reads it) in a workspace under a name of its own; `mask_of_recovered`
adds a recovered result's mask on the original weights when nothing else holds it.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from proxsparse_core.errors import Stopped, UserError
from proxsparse_core.recovery.recover import obs_update
from proxsparse_core.results import DENSE, LEARNED, RECOVERED, Pruning, is_recovered, tagged
from proxsparse_core.runs.export import ExportResult, _check_target, clean_stale, export_result
from proxsparse_core.runs.files import read_events
from proxsparse_core.runs.library import OpenedRun, export_weights, recorded_scores
from proxsparse_core.runs.folder import (RECOVERY_INFO, WEIGHTS_FILE, RunFolder, _old_metrics, check_out_apart,
                                         load_weights_file, read_run)
from proxsparse_core.sparsity.masks import check_masks_match, same_masks


def add_base_result(ws, folder: RunFolder, progress=None, stop=None, name: str | None = None) -> tuple[str, str]:
    """Put the result of a learn/prune folder into the workspace `ws` (loaded with its recipe)
    under `name` (default: its method's name). Returns (name, a line saying what the base weights are)."""
    if folder.recovered:
        raise UserError(f"{str(folder.path)!r} is already a recover run (it holds {WEIGHTS_FILE}); "
                        f"recover its base run instead")
    check_masks_match(ws.lm.prunable, folder.masks)
    method, info = folder.method, {"config": folder.cfg.to_dict()}
    info.update({k: v for k, v in _old_metrics(folder).items() if k in ("status", "steps", "message")})
    if folder.rebuilds_weights:
        weights = obs_update(ws.lm, ws.data.calibration, folder.masks, progress, stop)
        note = ("masks.npz of a sparsegpt run holds its mask only; its updated weights were rebuilt as "
                "the OBS update with that mask on the recipe's calibration samples (SparseGPT's own "
                "arithmetic, deterministic)")
    else:
        weights = None
        note = f"the {method} result is the original weights × masks.npz"
    ws.add_result(name or method, Pruning(method, folder.masks, weights, info))
    return name or method, note


def add_recovered_result(ws, folder: RunFolder, name: str | None = None) -> str:
    """Put the recovered result of a recover folder into `ws` under `name` (default: its method's
    name); returns its name."""
    check_masks_match(ws.lm.prunable, folder.masks)
    weights = load_weights_file(folder.path, ws.lm.prunable, folder.masks)
    info = {"config": folder.cfg.to_dict(), "base_method": folder.base_method,
            "recovery": folder.recipe.get("recovery") or {}}
    if isinstance(folder.recipe.get("command"), str):
        info["recover_command"] = folder.recipe["command"]
    info.update({k: v for k, v in _old_metrics(folder).items() if k in RECOVERY_INFO and k != "base_method"})
    ws.add_result(name or folder.method, Pruning(folder.method, folder.masks, weights, info))
    return name or folder.method


def add_run_result(ws, folder: RunFolder, progress=None, stop=None, name: str | None = None) -> tuple[str, str]:
    """Put the result a run folder holds into `ws` (loaded with a model that fits it): a recover
    folder's recovered weights, or the base result of a learn/prune folder (SparseGPT's updated
    weights rebuilt). Returns (name, a line saying which weights the result has) — what `export
    --run` exports and `eval --masks` evaluates."""
    if folder.recovered:
        name = add_recovered_result(ws, folder, name)
        return name, (f"the {folder.base_method} mask with the recovered weights of {WEIGHTS_FILE} "
                      f"(masks.npz gives the pattern)")
    return add_base_result(ws, folder, progress, stop, name)


def open_saved(ws, opened: OpenedRun, progress=None, stop=None) -> tuple[str, str]:
    """Put the result of a saved run or export folder (runs.library.read_saved) into `ws`, which
    is loaded with a model that fits it, under a name of its own: its method tagged with its
    folder's name ("proxsparse#demo", results.TAG), so it never replaces a result already there.
    An export of an updated result (recovered, SparseGPT) gives the weights its model files hold.
    Returns (name, a line saying which weights the result has)."""
    folder = opened.folder
    name = ws.unique_name(tagged(folder.method, opened.tag))
    if opened.weights_from is None:
        return add_run_result(ws, folder, progress, stop, name)
    check_masks_match(ws.lm.prunable, folder.masks)
    weights = export_weights(opened.weights_from, ws.lm.prunable, folder.masks)
    info = {"config": folder.cfg.to_dict(), "base_method": folder.base_method}
    if isinstance(folder.recipe.get("recovery"), dict):
        info["recovery"] = folder.recipe["recovery"]
    info.update({k: v for k, v in opened.metrics.items() if k in RECOVERY_INFO and k != "base_method"
                 and isinstance(v, (str, int, float, bool))})
    ws.add_result(name, Pruning(folder.method, folder.masks, weights, info))
    return name, f"the {folder.method} result with the updated weights of the export's model files"


def mask_of_recovered(ws, name: str, tag: str) -> tuple[str, bool] | None:
    """For the recovered result `name`: the result holding its mask on the original weights (what the
    mask alone does, the middle column of a lecture), added under its base method tagged with `tag`
    when the workspace has none (a recovered run or export opened on its own, e.g. on another
    machine). Returns (that result's name, whether it was added), or None when `name` is not a
    recovered result."""
    rec = ws.results[name]
    if not is_recovered(name) or rec.weights is None:
        return None
    for other, res in ws.results.items():
        if not is_recovered(other) and res.weights is None and same_masks(res.masks, rec.masks):
            return other, False
    method = rec.info.get("base_method") or name.split(RECOVERED)[0]
    base = ws.unique_name(tagged(method, tag) if tag else method)
    ws.add_result(base, Pruning(method, rec.masks, None, {"config": rec.info.get("config")}))
    return base, True


def restore_mask_scores(ws, opened: OpenedRun, base: str) -> None:
    """The perplexity a recovered run's metrics.json recorded for the mask it recovered (an export's
    report and a `recover` folder's metrics hold every row of their session; "X+recovery" recovered
    "X"), put back for the mask-only result `base` (mask_of_recovered), on the very windows `ws` holds."""
    result = opened.metrics.get("result")
    result = result if isinstance(result, str) else opened.folder.method
    if RECOVERED in result:
        mine, _, agree, _ = recorded_scores(opened, ws, keys=[result.split(RECOVERED)[0]])
        if mine is not None:
            ws.restore_score(base, mine, agree)


def restore_scores(ws, opened: OpenedRun, name: str) -> str:
    """Put the held-out perplexities (and top-1 agreement) a saved run recorded into `ws` for the
    result `name` and for dense — only when they were measured on the very windows `ws` holds
    (runs.library.recorded_scores). Returns a line saying what was restored, or why not."""
    mine, dense, agree, why = recorded_scores(opened, ws)
    if mine is None:
        return f"no perplexity rows restored: {why or 'it recorded none for its result'}"
    ws.restore_score(name, mine, agree)
    if dense is not None:
        ws.restore_score(DENSE, dense)
    return "perplexity rows restored from its metrics.json"


def export_run(run, out, ws, *, overwrite: bool = False, evaluate: bool = True,
               overrides: dict | None = None, stop: threading.Event | None = None,
               progress: Callable[[str], None] | None = None) -> ExportResult:
    """Export a run folder written by `learn`, `prune` or `recover` (recipe.json + masks.npz
    [+ weights.safetensors, events.jsonl, metrics.json]): reload the model and data named in the
    recipe and export the result the folder holds under its method's name (W0 · mask, SparseGPT's updated weights rebuilt from the recipe, or a recover folder's
    recovered weights). The folder is read by runs.folder.read_run, the one run-folder reader;
    `out` must lie outside it (and must not hold it: an export replaces its folder). `ws` is the
    empty Workspace the model is loaded into (given by the caller, so this module stands below it)."""
    say = progress or (lambda t: None)
    run, out = Path(run).expanduser(), Path(out).expanduser()
    if not run.is_dir():
        raise UserError(f"run folder {str(run)!r} does not exist")
    check_out_apart(run, out, replaces=True)
    clean_stale(out)
    _check_target(out, overwrite)           # fail before the slow model load
    folder = read_run(run, overrides)
    events = read_events(run) if folder.method == LEARNED or folder.recovered else None
    say(f"loading {folder.cfg.model} …")
    ws.load(folder.cfg)

    def blocks(done, total):
        say(f"rebuilding {folder.method}'s updated weights: block {done}/{total}")
    try:
        name, note = add_run_result(ws, folder, blocks, stop)
    except Stopped:
        raise Stopped("export stopped while the weights were rebuilt; nothing was written") from None
    say(note)
    return export_result(ws, name, out, cfg=folder.cfg, events=events, evaluate=evaluate,
                         overwrite=overwrite, stop=stop, progress=progress)
