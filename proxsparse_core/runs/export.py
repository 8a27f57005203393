"""Export a 2:4 result in forms people take home.

An export folder is a normal Hugging Face model folder (safetensors, config, tokenizer) holding
the pruned weights, plus a model card README and a `proxsparse/` folder of small artefacts:
the masks alone (bit-packed), the recipe that reproduces the run, and a report (metrics,
perplexity table, plots as SVG and HTML, environment).

Writes are atomic: everything goes to a hidden temporary folder next to the target
(`.NAME.partial-<pid>-…`), which is renamed into place only when complete. A failure, a full disk
or a Stop removes the temporary folder, so a target is either absent or complete. An existing
non-empty folder is replaced only when the caller says so. A process killed mid-export cannot
clean up: the next export to the same target removes the temporary folders of processes that
are no longer alive (and puts back a previous export that was being replaced).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from proxsparse_core.runs.files import load_masks, os_message, save_json, save_masks, save_recipe, write_error
from proxsparse_core.config import RunConfig
from proxsparse_core.errors import Stopped, UserError
from proxsparse_core.progress import Progress
from proxsparse_core.sparsity.masks import apply_masks, mask_stats, verify
from proxsparse_core.sparsity.prunable import hf_state_dict
from proxsparse_core.runs.report import environment, model_card, write_report
from proxsparse_core.results import DENSE, method_of

ARTEFACTS = "proxsparse"          # sub-folder with masks, recipe and report
MAX_NAME = 100


@dataclass
class ExportResult:
    folder: Path
    files: list[str]              # relative paths inside the folder
    metrics: dict

    def summary(self) -> str:
        size = sum((self.folder / f).stat().st_size for f in self.files)
        return (f"exported {self.metrics['result']} to {self.folder} ({len(self.files)} files, "
                f"{size / 2**20:.1f} MiB); {self.metrics['verification']}")


# ---------------------------------------------------------------------------------- names
def safe_name(name: str) -> str:
    """A folder name that cannot leave its parent: letters, digits, '.', '_' and '-' only,
    no leading dot, at most MAX_NAME characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", (name or "").strip())
    cleaned = re.sub(r"\.{2,}", ".", cleaned).strip(".-")[:MAX_NAME].strip(".-")
    if not cleaned:
        raise UserError(f"{name!r} is not usable as a folder name; use letters, digits, '.', '_' or '-'")
    return cleaned


def target_in(root, name: str) -> Path:
    """The export folder for a user-typed `name` under `root` (sanitised; never outside root)."""
    root = Path(root).expanduser().resolve()
    target = root / safe_name(name)
    if target.resolve().parent != root:
        raise UserError(f"{name!r} would leave the export folder {str(root)!r}")
    return target


def _check_target(out: Path, overwrite: bool):
    if out.exists() and not out.is_dir():
        raise UserError(f"{str(out)!r} exists and is a file; choose another folder name")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"export folder {str(out)!r} already exists; choose another name or allow "
                        f"overwriting")


def _check_verified(name: str, check) -> None:
    """A result whose 2:4 check failed is never exported: one line saying why."""
    if not check.ok:
        shown = "; ".join(check.problems[:2]) + (f"; and {len(check.problems) - 2} more problems"
                                                  if len(check.problems) > 2 else "")
        raise UserError(f"the {name} result failed its 2:4 check ({shown}), so it was not exported; "
                        f"nothing was written")


