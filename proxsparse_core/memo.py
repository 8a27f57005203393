"""What the dense model computes that never changes, kept on disk so that a second run (or a second
start of the app) reads it instead of computing it again: the held-out perplexity and top-1
predictions of the dense model, the calibration channel norms of score "activation", the held-out
loss the learner draws its dense line from, and tokenised text.

Every entry is filed under a hash of everything its value depends on: the model's weights, buffers
and configuration (`model_fingerprint`), the token ids it reads, the settings of the computation,
the device kind and thread count, and the versions of torch and transformers. Change any of them
and the key changes, so a stale value is never read; it is simply never asked for again. A file
that cannot be read (cut short, from another version) counts as absent. Writing is best-effort
and atomic: a full or read-only disk only means the value is computed next time too.

Files live under `paths.cache_dir() / "memo"` (or `$PROXSPARSE_MEMO_DIR`); set `PROXSPARSE_MEMO=0`
to read and write none. A model is cached only while all its weights are on the CPU: there its dense
results are slow to compute and its weights quick to hash; on a GPU the reverse holds.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Callable

import torch

from proxsparse_core.paths import cache_dir

FORMAT = 1                      # bump when what an entry holds changes
MAX_ENTRY_BYTES = 256 * 2**20   # larger values are computed each time rather than kept
MAX_ENTRIES = 1024              # per kind, and at most MAX_KIND_BYTES: the least recently used go first
MAX_KIND_BYTES = 128 * 2**20
_CHUNK = 16 * 2**20             # bytes of a tensor hashed at a time (a GPU tensor is copied in pieces)


def enabled() -> bool:
    return os.environ.get("PROXSPARSE_MEMO", "1") != "0"


def folder() -> Path:
    """`$PROXSPARSE_MEMO_DIR`, else the cache folder's memo/."""
    own = os.environ.get("PROXSPARSE_MEMO_DIR")
    return Path(own) if own else cache_dir() / "memo"


