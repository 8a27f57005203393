"""Calibration and held-out text, tokenised into fixed-length samples.

Sources:
* ``builtin`` — English prose that every Python install has offline: the standard library's
  ``pydoc_data.topics``. Topics are sorted by name and dealt in order: a topic is held out while
  the held-out part is under 20% of the text so far, the rest is calibration text; paragraphs
  that repeat across topics are removed from the calibration part, so the two never overlap.
* a ``.txt`` file, or a ``.jsonl`` file with a ``text`` field (or another field you name);
* ``hf:NAME[:CONFIG[:SPLIT[:FIELD]]]`` — a Hugging Face dataset (needs the optional ``datasets``
  package and a reachable hub).

A user file or dataset is split the same way at the document (or paragraph) level.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

HELD_OUT_SHARE = 0.2
MAX_FILE_BYTES = 200 * 1024 * 1024


@dataclass
class TextSplit:
    calibration: str
    held_out: str
    source: str


def _split_documents(docs: list[str], source: str) -> TextSplit:
    docs = [d for d in docs if d and d.strip()]
    if len(docs) < 2:
        raise UserError(f"{source}: not enough text (need at least two documents or paragraphs)")
    # walk the documents in order; a document is held out while the held-out part is under
    # its share of the text seen so far (deterministic, interleaved, ~HELD_OUT_SHARE of the text)
    cal, held, held_chars, seen = [], [], 0, 0
    for d in docs:
        seen += len(d)
        if held_chars < HELD_OUT_SHARE * seen:
            held.append(d)
            held_chars += len(d)
        else:
            cal.append(d)
    # Documents can repeat paragraphs (pydoc topics do): drop from the calibration part every
    # paragraph that also appears in the held-out part, so the two never share text.
    held_paras = {p.strip() for d in held for p in d.split("\n\n") if p.strip()}
    cal = ["\n\n".join(p for p in d.split("\n\n") if p.strip() not in held_paras) for d in cal]
    cal = [d for d in cal if d.strip()]
    if not cal:
        raise UserError(f"{source}: no calibration text left after holding out the evaluation part")
    return TextSplit("\n\n".join(cal), "\n\n".join(held), source)


def builtin_text() -> TextSplit:
    from pydoc_data.topics import topics

    return _split_documents([topics[k] for k in sorted(topics)], "builtin:pydoc_data.topics")


def _read_file(path: Path, field: str) -> list[str]:
    if not path.exists():
        raise UserError(f"data file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"data file {path.name!r} is empty")
    if size > MAX_FILE_BYTES:
        raise UserError(f"data file {path.name!r} is {size / 2**20:.0f} MiB; the limit is "
                        f"{MAX_FILE_BYTES // 2**20} MiB (calibration needs far less text)")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise UserError(f"data file {path.name!r} looks binary; give UTF-8 text (.txt or .jsonl)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"data file {path.name!r} is not UTF-8 text ({exc.reason} at byte {exc.start})")
    if path.suffix.lower() == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                raise UserError(f"{path.name}: line {i} is not a JSON object with a {field!r} field") from None
            except RecursionError:
                raise UserError(f"{path.name}: line {i} is nested too deeply; give one flat JSON object "
                                f"with a {field!r} text field per line") from None
            if not isinstance(value, str):
                raise UserError(f"{path.name}: line {i}: the {field!r} field must be text, "
                                f"not a JSON {type(value).__name__}")
            docs.append(value)
        return docs
    return [p for p in text.split("\n\n")] if text.count("\n\n") >= 1 else text.splitlines()


def _read_hf(spec: str, field: str) -> list[str]:
    parts = spec.split(":")[1:]
    name = parts[0] if parts else ""
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    field = parts[3] if len(parts) > 3 and parts[3] else field
    if not name:
        raise UserError("an HF dataset is written hf:NAME[:CONFIG[:SPLIT[:FIELD]]]")
    try:
        import datasets
    except ImportError:
        raise UserError("HF datasets need the optional package: pip install datasets")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"could not load dataset {name!r} ({type(exc).__name__}); "
                        f"is the hub reachable and the name right?") from exc
    if field not in ds.column_names:
        raise UserError(f"dataset {name!r} has no field {field!r} (fields: {ds.column_names})")
    return [str(t) for t in ds[field][:20000]]


def load_text(source: str = "builtin", field: str = "text") -> TextSplit:
    source = (source or "builtin").strip()
    if source == "builtin":
        return builtin_text()
    if source.startswith("hf:"):
        return _split_documents(_read_hf(source, field), source)
    path = Path(source).expanduser()
    return _split_documents(_read_file(path, field), path.name)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(ids: torch.Tensor, n_samples: int, ctx: int, seed: int) -> torch.Tensor:
    """n_samples windows of ctx tokens at seeded random offsets ([n_samples, ctx])."""
    if ids.numel() < ctx + 1:
        raise UserError(f"the calibration text has {ids.numel()} tokens, fewer than one "
                        f"context of {ctx}; give more text or a shorter context")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - ctx, (n_samples,), generator=g)
    return torch.stack([ids[s:s + ctx] for s in starts.tolist()])


def heldout_windows(ids: torch.Tensor, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ctx tokens from the start of the held-out text."""
    n = ids.numel() // ctx
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"the held-out text has {ids.numel()} tokens, fewer than one window of {ctx}")
    return ids[: n * ctx].view(n, ctx)


@dataclass
class Data:
    """Token ids for one run: calibration samples and held-out windows."""
    calibration: torch.Tensor   # [n_samples, ctx]
    held_out: torch.Tensor      # [n_windows, eval_ctx]
    source: str
    calibration_tokens: int     # tokens in the calibration part of the text
    held_out_tokens: int


def prepare_data(tokenizer, source: str, n_samples: int, ctx: int, seed: int,
                 eval_ctx: int | None = None, eval_windows: int | None = None,
                 field: str = "text") -> Data:
    split = load_text(source, field)
    cal_ids = tokenize(tokenizer, split.calibration)
    held_ids = tokenize(tokenizer, split.held_out)
    return Data(calibration_samples(cal_ids, n_samples, ctx, seed),
                heldout_windows(held_ids, eval_ctx or ctx, eval_windows),
                split.source, cal_ids.numel(), held_ids.numel())