def _bytes_needed(model: torch.nn.Module, masks: dict) -> int:
    """About what the export writes: each distinct tensor once, the bit-packed masks, a margin."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total + sum(m.numel() for m in masks.values()) // 8 + 8 * 2**20


def _check_space(parent: Path, need: int):
    free = shutil.disk_usage(parent).free
    if free < need:
        raise UserError(f"not enough disk space in {str(parent)!r}: the export needs about "
                        f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; nothing was written")


# ---------------------------------------------------------------------------------- export
def export_result(ws, name: str, out, *, cfg: RunConfig | None = None, events=None,
                  evaluate: bool = True, overwrite: bool = False,
                  stop: threading.Event | None = None,
                  progress: Callable[[Progress], None] | None = None) -> ExportResult:
    """Export the workspace result `name` (a pruning.Pruning) to the folder `out`. `progress` hears
    a progress.Progress (a str: its message) as each step starts: stage "perplexity" (twice with
    `evaluate`), "model", "artefacts", then "exported", counted as steps done of all steps.

    SparseGPT-like results carry updated weights and those are exported; masks-only results
    export W0 · mask. `cfg` is the run's configuration for the recipe (default: the one stored
    with the result). With `evaluate`, dense and pruned perplexity are measured first (cached
    in the workspace). Raises UserError (errors.Stopped on Stop) and leaves nothing behind."""
    out = Path(out).expanduser()
    steps = (2 if evaluate else 0) + 2          # perplexity of dense and of the result, the model, the artefacts

    def say(stage: str, done: int, message: str):
        if progress:
            progress(Progress(stage, done, steps, message, "steps"))
    stop = stop or threading.Event()
    clean_stale(out)
    _check_target(out, overwrite)
    if name not in ws.results:
        raise UserError(f"no pruning result named {name!r} to export")
    result, lm = ws.results[name], ws.lm
    if cfg is None and result.info.get("config"):      # what made it, as it was (an uploaded text may be gone since)
        cfg = RunConfig(**result.info["config"])
    with ws.lock, ws.variant(name):      # before anything slow: a wrong pattern is never exported
        check = verify(lm.prunable, result.masks, ws.originals, updated_ok=result.weights is not None)
    _check_verified(name, check)

    if evaluate:
        _evaluate(ws, name, say, stop)

    parent = out.parent
    tmp = _temporary_folder(out, _bytes_needed(lm.model, result.masks))
    try:
        _stopped(stop)
        say("model", steps - 2, "writing the pruned model …")
        with ws.lock, ws.variant(name):
            lm.model.save_pretrained(tmp, state_dict=hf_state_dict(lm.model))   # Conv1D layers as they were
        lm.tokenizer.save_pretrained(tmp)
        _stopped(stop)
        say("artefacts", steps - 1, "writing masks, recipe and report …")
        metrics = _write_artefacts(tmp, ws, name, cfg, check, events)
        _stopped(stop)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        _readable(tmp)
        _commit(tmp, out, overwrite)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":   # e.g. a full disk
            raise write_error(exc, parent) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say("exported", steps, f"exported to {out}")
    return ExportResult(out, files, metrics)


def _evaluate(ws, name: str, say, stop: threading.Event):
    """Dense and `name`'s held-out perplexity (cached in the workspace) before an export."""
    try:
        for i, n in enumerate((DENSE, name)):
            say("perplexity", i, f"measuring {n} perplexity …")
            ws.perplexity(n, stop=stop)
    except Stopped:
        raise Stopped("export stopped during evaluation; nothing was written") from None


def _temporary_folder(out: Path, need: int) -> Path:
    """The hidden folder next to `out` an export is written in, once the disk has room for it."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _check_space(parent, need)
        return Path(tempfile.mkdtemp(dir=parent, prefix=_temp_prefix(out, "partial")))
    except OSError as exc:
        raise os_message(exc, parent) from exc


def _write_artefacts(tmp: Path, ws, name: str, cfg: RunConfig | None, check, events) -> dict:
    """proxsparse/ (masks, recipe, report) and the model card of an export being written in `tmp`;
    returns the metrics the report holds."""
    result = ws.results[name]
    art = tmp / ARTEFACTS
    art.mkdir()
    save_masks(art / "masks.npz", result.masks)
    recipe = None
    if cfg is not None:
        method = method_of(name)      # "proxsparse#2" is a second ProxSparse run: its recipe says proxsparse
        recipe = json.loads(save_recipe(art, cfg, method=method,
                                        extra={"result": name} if method != name else None).read_text())
    if recipe is not None and "recovery" in result.info:      # how the survivors were recovered
        recipe = {**recipe, "base_method": result.info.get("base_method"),
                  "recovery": result.info["recovery"],
                  **({"recover_command": result.info["recover_command"]}
                     if "recover_command" in result.info else {})}
        save_json(art / "recipe.json", recipe)
    metrics = _metrics(ws, name, check, recipe)
    write_report(art, metrics, events)
    written = sorted(p.name for p in art.iterdir() if p.is_file())
    (tmp / "README.md").write_text(model_card(metrics, ARTEFACTS, written), encoding="utf-8")
    return metrics


def _temp_prefix(out: Path, kind: str) -> str:
    """`.NAME.partial-<pid>-` / `.NAME.old-<pid>-`: the pid says whether its writer still lives."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:               # e.g. EPERM: it exists, under another user
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporary folders that exports to `out` by processes no longer alive left behind
    (`.NAME.partial-<pid>-…`, `.NAME.old-<pid>-…`). A previous export that was being replaced when
    its process died (`.NAME.old-<pid>-…/previous`, with `out` missing) is put back first.
    Returns the folders removed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)-[^/]*")
    removed = []
    try:
        entries = sorted(out.parent.iterdir()) if out.parent.is_dir() else []
        for p in entries:
            m = pattern.fullmatch(p.name)
            if not m or not p.is_dir() or p.is_symlink() or _alive(int(m.group(2))):
                continue
            previous = p / "previous"
            if m.group(1) == "old" and previous.is_dir() and not out.exists():
                os.rename(previous, out)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    except OSError:          # tidying is best effort: an unreadable folder is reported by the export itself
        pass
    return removed