def _feed(h, value) -> None:
    """Add `value` to hash `h` unambiguously: its type, its length and its content."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        flat = t.reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        per = max(1, _CHUNK // max(1, flat.element_size()))
        for i in range(0, flat.numel(), per):
            part = flat[i:i + per].cpu()
            # viewed as bytes, so every dtype (bfloat16 too) hashes by its exact bits
            h.update(memoryview(part.view(torch.uint8).numpy()) if part.numel() else b"")
    elif isinstance(value, (bytes, bytearray)):
        h.update(b"B%d:" % len(value))
        h.update(value)
    elif isinstance(value, str):
        data = value.encode()
        h.update(b"S%d:" % len(data))
        h.update(data)
    elif isinstance(value, (list, tuple)):
        h.update(b"L%d:" % len(value))
        for v in value:
            _feed(h, v)
    elif isinstance(value, dict):
        h.update(b"D%d:" % len(value))
        for k in sorted(value, key=str):
            _feed(h, str(k))
            _feed(h, value[k])
    elif value is None or isinstance(value, (bool, int, float)):
        _feed(h, repr(value))
    else:
        raise TypeError(f"cannot hash a {type(value).__name__} into a cache key")


def digest(*parts) -> str:
    """A hex key of `parts` (tensors by dtype, shape and exact bits; strings, numbers, lists, dicts)."""
    h = hashlib.sha256()
    _feed(h, list(parts))
    return h.hexdigest()


def environment(device: torch.device | str) -> list:
    """What a computation's exact numbers depend on beyond its inputs: the versions of torch and
    transformers, the device kind (and GPU name) and the CPU thread count."""
    import transformers

    device = torch.device(device)
    where = str(device.type)
    if device.type == "cuda" and torch.cuda.is_available():
        where += ":" + torch.cuda.get_device_name(device)
    return [torch.__version__, transformers.__version__, where, torch.get_num_threads()]


def source_of(*objs) -> str:
    """A hash of the source code of `objs` (the functions and classes that compute a value), so that
    values computed by code that has changed since are not read. An edit elsewhere in their files
    does not count. Without the source (a build without .py files) their qualified names count."""
    import inspect

    parts = []
    for obj in objs:
        try:
            parts.append(inspect.getsource(obj))
        except (TypeError, OSError):
            parts.append(f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}")
    return digest(*parts)


_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def model_fingerprint(model) -> str:
    """A hash of a model's class, configuration (less the folder it was read from) and the exact
    bits of every parameter and buffer. Computed once per model object and kept for its lifetime:
    call it only while the model holds its dense weights (a workspace's model always rests so)."""
    with _LOCK:
        known = _FINGERPRINTS.get(model)
    if known is not None:
        return known
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    conf = {}
    if config is not None:
        conf = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
        conf["attn"] = getattr(config, "_attn_implementation", None)
    _feed(h, [type(model).__name__, json.dumps(conf, sort_keys=True, default=str)])
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        _feed(h, name)
        _feed(h, t)
    fp = h.hexdigest()
    with _LOCK:
        _FINGERPRINTS[model] = fp
    return fp


_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of everything a fast (Rust-backed) tokenizer's encoding of plain text depends on: its
    whole serialised definition (normaliser, pre-tokeniser, vocabulary and merges, added tokens),
    its class and the library versions. None for any other tokenizer: its output is never cached."""
    try:
        known = _TOKENIZERS.get(tokenizer)
    except TypeError:                     # not weakly referable: computed each time
        known = None
    if known is not None:
        return known
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    try:
        import tokenizers
        import transformers

        fp = digest(type(tokenizer).__name__, backend.to_str(), getattr(tokenizer, "split_special_tokens", None),
                    tokenizers.__version__, transformers.__version__)
    except Exception:  # noqa: BLE001 - a tokenizer that cannot describe itself is not cached
        return None
    try:
        _TOKENIZERS[tokenizer] = fp
    except TypeError:
        pass
    return fp


def forget(model) -> None:
    """Drop the kept fingerprint of `model` (its weights were changed on purpose)."""
    with _LOCK:
        _FINGERPRINTS.pop(model, None)


def _path(kind: str, key: str) -> Path:
    return folder() / kind / f"{key}.pt"


def load(kind: str, key: str):
    """The value stored under (kind, key), or None."""
    if not enabled():
        return None
    path = _path(kind, key)
    try:
        if not path.is_file():
            return None
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable entry is an absent one
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
        return None
    try:
        os.utime(path)                  # read now: the last to go when the kind is trimmed
    except OSError:
        pass
    return entry.get("value")


def save(kind: str, key: str, value) -> None:
    """Store `value` (tensors, numbers, strings, and lists/dicts of them) under (kind, key), atomically;
    a failure to write is only a warning."""
    if not enabled():
        return
    path = _path(kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"format": FORMAT, "key": key, "value": value}, f)
            if os.path.getsize(tmp) > MAX_ENTRY_BYTES:
                os.unlink(tmp)
                return
            os.replace(tmp, path)
            _trim(path.parent)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation, never a failure
        warnings.warn(f"could not keep a cached result in {path.parent} ({exc!s:.200})")


def _trim(kind_folder: Path) -> None:
    """Keep the most recently written or read entries of a kind, at most MAX_ENTRIES of them and
    MAX_KIND_BYTES together (the newest always stays): the memo never grows without bound, and trying
    other models does not push out the values of the one shown every day."""
    sized = []
    for p in kind_folder.glob("*.pt"):
        if p.name.startswith("."):
            continue
        try:
            st = p.stat()
        except OSError:
            continue
        sized.append((st.st_mtime, st.st_size, p))
    sized.sort(key=lambda x: -x[0])
    total = 0
    for i, (_, size, p) in enumerate(sized):
        total += size
        if i and (i >= MAX_ENTRIES or total > MAX_KIND_BYTES):
            try:
                p.unlink()
            except OSError:
                pass


def cached(kind: str, key: str, compute: Callable[[], object]):
    """The value under (kind, key); computed by `compute()` and stored when there is none."""
    value = load(kind, key)
    if value is None:
        value = compute()
        save(kind, key, value)
    return value


class ModelMemo:
    """The cache of one model's dense results: `memo.cached(kind, inputs, compute)` files the value
    of `compute()` under the model's fingerprint, `inputs` (token ids, settings) and the environment
    of the model's device. Entries of another model, other inputs or another environment are never
    read."""

    def __init__(self, model):
        self.model = model
        self.hits = 0                 # entries read instead of computed (the tests read it)
        # only a model wholly on the CPU (not split over devices, nothing on the meta device)
        self.usable = all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))

    def key(self, kind: str, *inputs) -> str | None:
        """The entry's key, or None when this model cannot be cached."""
        if not (self.usable and enabled()):
            return None
        try:
            device = next(self.model.parameters()).device
            return digest(FORMAT, kind, model_fingerprint(self.model), environment(device), list(inputs))
        except (RuntimeError, NotImplementedError, TypeError, ValueError, StopIteration):
            self.usable = False
            return None

    def lookup(self, kind: str, *inputs):
        key = self.key(kind, *inputs)
        value = load(kind, key) if key is not None else None
        if value is not None:
            self.hits += 1
        return value

    def store(self, kind: str, value, *inputs) -> None:
        key = self.key(kind, *inputs)
        if key is not None:
            save(kind, key, value)

    def cached(self, kind: str, inputs: tuple, compute: Callable[[], object]):
        value = self.lookup(kind, *inputs)
        if value is None:
            value = compute()
            self.store(kind, value, *inputs)
        return value
