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
approximated by W0 · mask. (Recovering a SparseGPT result with `obs` alone therefore gives its
own weights back; `finetune` or `both` change them.)
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from .artifacts import METRICS_FILE, RECIPE_FILE, _atomic_write, load_masks, load_recipe
from .config import RunConfig
from .errors import UserError
from .results import LEARNED, RECOVERED, Pruning

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

    @property
    def recovered(self) -> bool:
        return (self.path / WEIGHTS_FILE).exists()

    @property
    def base_method(self) -> str:
        return str(self.recipe.get("base_method") or self.method.removesuffix(RECOVERED))


def read_run(run, overrides: dict | None = None) -> RunFolder:
    """A run folder's recipe, method and masks; every problem is one UserError line."""
    from .baselines import METHODS

    path = Path(run).expanduser()
    if not path.is_dir():
        raise UserError(f"run folder {str(path)!r} does not exist")
    cfg = load_recipe(path)                      # a missing or broken recipe.json: one clear line
    recipe = json.loads((path / RECIPE_FILE).read_text())
    method = recipe.get("method", LEARNED)       # recipes of `learn` may not name it
    if not isinstance(method, str) or method.removesuffix(RECOVERED) not in (LEARNED, *METHODS):
        raise UserError(f"recipe.json names an unknown method {method!r}; known: "
                        f"{', '.join([LEARNED, *METHODS])}")
    if (path / WEIGHTS_FILE).exists() and not method.endswith(RECOVERED):
        method = method + RECOVERED
    if overrides:
        cfg = RunConfig(**{**cfg.to_dict(), **overrides}).validate()
    return RunFolder(path, recipe, cfg, method, load_masks(path))


def _old_metrics(folder: RunFolder) -> dict:
    try:
        old = json.loads((folder.path / METRICS_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return old if isinstance(old, dict) else {}


def add_base_result(ws, folder: RunFolder, progress=None, stop=None) -> tuple[str, str]:
    """Put the result of a learn/prune folder into the workspace `ws` (loaded with its recipe)
    under its method's name. Returns (name, a line saying what the base weights are)."""
    from .export import check_masks_match
    from .recovery import obs_update

    if folder.recovered:
        raise UserError(f"{str(folder.path)!r} is already a recover run (it holds {WEIGHTS_FILE}); "
                        f"recover its base run instead")
    check_masks_match(ws.lm.prunable, folder.masks)
    method, info = folder.method, {"config": folder.cfg.to_dict()}
    info.update({k: v for k, v in _old_metrics(folder).items() if k in ("status", "steps", "message")})
    if method == "sparsegpt":
        weights = obs_update(ws.lm, ws.data.calibration, folder.masks, progress, stop)
        note = ("masks.npz of a sparsegpt run holds its mask only; its updated weights were rebuilt as "
                "the OBS update with that mask on the recipe's calibration samples (SparseGPT's own "
                "arithmetic, deterministic)")
    else:
        weights = None
        note = f"the {method} result is the original weights × masks.npz"
    ws.add_result(method, Pruning(method, folder.masks, weights, info))
    return method, note


def save_weights(path, weights: dict, metadata: dict | None = None) -> Path:
    """Write the prunable weights (name → tensor) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors = {n: w.detach().to("cpu").contiguous() for n, w in weights.items()}
    meta = {"format": WEIGHTS_FORMAT, **{k: str(v) for k, v in (metadata or {}).items()}}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


def load_weights_file(run, prunable, masks: dict) -> dict:
    """The recovered weights of a recover folder, checked against the model and the masks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(run)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    try:
        weights = load_file(path)
    except FileNotFoundError:
        raise UserError(f"no recovered weights at {str(path)!r}") from None
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{path.name} is not a readable safetensors file ({exc})") from None
    differ = set(prunable.names) ^ set(weights)
    if differ:
        raise UserError(f"{path.name} does not match this model ({len(differ)} layers differ, "
                        f"e.g. {sorted(differ)[0]})")
    for n in prunable.names:
        w, m = weights[n], masks[n]
        if tuple(w.shape) != tuple(prunable.modules[n].weight.shape):
            raise UserError(f"{path.name}: {n} has shape {tuple(w.shape)}, the layer "
                            f"{tuple(prunable.modules[n].weight.shape)}")
        if bool((w[~m] != 0).any()):
            raise UserError(f"{path.name}: {n} has non-zero weights where masks.npz prunes")
    return weights


def add_recovered_result(ws, folder: RunFolder) -> str:
    """Put the recovered result of a recover folder into `ws`; returns its name."""
    from .export import check_masks_match

    check_masks_match(ws.lm.prunable, folder.masks)
    weights = load_weights_file(folder.path, ws.lm.prunable, folder.masks)
    info = {"config": folder.cfg.to_dict(), "base_method": folder.base_method,
            "recovery": folder.recipe.get("recovery") or {}}
    if isinstance(folder.recipe.get("command"), str):
        info["recover_command"] = folder.recipe["command"]
    info.update({k: v for k, v in _old_metrics(folder).items() if k in RECOVERY_INFO and k != "base_method"})
    ws.add_result(folder.method, Pruning(folder.method, folder.masks, weights, info))
    return folder.method


def recover_command(run, rcfg, out) -> str:
    """The `recover` command that remakes a recover folder from its base run folder."""
    return shlex.join(["python", "-m", "proxsparse_core", "recover", "--run", str(run), "--method", rcfg.method,
                       "--steps", str(rcfg.steps), "--lr", str(rcfg.lr), "--batch", str(rcfg.batch),
                       "--seed", str(rcfg.seed), "--samples", str(rcfg.samples), "--teacher", rcfg.teacher,
                       "--text", str(rcfg.text), "--out", str(out)])


def recovery_summary(info: dict) -> str:
    """One sentence for reports and model cards: how a recovered result's survivors were changed."""
    steps = []
    if info.get("obs"):
        steps.append("the optimal-brain-surgeon update layer by layer (SparseGPT's update with the "
                     "mask held fixed)")
    def count(key):   # info may come from a run folder's metrics.json: only whole numbers are shown
        v = info.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
    if count("finetune_steps"):
        on = f" on {count('finetune_samples')} calibration samples" if count("finetune_samples") else ""
        rec = info.get("recovery") if isinstance(info.get("recovery"), dict) else {}
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

