"""Saved runs: every result the app makes is kept as a run folder in the CLI's format, listed, and
opened again — the app's own folders, the ones `learn`/`prune`/`recover --out` write, export folders,
and zips of any of them.

A run folder holds recipe.json + masks.npz, and weights.safetensors (a recovered result's weights),
events.jsonl (its learning or fine-tuning curve) and metrics.json (status, steps, perplexities)
when it has them: exactly what the CLI writes, so `export --run`, `eval --masks` and `recover --run`
read the app's folders too. An export folder keeps the same files in its `proxsparse/` folder and
an updated result's weights in its model files.

Saving never replaces anything: each result gets a folder of its own (`<time>-<result>`, `-2`, …
when taken), written in a hidden temporary folder and renamed into place only when complete; a full
disk is one UserError line and leaves nothing behind. Zips are extracted with the same distrust as
run files are read (files.py): no absolute or `..` paths, no links or special files, only the files
a run or export folder holds, every member capped while it is read whatever it claims, the total
capped, and the result checked by the one run-folder reader (folder.read_run) before it is kept.

Putting an opened run into a workspace is `reopen.open_saved` (a floor up: it needs the workspace).
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from proxsparse_core.config import RunConfig, reproduce_command
from proxsparse_core.errors import UserError
from proxsparse_core.results import DENSE, RECOVERED, method_of, title
from proxsparse_core.runs.files import (EVENTS_FILE, MASKS_FILE, MAX_EVENTS_BYTES, MAX_MASKS_BYTES,
                                        MAX_METRICS_BYTES, MAX_RECIPE_BYTES, METRICS_FILE, RECIPE_FILE,
                                        _atomic_write, check_regular, read_events,
                                        read_json_file, read_metrics, read_recipe, save_json, save_masks,
                                        save_recipe, write_error)
from proxsparse_core.runs.folder import WEIGHTS_FILE, RunFolder, check_weights, read_run, save_weights

ARTEFACTS = "proxsparse"             # an export folder's sub-folder of run files (runs/export.py)
SAVED_BY = "ProxSparse Studio"
MAX_LISTED = 500                     # run folders listed at most (newest first)
MAX_TAG = 60                         # characters of a run's name in a result name

# zips: what may be in one, and how much
MAX_WEIGHTS_BYTES = 2**36            # weights.safetensors: 64 GiB is a 32-billion-weight model in fp16
MAX_ZIP_BYTES = 2**32                # everything a zip may unpack to, in all
MAX_ZIP_MEMBERS = 64
RUN_FILES = {RECIPE_FILE: MAX_RECIPE_BYTES, MASKS_FILE: MAX_MASKS_BYTES, METRICS_FILE: MAX_METRICS_BYTES,
             EVENTS_FILE: MAX_EVENTS_BYTES, WEIGHTS_FILE: MAX_WEIGHTS_BYTES}
# what else a run or export zip may hold, left out: the export's report and model card, a Mac's notes
SKIPPED = {"README.md", "report.html", "loss.svg", "sparsity.svg", ".DS_Store"}
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------- names
def slug(text: str, limit: int = MAX_TAG) -> str:
    """`text` as a folder name or a result tag: letters, digits, '.', '_' and '-' only."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip(".-")
    return re.sub(r"\.{2,}", ".", cleaned)[:limit].strip(".-") or "run"


def tag_of(path) -> str:
    """The tag a result opened from `path` is named with: its folder's name (results.TAG)."""
    return slug(Path(path).expanduser().resolve().name)


def _new_folder_name(root: Path, name: str) -> str:
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(name.replace('#', '-').replace('+', '-'))}"
    candidate, k = stem, 2
    while os.path.lexists(root / candidate):
        candidate, k = f"{stem}-{k}", k + 1
    return candidate


def _place(tmp: Path, root: Path, name: str) -> Path:
    """Rename the finished folder `tmp` to a new name under root; never onto an existing folder
    that holds anything (a rename onto a non-empty folder fails, and another name is tried)."""
    for _ in range(100):
        final = root / _new_folder_name(root, name)
        try:
            os.rename(tmp, final)
            return final
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise UserError(f"could not find a free folder name under {str(root)!r}")


