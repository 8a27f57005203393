"""Run folders and recovery: the result a `learn`/`prune` folder holds, and `recover` folders.

`recover --run RUN` starts from a folder written by `learn` or `prune`: its recipe.json names the
model, the data and the method, masks.npz the 2:4 pattern. A recover folder holds the same files
plus `weights.safetensors`: the prunable layers' weights after recovery (names = the prunable
layer names, zeros where the mask prunes). The masks alone no longer give the model, so `export`
and `eval` read that file.

SparseGPT runs: masks.npz holds only SparseGPT's mask, not its updated weights. Those are the
layer-by-layer optimal-brain-surgeon update with that mask, which `recovery.obs_update` computes
with the very same arithmetic (SparseGPT with its mask given instead of chosen; a test checks it
bit for bit) from the recipe's calibration samples. So the base result is rebuilt exactly, never
approximated by W0 · mask. (Recovering a SparseGPT result with `obs` alone at SparseGPT's own
damping, `--obs-damp 0.01`, therefore gives its own weights back; recovery's default damping,
`finetune` and `both` change them.)
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from proxsparse_core.runs.files import (_atomic_write, check_regular, load_masks, read_metrics, read_recipe,
                                        write_error)
from proxsparse_core.config import RunConfig
from proxsparse_core.errors import UserError
from proxsparse_core.results import LEARNED, RECOVERED

WEIGHTS_FILE = "weights.safetensors"
WEIGHTS_FORMAT = "proxsparse-recovered-weights-v1"
# what a recovered result's metrics keep from recovery.recover's info (plain values only)
RECOVERY_INFO = ("base", "base_method", "obs", "finetune_steps", "finetune_samples", "status", "message", "seconds")


@dataclass
class RunFolder:
    path: Path
    recipe: dict          # recipe.json as written
    cfg: RunConfig        # its settings (with any device/dtype overrides)
    method: str           # the result it holds: "proxsparse", a baseline, or "<base>+recovery"
    masks: dict
    recovered: bool = False   # it holds weights.safetensors (a `recover` folder)

    @property
    def base_method(self) -> str:
        return str(self.recipe.get("base_method") or self.method.removesuffix(RECOVERED))

    @property
    def rebuilds_weights(self) -> bool:
        """Its result has updated weights that masks.npz does not hold: they are rebuilt from the
        recipe's calibration samples (SparseGPT; see the module docstring)."""
        return not self.recovered and self.method == "sparsegpt"


def has_weights_file(run) -> bool:
    """Whether a run folder holds weights.safetensors; anything by that name that is not a regular
    file (a folder, a FIFO, a link to nowhere) is one UserError line, never silently ignored."""
    path = Path(run) / WEIGHTS_FILE
    if not os.path.lexists(path):
        return False
    try:
        check_regular(path)
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} is a link to nothing; a recover folder's {WEIGHTS_FILE} is a "
                        f"plain file") from None
    return True


def read_run(run, overrides: dict | None = None) -> RunFolder:
    """A run folder's recipe, method and masks, every file checked (artifacts' readers); every
    problem is one UserError line. The one reader of run folders: eval, recover and export use it."""
    from proxsparse_core.baselines.oneshot import METHODS

    path = Path(run).expanduser()
    if not path.is_dir():
        raise UserError(f"run folder {str(path)!r} does not exist")
    recipe = read_recipe(path)                   # a missing or broken recipe.json: one clear line
    # the overrides replace settings before they are checked: a recipe written on a GPU machine names
    # a device (or a data file) that this one may not have
    cfg = RunConfig.from_dict({**recipe["config"], **(overrides or {})})
    method = recipe.get("method", LEARNED)       # recipes of `learn` may not name it
    if not isinstance(method, str) or method.removesuffix(RECOVERED) not in (LEARNED, *METHODS):
        raise UserError(f"recipe.json names an unknown method {_short(method)}; known: "
                        f"{', '.join([LEARNED, *METHODS])}")
    recovered = has_weights_file(path)
    if recovered and not method.endswith(RECOVERED):
        method = method + RECOVERED
    return RunFolder(path, recipe, cfg, method, load_masks(path), recovered)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_apart(run, out, flag: str = "--out", replaces: bool = False) -> None:
    """A command that reads the run folder `run` must not write into it: `out` equal to it or
    inside it is one UserError line (links resolved). With `replaces` (an export replaces its
    folder whole) a `out` that holds the run is refused too."""
    if out is None:
        return
    run_r, out_r = Path(run).expanduser().resolve(), Path(out).expanduser().resolve()
    if _inside(out_r, run_r):
        where = "is" if out_r == run_r else "is inside"
        raise UserError(f"{flag} {str(out)!r} {where} the run folder {str(run)!r} being read; {flag} must "
                        f"be a new folder outside it (nothing was changed)")
    if replaces and _inside(run_r, out_r):
        raise UserError(f"{flag} {str(out)!r} holds the run folder {str(run)!r} being read, and replacing "
                        f"it would destroy that run; choose another folder (nothing was changed)")


def _old_metrics(folder: RunFolder) -> dict:
    return read_metrics(folder.path)


