"""Files of a run folder: masks (bit-packed), recipe, metrics and the event log.

Reading a run folder never trusts its bytes. Every file is opened only if it is a regular file
(after following links: no FIFO, device, socket or folder), what is read is capped whatever the
file claims to hold, and masks.npz is checked field by field before anything is allocated from its
claims (names, shapes, the bit-packed arrays). Any problem is one UserError line naming the file."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from proxsparse_core.config import RunConfig, reproduce_command
from proxsparse_core.errors import UserError
from proxsparse_core.sparsity.masks import pack_masks, shapes_mismatch, unpack_masks
from proxsparse_core.results import LEARNED

MASKS_FILE = "masks.npz"
RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.json"
EVENTS_FILE = "events.jsonl"
MAX_RECIPE_BYTES = 2**20          # a recipe is a few settings; refuse anything larger than 1 MiB
MAX_METRICS_BYTES = 2**24         # metrics.json: a few hundred numbers and lines of text
MAX_EVENTS_BYTES = 2**28          # events.jsonl: one line a step, layer shares every few steps
MAX_MASKS_BYTES = 2**34           # masks.npz: 1 bit a weight, 16 GiB is a 137-billion-weight model
MAX_MASK_META_BYTES = 2**24       # the names and shapes inside masks.npz
MAX_MASK_WEIGHTS = 8 * MAX_MASKS_BYTES
_CHUNK = 2**20


# ---------------------------------------------------------------------------------- reading safely
def _kind(mode: int) -> str | None:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def _not_a_file(path: Path, mode: int) -> UserError:
    return UserError(f"{str(path)!r} is {_kind(mode)}, not a regular file; a run folder holds plain files")


def check_regular(path) -> Path:
    """`path` (links followed) must be a regular file. FileNotFoundError if it does not exist (the
    caller words that); UserError for anything else: a folder, FIFO, device or socket."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UserError(f"cannot read {str(path)!r} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise _not_a_file(path, mode)
    return path