# ---------------------------------------------------------------------------------- saving
def _number(v, lo: float = 0.0, hi: float = math.inf) -> float | None:
    """A finite number within [lo, hi] from a file's JSON (anything else: None)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        return None
    return float(v)


def scores(ws, name: str) -> dict:
    """What metrics.json says of result `name`'s held-out scores, keyed like the CLI's (dense, the
    method, and for a recovered result the method it recovered)."""
    from proxsparse_core.inference.evaluate import agreement

    pruning = ws.results[name]
    method = method_of(name)
    names = {DENSE: DENSE, method: name}
    base = pruning.info.get("base")
    if isinstance(base, str) and base in ws.results:
        names[method_of(base)] = base
    out: dict = {"perplexity": {k: ws.ppl[n] for k, n in names.items() if n in ws.ppl}}
    agree = {}
    for k, n in names.items():
        if n == DENSE:
            continue
        if n in ws.top1 and DENSE in ws.top1:
            agree[k] = agreement(ws.top1[n], ws.top1[DENSE])
        elif n in getattr(ws, "agreed", {}):
            agree[k] = ws.agreed[n]
    if agree:
        out["top1_agreement"] = agree
    return out


def _config_of(ws, name: str, cfg) -> RunConfig:
    """The settings that made result `name`: its own, else those of the result it recovered, else `cfg`."""
    pruning = ws.results[name]
    settings = pruning.info.get("config")
    base = pruning.info.get("base")
    if not isinstance(settings, dict) and isinstance(base, str) and base in ws.results:
        settings = ws.results[base].info.get("config")
    if isinstance(settings, dict):
        return RunConfig(**settings)
    if cfg is None:
        raise UserError(f"the settings that made {name!r} are not known; it cannot be saved as a run")
    return cfg if isinstance(cfg, RunConfig) else RunConfig(**cfg)


def _bytes_needed(pruning) -> int:
    masks = sum(m.numel() for m in pruning.masks.values()) // 8
    weights = sum(w.numel() * w.element_size() for w in (pruning.weights or {}).values())
    return masks + weights + 2**20


def save_run(root, ws, name: str, *, cfg=None, events=None, metrics: dict | None = None,
             base_run=None) -> Path:
    """Save the workspace result `name` as a new run folder under `root` (created if needed) in the
    CLI's format, and return it. Never replaces anything; a full disk (or an unwritable root) is one
    UserError line and leaves no folder behind. `cfg`: the settings when the result does not carry
    them; `events`: its curve (dicts or StepEvents); `metrics`: more for metrics.json (verification,
    status); `base_run`: the folder of the result a recovered one came from (its recipe then holds
    the `recover` command that remakes it)."""
    root = Path(root).expanduser()
    pruning = ws.results[name]
    method = method_of(name)
    settings = _config_of(ws, name, cfg)
    recovered = method.endswith(RECOVERED)
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
    except OSError as exc:
        raise write_error(exc, root, "saving the run") from exc
    need = _bytes_needed(pruning)
    if free < need:
        raise UserError(f"the disk is full: saving {title(name)} needs about {need / 2**20:.0f} MiB in "
                        f"{str(root)!r}, {free / 2**20:.0f} MiB are free; nothing was saved. Free some space "
                        f"(the result stays in the app until it closes)")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".saving-"))
    try:
        save_masks(tmp / MASKS_FILE, pruning.masks)
        extra = {"result": name, "title": title(name), "saved_by": SAVED_BY}
        if recovered:
            _save_recovered(tmp, ws, name, settings, base_run, extra)
        else:
            save_recipe(tmp, settings, method, extra)
        if events:
            lines = "".join(json.dumps(e.to_dict() if hasattr(e, "to_dict") else dict(e)) + "\n" for e in events)
            _atomic_write(tmp / EVENTS_FILE, lambda t: Path(t).write_text(lines))
        info = {k: v for k, v in pruning.info.items()
                if isinstance(v, (str, int, float, bool)) and k not in ("config", "base")}
        save_json(tmp / METRICS_FILE, {
            **info, "method": method, "result": name, "title": title(name), **(metrics or {}), **scores(ws, name),
            "model": ws.lm.describe(), "data": ws.data.source if ws.data else None,
            "held_out_tokens": int(ws.data.held_out.numel()) if ws.data else None,
            "calibration_tokens": int(ws.data.calibration.numel()) if ws.data else None,
            "saved_by": SAVED_BY, "saved": time.strftime("%Y-%m-%d %H:%M:%S %z"), "complete": True})
        os.chmod(tmp, 0o755)
        return _place(tmp, root, name)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":     # e.g. the disk filled up
            raise write_error(exc, root, "saving the run") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_recovered(tmp: Path, ws, name: str, settings: RunConfig, base_run, extra: dict):
    """recipe.json and weights.safetensors of a recovered result, as `recover --out` writes them."""
    from proxsparse_core.runs.folder import recover_command

    pruning = ws.results[name]
    method = method_of(name)
    base = pruning.info.get("base")
    base_method = method_of(base) if isinstance(base, str) else method.removesuffix(RECOVERED)
    save_weights(tmp / WEIGHTS_FILE, pruning.weights, {"base_method": base_method, "method": method})
    rec = pruning.info.get("recovery") if isinstance(pruning.info.get("recovery"), dict) else {}
    recipe = {"config": settings.to_dict(), "method": method, "base_method": base_method,
              "base_command": reproduce_command(settings, base_method), "recovery": rec,
              "weights": f"{WEIGHTS_FILE} holds the prunable layers' weights after recovery; masks.npz gives "
                         f"the 2:4 pattern (the weights are not the original weights × mask)", **extra}
    if isinstance(base, str):
        recipe["base_result"] = base
    if base_run is not None:
        recipe["base_run"] = str(base_run)
        try:
            recipe["command"] = recover_command(base_run, rec, "RUN_FOLDER")
        except KeyError:                 # settings recorded by an older version: no command
            pass
    save_json(tmp / RECIPE_FILE, recipe)


def update_metrics(folder, more: dict) -> Path:
    """Add `more` to a saved run's metrics.json (its perplexity and agreement tables merged), atomically."""
    folder = Path(folder)
    metrics = read_metrics(folder)
    for k, v in more.items():
        if isinstance(v, dict) and isinstance(metrics.get(k), dict):
            metrics[k] = {**metrics[k], **v}
        else:
            metrics[k] = v
    try:
        return save_json(folder / METRICS_FILE, metrics)
    except OSError as exc:
        raise write_error(exc, folder, "saving the run's metrics") from exc