def save_weights(path, weights: dict, metadata: dict | None = None) -> Path:
    """Write the prunable weights (name → tensor) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors = {n: w.detach().to("cpu").contiguous() for n, w in weights.items()}
    meta = {"format": WEIGHTS_FORMAT, **{k: str(v) for k, v in (metadata or {}).items()}}
    from safetensors import SafetensorError

    try:
        _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))
    except (OSError, SafetensorError) as exc:      # a full disk: one line (the temporary file is gone)
        raise write_error(exc, Path(path).parent, f"writing {Path(path).name}") from exc
    return Path(path)


def load_weights_file(run, prunable, masks: dict) -> dict:
    """The recovered weights of a recover folder, checked against the model and the masks: a
    regular file, every prunable layer once, shaped like its layer, of a floating-point type,
    finite, and zero wherever the mask prunes. The one loader of weights.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(run)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    try:
        check_regular(path)
        weights = load_file(path)
    except FileNotFoundError:
        raise UserError(f"no recovered weights at {str(path)!r}") from None
    except (OSError, SafetensorError) as exc:
        why = " ".join(str(exc).split())[:200]
        raise UserError(f"{path.name} is not a readable safetensors file ({why})") from None
    return check_weights(path.name, weights, prunable, masks)


def check_weights(label: str, weights: dict, prunable, masks: dict) -> dict:
    """Updated weights (layer name → tensor) read from a file named `label`, checked against the
    model and the masks: every prunable layer once, shaped like its layer, of a floating-point type,
    finite, and zero wherever the mask prunes. Anything else is one UserError line."""
    differ = set(prunable.names) ^ set(weights)
    if differ:
        raise UserError(f"{label} does not match this model ({len(differ)} layers differ, "
                        f"e.g. {_short(sorted(differ)[0])})")
    for n in prunable.names:
        w, m = weights[n], masks[n]
        if tuple(w.shape) != tuple(prunable.modules[n].weight.shape):
            raise UserError(f"{label}: {n} has shape {tuple(w.shape)}, the layer "
                            f"{tuple(prunable.modules[n].weight.shape)}")
        if not w.is_floating_point():
            raise UserError(f"{label}: {n} is stored as {str(w.dtype).replace('torch.', '')}, not as "
                            f"floating-point weights")
        bad = int((~torch.isfinite(w)).sum())
        if bad:
            raise UserError(f"{label}: {n} has {bad:,} NaN or infinite weights")
        if bool((w[~m] != 0).any()):
            raise UserError(f"{label}: {n} has non-zero weights where masks.npz prunes")
    return weights


def recover_command(run, rec: dict, out) -> str:
    """The `recover` command that remakes a recover folder from its base run folder; `rec` is the
    recovery's settings as recorded (RecoveryConfig.to_dict()). KeyError where one is missing."""
    from proxsparse_core.baselines.sparsegpt import DAMP
    return shlex.join(["python", "-m", "proxsparse_core", "recover", "--run", str(run), "--method", rec["method"],
                       "--steps", str(rec["steps"]), "--lr", str(rec["lr"]), "--batch", str(rec["batch"]),
                       "--seed", str(rec["seed"]), "--samples", str(rec["samples"]), "--teacher", rec["teacher"],
                       "--text", str(rec["text"]), "--obs-dense", str(rec.get("obs_dense", 0.0)),
                       "--obs-damp", str(rec.get("obs_damp", DAMP)),
                       "--out", str(out)])


def recovery_summary(info: dict) -> str:
    """One sentence for reports and model cards: how a recovered result's survivors were changed."""
    from proxsparse_core.baselines.sparsegpt import DAMP
    steps = []
    rec = info.get("recovery") if isinstance(info.get("recovery"), dict) else {}
    if info.get("obs"):
        share = rec.get("obs_dense")
        toward = (f", each layer aiming {share:.0%} of the way from its own outputs to the dense model's"
                  if isinstance(share, float) and 0 < share <= 1 else "")
        damp = rec.get("obs_damp")
        if isinstance(damp, float) and 0 < damp <= 10 and damp != DAMP:
            toward += f", damping {damp:.0%} of the mean Hessian diagonal (SparseGPT's: {DAMP:.0%})"
        steps.append("the optimal-brain-surgeon update layer by layer (SparseGPT's update with the "
                     f"mask held fixed{toward})")
    def count(key):   # info may come from a run folder's metrics.json: only whole numbers are shown
        v = info.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
    if count("finetune_steps"):
        on = f" on {count('finetune_samples')} calibration samples" if count("finetune_samples") else ""
        text = rec.get("text")
        if isinstance(text, int) and not isinstance(text, bool) and text > 0:
            on += f" (drawn over the calibration text and {text:,} tokens of fresh text the dense model wrote)"
        if rec.get("teacher") == "live":
            on += ", the teacher's full next-token distribution computed live"
        steps.append(f"{count('finetune_steps')} steps of masked fine-tuning by distillation from the "
                     f"dense model{on}")
    how = " then ".join(steps) or "recovery"
    return (f"After pruning with {info.get('base_method', '?')}, the surviving weights were updated by "
            f"{how}, with the mask held fixed.")

