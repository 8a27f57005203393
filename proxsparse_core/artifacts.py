"""Files of a run folder: masks (bit-packed), recipe, metrics and the event log."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig, reproduce_command
from .errors import UserError
from .masks import pack_masks, unpack_masks
from .results import LEARNED

MASKS_FILE = "masks.npz"
RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.json"
EVENTS_FILE = "events.jsonl"
MAX_RECIPE_BYTES = 2**20          # a recipe is a few settings; refuse anything larger than 1 MiB


def _atomic_write(path: Path, write):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)   # mkstemp makes files private; run files are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_masks(path: Path, masks: dict) -> Path:
    path = Path(path)
    packed = pack_masks(masks)
    names = list(masks)
    arrays = {f"m{i}": packed[n] for i, n in enumerate(names)}
    meta = json.dumps({"names": names, "shapes": [list(masks[n].shape) for n in names],
                       "format": "proxsparse-masks-v1: numpy.packbits of the row-major bool mask"})

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, meta=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays)
    _atomic_write(path, write)
    return path


def load_masks(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        path = path / MASKS_FILE
    if not path.exists():
        raise UserError(f"no mask file at {str(path)!r}")
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            packed = {n: z[f"m{i}"] for i, n in enumerate(meta["names"])}
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path.name} is not a ProxSparse mask file ({exc})") from exc
    return unpack_masks(packed, dict(zip(meta["names"], meta["shapes"])))


def save_json(path: Path, obj) -> Path:
    path = Path(path)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str)))
    return path


def save_recipe(folder: Path, cfg: RunConfig, method: str = LEARNED, extra: dict | None = None) -> Path:
    """recipe.json: the settings, the method that made the result and the command that remakes it."""
    return save_json(Path(folder) / RECIPE_FILE, {"config": cfg.to_dict(), "method": method,
                                                  "command": reproduce_command(cfg, method), **(extra or {})})


def read_recipe(path) -> dict:
    """The recipe.json of a run folder (or the file itself) as a dict with a "config" object;
    anything else is one clear line: a missing, huge, non-UTF-8, malformed or too deeply nested file."""
    path = Path(path)
    if path.is_dir():
        path = path / RECIPE_FILE
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise UserError(f"{path.name} is {size / 2**20:.1f} MiB; a recipe is at most "
                            f"{MAX_RECIPE_BYTES // 2**20} MiB (it holds a few settings)")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"no recipe at {str(path)!r}") from None
    except OSError as exc:
        raise UserError(f"cannot read the recipe {str(path)!r} ({exc.strerror or exc})") from None
    try:
        recipe = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise UserError(f"{path.name} is nested too deeply to be a ProxSparse recipe") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path.name} is not a ProxSparse recipe: it holds a JSON {type(recipe).__name__}, "
                        f"not an object with a \"config\"")
    if not isinstance(recipe.get("config"), dict):
        raise UserError(f"{path.name} is not a ProxSparse recipe: \"config\" must be an object of settings")
    return recipe


def load_recipe(path) -> RunConfig:
    return RunConfig.from_dict(read_recipe(path)["config"])


def save_events(path: Path, events) -> Path:
    lines = "".join(json.dumps(e.to_dict()) + "\n" for e in events)
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(lines))
    return Path(path)