# ---------------------------------------------------------------------------------- finding and listing
def locate(path) -> tuple[Path, str]:
    """(the folder holding recipe.json and masks.npz, "run" or "export") of a run folder, an export
    folder (its proxsparse/ folder), or a recipe.json inside either; anything else is one line."""
    path = Path(path).expanduser()
    if path.name == RECIPE_FILE and not path.is_dir():
        path = path.parent
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is not a folder on this machine")
    if os.path.lexists(path / RECIPE_FILE):
        kind = "export" if path.name == ARTEFACTS and os.path.lexists(path.parent / "config.json") else "run"
        return path, kind
    if os.path.lexists(path / ARTEFACTS / RECIPE_FILE):
        return path / ARTEFACTS, "export"
    raise UserError(f"{str(path)!r} is neither a run folder (recipe.json and masks.npz, as `learn --out` "
                    f"writes) nor an export folder (with a {ARTEFACTS}/ folder)")


@dataclass
class SavedRun:
    """One entry of the list of saved runs (read from its recipe.json and metrics.json only)."""
    path: Path
    kind: str = "run"                  # run | export
    method: str = ""
    model: str = ""
    status: str = ""
    steps: int | None = None
    perplexity: float | None = None
    dense: float | None = None
    created: float = 0.0
    problem: str = ""                  # why it cannot be opened, if its files say so already

    @property
    def title(self) -> str:
        return title(self.method) if self.method else "?"


def describe_run(path) -> SavedRun:
    """What the list shows of one run or export folder; a broken one says why in `problem`."""
    path = Path(path)
    entry = SavedRun(path)
    try:
        files, entry.kind = locate(path)
        recipe = read_recipe(files)
        metrics = read_metrics(files)
        entry.created = os.stat(files / RECIPE_FILE).st_mtime
    except (UserError, OSError) as exc:
        entry.problem = str(exc)
        return entry
    method = recipe.get("method", "proxsparse")
    entry.method = method if isinstance(method, str) else "?"
    if os.path.lexists(files / WEIGHTS_FILE) and not entry.method.endswith(RECOVERED):
        entry.method += RECOVERED
    model = recipe["config"].get("model")
    entry.model = model if isinstance(model, str) else "?"
    entry.status = metrics.get("status") if isinstance(metrics.get("status"), str) else ""
    steps = metrics.get("steps")
    entry.steps = steps if isinstance(steps, int) and not isinstance(steps, bool) else None
    ppl = metrics.get("perplexity") if isinstance(metrics.get("perplexity"), dict) else {}
    for key in (entry.method, metrics.get("result")):
        if isinstance(key, str) and _number(ppl.get(key)) is not None:
            entry.perplexity = _number(ppl.get(key))
            break
    entry.dense = _number(ppl.get(DENSE))
    return entry