def _stopped(stop: threading.Event):
    if stop.is_set():
        raise Stopped("export stopped by the user; nothing was written")


def _readable(folder: Path):
    """Temporary files and folders are private (0600/0700); a finished export is a normal folder."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def _commit(tmp: Path, out: Path, overwrite: bool):
    """Rename the finished temporary folder into place; an old folder is kept until then."""
    _check_target(out, overwrite)           # it may have appeared while we were writing
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=_temp_prefix(out, "old")))
        os.rename(out, old / "previous")
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old / "previous", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _metrics(ws, name: str, check, recipe: dict | None) -> dict:
    result, lm = ws.results[name], ws.lm
    info = {k: v for k, v in result.info.items() if k != "config" and not isinstance(v, (dict, list))}
    top1 = {n: ws.agreement(n) for n in ws.ppl if n != DENSE and n in ws.top1 and DENSE in ws.top1}
    if name in top1:
        info["top1_agreement_with_dense"] = top1[name]
    if "recovery" in result.info:
        from proxsparse_core.runs.folder import recovery_summary
        info["weights_note"] = (recovery_summary(result.info) + " masks.npz gives the 2:4 pattern; the "
                                "weights are not the original weights × mask.")
    return {"result": name, "method": result.method, "model_label": lm.label, "base_model": lm.source,
            "top1_agreement": top1,
            "model": lm.describe(), "dtype": str(lm.dtype).replace("torch.", ""),
            **info, "verified": check.ok, "verification": str(check),
            "weights_updated": result.weights is not None,
            "skipped_layers": [f"{n} ({why})" for n, why in lm.prunable.skipped],
            "left_dense": _left_dense(lm.prunable),
            "mask_stats": mask_stats(result.masks), "perplexity": dict(ws.ppl),
            "data": ws.data.source if ws.data else None,
            "calibration_tokens": int(ws.data.calibration.numel()) if ws.data else None,
            "held_out_tokens": int(ws.data.held_out.numel()) if ws.data else None,
            "recipe": recipe, "environment": environment()}


def _left_dense(prunable) -> dict | None:
    """The decoder blocks' weights that no mask covers (prunable.PrunableSet.left_dense), or None."""
    tensors = prunable.largest_dense()
    if not tensors:
        return None
    return {"weights": prunable.n_left_dense, "share_of_block_weights": round(prunable.dense_share, 4),
            "tensors": [n for n, _ in tensors]}


def bundle(folder, dest) -> Path:
    """The small artefacts of an export (README, masks, recipe, report) as one zip at `dest`,
    written atomically."""
    folder, dest = Path(folder), Path(dest)
    members = [folder / "README.md"] + sorted(p for p in (folder / ARTEFACTS).rglob("*") if p.is_file())
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for p in members:
                z.write(p, f"{folder.name}/{p.relative_to(folder)}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except OSError as exc:
        raise os_message(exc, dest.parent) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


# ---------------------------------------------------------------------------------- masks
def load_with_masks(source: str, masks, device: str = "auto", dtype: str = "auto",
                    trust_remote_code: bool = False):
    """The original model with a mask file (or dict) applied: the pruned model, re-created from
    the 1-bit masks. Returns a models.LoadedModel. A model that needs its own Python code also
    needs `proxsparse_core.models.loading.allow_remote_code(True)` first: that is the caller's decision."""
    from proxsparse_core.sparsity.masks import layer_shapes
    from proxsparse_core.models.loading import load_model

    lm = load_model(source, device, dtype, trust_remote_code)
    apply_masks(lm.prunable, load_masks(masks, layer_shapes(lm.prunable)) if not isinstance(masks, dict) else masks)
    return lm
