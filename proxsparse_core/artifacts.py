"""Files of a run folder: masks (bit-packed), recipe, metrics and the event log."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig
from .errors import UserError
from .masks import pack_masks, unpack_masks

MASKS_FILE = "masks.npz"
RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.json"
EVENTS_FILE = "events.jsonl"


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


def save_recipe(folder: Path, cfg: RunConfig, verb: str = "learn", extra: dict | None = None) -> Path:
    return save_json(Path(folder) / RECIPE_FILE, {"config": cfg.to_dict(), "command": cfg.cli_command(verb),
                                                  **(extra or {})})


def load_recipe(path) -> RunConfig:
    path = Path(path)
    if path.is_dir():
        path = path / RECIPE_FILE
    try:
        return RunConfig.from_dict(json.loads(path.read_text())["config"])
    except FileNotFoundError:
        raise UserError(f"no recipe at {str(path)!r}")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path.name} is not a ProxSparse recipe ({exc})") from exc


def save_events(path: Path, events) -> Path:
    lines = "".join(json.dumps(e.to_dict()) + "\n" for e in events)
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(lines))
    return Path(path)