def list_runs(root, limit: int = MAX_LISTED) -> list[SavedRun]:
    """The run and export folders directly under `root`, newest first (at most `limit`); hidden
    folders (a save in progress) are left out. A missing root is an empty list."""
    root = Path(root).expanduser()
    try:
        entries = [p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir()]
    except OSError:
        return []
    runs = [describe_run(p) for p in entries]
    runs = [r for r in runs if not r.problem or "neither a run folder" not in r.problem]
    runs.sort(key=lambda r: (r.created, r.path.name), reverse=True)
    return runs[:limit]


# ---------------------------------------------------------------------------------- opening
@dataclass
class OpenedRun:
    """A saved run or export folder read and checked, before any model is loaded."""
    path: Path                         # the folder as given (the export's root for an export)
    files: Path                        # where recipe.json and masks.npz are
    kind: str                          # run | export
    folder: RunFolder                  # recipe, settings (for this machine), method, masks
    events: list | None = None         # events.jsonl (its curve), if any
    metrics: dict = field(default_factory=dict)
    weights_from: Path | None = None   # an export whose model files hold the result's updated weights
    notes: list[str] = field(default_factory=list)      # what was changed to open it here

    @property
    def tag(self) -> str:
        return tag_of(self.path)


def _device_here(device) -> bool:
    import torch

    if not isinstance(device, str) or device in ("auto", "cpu"):
        return True
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return False
        index = device.partition(":")[2]
        return not index or (index.isdigit() and int(index) < torch.cuda.device_count())
    if device == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return True


def local_overrides(settings: dict) -> tuple[dict, list[str]]:
    """Settings a recipe written elsewhere (a GPU machine) needs changed to open here, and a line for
    each: a device this machine lacks (→ auto, with automatic precision), multi-GPU placement without
    GPUs, a calibration file that is not on this machine (→ the built-in text)."""
    import torch

    over, notes = {}, []
    device = settings.get("device", "auto")
    if not _device_here(device):
        over.update(device="auto", dtype="auto")
        notes.append(f"the run used device {device!r}, which this machine lacks: opened on this machine's "
                     f"device and precision")
    if settings.get("device_map") and not torch.cuda.is_available():
        over.update(device_map="", max_memory="")
    data = settings.get("data", "builtin")
    if isinstance(data, str) and data.strip() not in ("", "builtin", "mix", "generated") and not data.startswith("hf:"):
        try:
            here = Path(data).expanduser().is_file()
        except (OSError, ValueError):
            here = False
        if not here:
            over.update(data="builtin", data_field="")
            notes.append(f"its calibration file {data!r} is not on this machine: the built-in text is used "
                         f"(the perplexities it recorded on its own text are not shown)")
    return over, notes


def _has_model_weights(folder: Path) -> bool:
    return os.path.lexists(folder / MODEL_WEIGHTS) or os.path.lexists(folder / MODEL_INDEX)


def read_saved(path) -> OpenedRun:
    """Read and check a run folder, an export folder or a recipe.json in one (before any model
    loads): its settings adjusted for this machine (local_overrides), masks, curve and metrics.
    Every problem is one UserError line."""
    path = Path(path).expanduser()
    files, kind = locate(path)
    if kind == "export" and files.name == ARTEFACTS and path.name == ARTEFACTS:
        path = files.parent
    over, notes = local_overrides(read_recipe(files)["config"])
    folder = read_run(files, over)
    opened = OpenedRun(path, files, kind, folder, read_events(files), read_metrics(files), notes=notes)
    opened.weights_from = _updated_weights(folder, kind, path)
    return opened


def _updated_weights(folder: RunFolder, kind: str, path: Path) -> Path | None:
    """The export folder whose model files hold the result's updated weights (a recovered or SparseGPT
    export), or None: masks.npz and weights.safetensors say it all (SparseGPT's weights are rebuilt).
    A recovered result whose weights are nowhere is one line (an export's zip of masks and report)."""
    if folder.recovered or not (folder.method.endswith(RECOVERED) or folder.method == "sparsegpt"):
        return None
    root = folder.path.parent
    if kind == "export" and _has_model_weights(root):
        return root
    if folder.method.endswith(RECOVERED):
        raise UserError(f"{str(path)!r} holds the mask of a recovered result but not its recovered weights (a "
                        f"recover folder's {WEIGHTS_FILE}, or an export's model files): open the recover run "
                        f"folder or the whole export folder")
    return None