def open_regular(path):
    """A binary file object for `path`, opened only if it is a regular file: checked before it is
    opened (a FIFO or device is never opened) and again on the opened descriptor (O_NONBLOCK, so
    even a file swapped for a FIFO in between cannot block)."""
    path = check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UserError(f"cannot read {str(path)!r} ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_a_file(path, mode)
    return os.fdopen(fd, "rb")


def _read_at_most(f, cap: int) -> bytes:
    """At most cap + 1 bytes of `f`, in chunks (never one allocation of a claimed size)."""
    parts, got = [], 0
    while got <= cap:
        chunk = f.read(min(_CHUNK, cap + 1 - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def read_capped(path, cap: int, what: str) -> bytes:
    """The bytes of the regular file `path`; more than `cap` bytes is one UserError line, whatever
    the file's size claims (a /proc file says 0). FileNotFoundError if it does not exist."""
    path = Path(path)
    try:
        with open_regular(path) as f:
            data = _read_at_most(f, cap)
    except (FileNotFoundError, UserError):
        raise
    except OSError as exc:
        raise UserError(f"cannot read {str(path)!r} ({exc.strerror or exc})") from None
    if len(data) > cap:
        raise UserError(f"{path.name} is larger than {_size(cap)}; {what}")
    return data


def read_json_file(path, cap: int, what: str):
    """A capped JSON file: the parsed value, or one UserError line (bad UTF-8, bad JSON, too deep)."""
    path = Path(path)
    raw = read_capped(path, cap, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise UserError(f"{path.name} is nested too deeply to be a ProxSparse file") from None


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


# ---------------------------------------------------------------------------------- masks.npz
class _BadMasks(Exception):
    """A problem with a mask file's content; load_masks words it as one UserError line."""


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _member_bytes(z: zipfile.ZipFile, member: str, label: str, cap: int, expected: int | None = None) -> bytes:
    """The raw bytes of one .npy member, which must hold a flat uint8 array: its header is read
    and checked (dtype, shape, the length `expected` from the names and shapes) before any data
    is read, and the data is read in chunks up to what the header claims, never allocated from it."""
    from numpy.lib import format as npy

    try:
        info = z.getinfo(member)
    except KeyError:
        raise _BadMasks(f"{member} ({label}) is missing") from None
    with z.open(info) as m:
        version = npy.read_magic(m)
        if version == (1, 0):
            shape, _, dtype = npy.read_array_header_1_0(m)
        elif version == (2, 0):
            shape, _, dtype = npy.read_array_header_2_0(m)
        else:
            raise _BadMasks(f"{label} is in .npy format version {version}, not 1.0 or 2.0")
        if dtype != np.dtype(np.uint8):
            raise _BadMasks(f"{label} is stored as {dtype}, not as bit-packed bytes (uint8)")
        if len(shape) != 1:
            raise _BadMasks(f"{label} has shape {shape}, not a flat row of bit-packed bytes")
        n = shape[0]
        if expected is not None and n != expected:
            raise _BadMasks(f"{label} holds {n:,} bytes; its shape needs exactly {expected:,} (1 bit a weight)")
        if n > cap:
            raise _BadMasks(f"{label} claims {_size(n)}, more than {_size(cap)}")
        data = _read_at_most(m, n)
    if len(data) != n:
        raise _BadMasks(f"{label} holds {len(data):,} bytes of data, its header says {n:,}")
    return data


def _mask_meta(z: zipfile.ZipFile) -> tuple[list[str], list[tuple[int, ...]]]:
    """The names and shapes of masks.npz, every one checked: text names, each once; shapes of
    positive whole numbers."""
    raw = _member_bytes(z, "meta.npy", "its meta", MAX_MASK_META_BYTES)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _BadMasks("its meta is not JSON text") from None
    if not isinstance(meta, dict):
        raise _BadMasks(f"its meta is a JSON {type(meta).__name__}, not an object with names and shapes")
    names, shapes = meta.get("names"), meta.get("shapes")
    if not isinstance(names, list) or not isinstance(shapes, list):
        raise _BadMasks("its meta must hold a list of layer names and a list of shapes")
    if len(names) != len(shapes):
        raise _BadMasks(f"its meta names {len(names)} layers but gives {len(shapes)} shapes")
    for n in names:
        if not isinstance(n, str):
            raise _BadMasks(f"a layer name in its meta is {_short(n)}, not text")
    if len(set(names)) != len(names):
        raise _BadMasks("its meta names a layer twice")
    out = []
    for n, s in zip(names, shapes):
        if (not isinstance(s, list) or not s
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)):
            raise _BadMasks(f"the shape of {_short(n)} is {_short(s)}, not a list of positive whole numbers")
        out.append(tuple(s))
    total = sum(math.prod(s) for s in out)
    if total > MAX_MASK_WEIGHTS:
        raise _BadMasks(f"its shapes claim {total:,} weights, more than any model it could fit")
    return names, out


def load_masks(path, expect: dict | None = None) -> dict[str, torch.Tensor]:
    """The masks of a run folder (or of a masks.npz file): layer name → bool tensor. The one
    reader of mask files. `expect` (layer name → weight shape, e.g. of the loaded model) is
    checked against the file's names and shapes before any mask is read. Anything wrong with the
    file is one UserError line naming it; pickled or non-uint8 members are never loaded."""
    path = Path(path)
    if path.is_dir():
        path = path / MASKS_FILE
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise UserError(f"no mask file at {str(path)!r}") from None
    try:
        with f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MASKS_BYTES:
                raise _BadMasks(f"it is {_size(size)}, more than {_size(MAX_MASKS_BYTES)}")
            with zipfile.ZipFile(f) as z:
                names, shapes = _mask_meta(z)
                if expect is not None:
                    problem = shapes_mismatch(dict(zip(names, shapes)), expect)
                    if problem:
                        raise UserError(f"{path.name}: {problem}")
                packed = {}
                for i, (n, s) in enumerate(zip(names, shapes)):
                    packed[n] = np.frombuffer(_member_bytes(z, f"m{i}.npy", f"the mask of {_short(n)}", MAX_MASKS_BYTES,
                                                            math.ceil(math.prod(s) / 8)), dtype=np.uint8)
    except _BadMasks as exc:
        raise UserError(f"{path.name} is not a valid ProxSparse mask file: {exc}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, RuntimeError,
            NotImplementedError, zlib.error) as exc:
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"{path.name} is not a valid ProxSparse mask file ({why})") from None
    return unpack_masks(packed, dict(zip(names, shapes)))


# ---------------------------------------------------------------------------------- json files
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
    anything else is one clear line: a missing, huge, non-UTF-8, malformed or too deeply nested
    file, or one that is not a regular file (a FIFO, a device)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECIPE_FILE
    try:
        recipe = read_json_file(path, MAX_RECIPE_BYTES,
                                f"a recipe is at most {MAX_RECIPE_BYTES // 2**20} MiB (it holds a few settings)")
    except FileNotFoundError:
        raise UserError(f"no recipe at {str(path)!r}") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path.name} is not a ProxSparse recipe: it holds a JSON {type(recipe).__name__}, "
                        f"not an object with a \"config\"")
    if not isinstance(recipe.get("config"), dict):
        raise UserError(f"{path.name} is not a ProxSparse recipe: \"config\" must be an object of settings")
    return recipe