def export_weights(folder, prunable, masks: dict) -> dict:
    """The prunable layers' weights as an export folder's model files hold them (a recovered or
    SparseGPT result's updated weights), read tensor by tensor and checked like weights.safetensors."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    wanted = {n: n + ".weight" for n in prunable.names}
    if os.path.lexists(folder / MODEL_INDEX):
        index = read_json_file(folder / MODEL_INDEX, MAX_METRICS_BYTES, "a weight index lists tensor names")
        where = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(where, dict):
            raise UserError(f"{MODEL_INDEX} has no weight_map")
    else:
        where = {key: MODEL_WEIGHTS for key in wanted.values()}
    weights, handles = {}, {}
    try:
        for n, key in wanted.items():
            file = where.get(key)
            if not isinstance(file, str) or "/" in file or "\\" in file or file.startswith("."):
                raise UserError(f"the export's model files have no weight {key!r} (or name an odd file for it)")
            if file not in handles:
                try:
                    handles[file] = safe_open(str(check_regular(folder / file)), framework="pt")
                except FileNotFoundError:
                    raise UserError(f"the export's {file} is missing") from None
            if key not in handles[file].keys():
                raise UserError(f"the export's {file} has no weight {key!r}: it is not this model's export")
            weights[n] = handles[file].get_tensor(key)
    except (OSError, SafetensorError) as exc:
        raise UserError(f"the export's model files are not readable safetensors "
                        f"({' '.join(str(exc).split())[:200]})") from None
    return check_weights("the export's model weights", weights, prunable, masks)


def recorded_scores(opened: OpenedRun, ws, keys: list[str] | None = None) -> tuple[float | None, float | None,
                                                                               float | None, str]:
    """(its perplexity, the dense perplexity, its top-1 agreement, why not) as the run's metrics.json
    recorded them — only when they were measured on the very held-out windows `ws` holds (same text
    source, same number of tokens); numbers a file holds are checked (finite, positive). `keys`: the
    names to read instead of the run's own result (e.g. the mask a recovered result recovered)."""
    m = opened.metrics
    ppl = m.get("perplexity") if isinstance(m.get("perplexity"), dict) else {}
    if not ppl:
        return None, None, None, "it recorded no held-out perplexity"
    if ws.data is None or m.get("held_out_tokens") != int(ws.data.held_out.numel()) or m.get("data") != ws.data.source:
        return None, None, None, "it measured perplexity on other held-out text than this one"
    own = not keys
    keys = keys or [k for k in (opened.folder.method, m.get("result")) if isinstance(k, str)]
    mine = next((_number(ppl.get(k), 1.0) for k in keys if _number(ppl.get(k), 1.0) is not None), None)
    agree_table = m.get("top1_agreement") if isinstance(m.get("top1_agreement"), dict) else {}
    agree = next((_number(agree_table.get(k), 0.0, 1.0) for k in keys
                  if _number(agree_table.get(k), 0.0, 1.0) is not None), None)
    if agree is None and own:          # the exported result's own agreement, never another row's
        agree = _number(m.get("top1_agreement_with_dense"), 0.0, 1.0)
    return mine, _number(ppl.get(DENSE), 1.0), agree, ""