def load_recipe(path) -> RunConfig:
    return RunConfig.from_dict(read_recipe(path)["config"])


def read_metrics(folder) -> dict:
    """A run folder's metrics.json as a dict: {} when it is missing or its content is not a JSON
    object (it only informs). A file that is not a regular file, or is larger than 16 MiB, is one
    UserError line."""
    path = Path(folder) / METRICS_FILE
    try:
        raw = read_capped(path, MAX_METRICS_BYTES, "metrics.json holds a few numbers and lines of text")
    except FileNotFoundError:
        return {}
    try:
        metrics = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


_EVENT_NUMBERS = ("lm_loss", "loss", "share_24")
_EVENT_OPTIONAL = ("l2_term", "heldout_loss_24", "heldout_loss_dense")


def _event_problem(e) -> str | None:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if not isinstance(e, dict):
        return f"it is a JSON {type(e).__name__}, not an object"
    if not (isinstance(e.get("step"), int) and not isinstance(e.get("step"), bool) and e["step"] >= 0):
        return "its step is not a whole number ≥ 0"
    for k in _EVENT_NUMBERS:
        if not number(e.get(k)):
            return f"its {k} is not a number"
    for k in _EVENT_OPTIONAL:
        if e.get(k) is not None and not number(e[k]):
            return f"its {k} is not a number"
    hist = e.get("nnz_hist")
    if not (isinstance(hist, list) and len(hist) == 5
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in hist)):
        return "its nnz_hist is not 5 counts"
    if not isinstance(e.get("objective", "lm"), str):
        return "its objective is not text"
    return None


def read_events(folder) -> list[dict] | None:
    """A run folder's events.jsonl as a list of step dicts (None when there is none), each line
    checked for what the report's plots read; anything wrong is one UserError line."""
    path = Path(folder) / EVENTS_FILE
    try:
        raw = read_capped(path, MAX_EVENTS_BYTES, "an event log holds one short line a step")
    except FileNotFoundError:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    events = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path.name} line {i} is not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise UserError(f"{path.name} line {i} is nested too deeply") from None
        problem = _event_problem(e)
        if problem:
            raise UserError(f"{path.name} line {i} is not a ProxSparse step event: {problem}")
        events.append(e)
    return events


def save_events(path: Path, events) -> Path:
    lines = "".join(json.dumps(e.to_dict()) + "\n" for e in events)
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(lines))
    return Path(path)


def os_message(exc: OSError, where: Path, doing: str = "exporting") -> UserError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text = f"the disk is full while {doing} to {str(where)!r}"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text = f"cannot write to {str(where)!r} ({(exc.strerror or str(exc)).lower()})"
    else:
        text = f"cannot write the export to {str(where)!r}: {exc.strerror or exc}"
    return UserError(text + "; nothing was written. Free some space or choose another folder.")


def write_error(exc: Exception, where: Path, doing: str = "exporting") -> UserError:
    """One line for a failed write: an OSError, or safetensors' SafetensorError, which carries the
    operating system's error only in its text ("… No space left on device (os error 28)")."""
    if isinstance(exc, OSError):
        return os_message(exc, where, doing)
    text = " ".join(str(exc).split())
    m = re.search(r"os error (\d+)", text)
    if m:
        code = int(m.group(1))
        return os_message(OSError(code, os.strerror(code)), where, doing)
    return UserError(f"cannot write to {str(where)!r} while {doing} ({text[:200]}); nothing was written")