# ---------------------------------------------------------------------------------- zips
def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member may not be unpacked (None: a plain file or folder with a safe relative name)."""
    name = info.filename
    if "\x00" in name or "\\" in name:
        return f"{name!r} has a backslash or a NUL byte in its name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return f"{name!r} is an absolute path"
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"{name!r} leads outside its folder (an empty, '.' or '..' part)"
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return f"{name!r} is a symbolic link"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return f"{name!r} is not a plain file"
    if info.flag_bits & 0x1:
        return f"{name!r} is encrypted"
    return None


def _plan(z: zipfile.ZipFile, max_total: int, max_members: int) -> tuple[str, list[zipfile.ZipInfo]]:
    """(the folder in the zip that holds the run, its members to unpack), every member checked."""
    infos = z.infolist()
    if len(infos) > max_members:
        raise UserError(f"the zip holds {len(infos):,} entries; a run or export zip holds a handful (at most "
                        f"{max_members})")
    files, seen = [], set()
    for info in infos:
        problem = _member_problem(info)
        if problem:
            raise UserError(f"the zip was refused: {problem}; nothing was unpacked")
        if info.filename in seen:
            raise UserError(f"the zip was refused: it holds {info.filename!r} twice; nothing was unpacked")
        seen.add(info.filename)
        if not info.is_dir():
            files.append(info)
    recipes = [i for i in files if i.filename.rsplit("/", 1)[-1] == RECIPE_FILE]
    if len(recipes) != 1:
        raise UserError(f"the zip holds {len(recipes)} {RECIPE_FILE} files; a run or export zip holds exactly one "
                        f"(with masks.npz beside it)")
    home = recipes[0].filename[: -len(RECIPE_FILE)]
    take, total = [], 0
    for info in files:
        folder, _, base = info.filename.rpartition("/")
        if folder.split("/")[0] == "__MACOSX" or base in SKIPPED:
            continue
        if base not in RUN_FILES or info.filename != home + base:
            raise UserError(f"the zip was refused: it holds {info.filename!r}, which is not one of a run "
                            f"folder's files ({', '.join(RUN_FILES)}) beside its {RECIPE_FILE}; nothing was unpacked")
        if info.file_size > RUN_FILES[base]:
            raise UserError(f"the zip was refused: its {base} claims {info.file_size:,} bytes, more than a "
                            f"{base} may hold ({RUN_FILES[base]:,}); nothing was unpacked")
        total += info.file_size
        take.append(info)
    if total > max_total:
        raise UserError(f"the zip was refused: it unpacks to {total:,} bytes, more than {max_total:,}; "
                        f"nothing was unpacked")
    if not any(i.filename == home + MASKS_FILE for i in take):
        raise UserError(f"the zip has no {MASKS_FILE} beside its {RECIPE_FILE}")
    return home, take


def _unpack(z: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, cap: int, budget: list[int]):
    """One member into `dest` (a new file in a new folder: nothing is followed or replaced), read in
    chunks and stopped past `cap` or the zip's remaining budget, whatever its header claims."""
    base = info.filename.rpartition("/")[2]
    fd = os.open(dest / base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    written = 0
    with os.fdopen(fd, "wb") as out, z.open(info) as src:
        while True:
            chunk = src.read(2**20)
            if not chunk:
                break
            written += len(chunk)
            if written > cap or written > budget[0]:
                raise UserError(f"the zip was refused: its {base} unpacks to more than it may hold "
                                f"({min(cap, budget[0]):,} bytes); nothing was unpacked")
            out.write(chunk)
    budget[0] -= written


def extract_zip(zip_path, root, *, max_total: int = MAX_ZIP_BYTES, max_members: int = MAX_ZIP_MEMBERS) -> Path:
    """Unpack the run folder a zip holds (a zipped run folder, or an export's zip of masks, recipe and
    report) into a new folder under `root`, named after it, and return that folder. Refused with one
    line, nothing left behind: a path that leaves its folder, a link or special file, a file a run
    folder does not hold, more than one run, a member or a total over its cap, a file that does
    not read back as a run (folder.read_run)."""
    zip_path, root = Path(zip_path), Path(root).expanduser()
    try:
        check_regular(zip_path)
    except FileNotFoundError:
        raise UserError(f"no zip at {str(zip_path)!r}") from None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".unpacking-"))
    except OSError as exc:
        raise write_error(exc, root, "unpacking the zip") from exc
    try:
        with zipfile.ZipFile(zip_path) as z:
            home, take = _plan(z, max_total, max_members)
            need = sum(i.file_size for i in take)
            if shutil.disk_usage(root).free < need + 2**20:
                raise UserError(f"the disk is full: the zip unpacks to {need / 2**20:.0f} MiB and "
                                f"{str(root)!r} has less free; nothing was unpacked")
            budget = [max_total]
            for info in take:
                _unpack(z, info, tmp, RUN_FILES[info.filename.rpartition("/")[2]], budget)
        folder = read_run(tmp, local_overrides(read_recipe(tmp)["config"])[0])   # it reads back as a run, or one line
        _updated_weights(folder, "run", zip_path)                                 # … with its weights
        inside = [p for p in home.rstrip("/").split("/") if p and p != ARTEFACTS]
        name = inside[-1] if inside else zip_path.stem.removesuffix("-artefacts")
        os.chmod(tmp, 0o755)
        return _place(tmp, root, f"unzipped-{slug(name, 40)}")
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, RuntimeError, ValueError,
            zlib.error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"{zip_path.name} is not a readable zip ({why}); nothing was unpacked") from None
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(exc, root, "unpacking the zip") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
