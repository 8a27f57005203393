"""Calibration and held-out text, tokenised into fixed-length samples.

Sources:
* ``mix`` — half the built-in text below, half text the dense model writes itself from a fixed
  list of varied instructions (selfgen.py): the model's own kind of language (chat answers,
  prose, lists) rather than one document's, so a mask learned on it transfers to other text;
* ``generated`` — only the model's own text;
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

from proxsparse_core import memo
from proxsparse_core.errors import UserError

HELD_OUT_SHARE = 0.2
GENERATED_SOURCES = ("mix", "generated")   # calibration text written by the dense model itself
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
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                      (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if raw.startswith(bom):
            raise UserError(f"data file {path.name!r} is {name} text; save it as UTF-8 (.txt or .jsonl)")
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
    """The text's token ids, without special tokens (those are added per window, see special_prefix).
    For a fast tokenizer they are kept on disk under a hash of the tokenizer and the text (memo.py),
    so the same text is tokenised once."""
    def encode():
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)
    fp = memo.tokenizer_fingerprint(tokenizer) if memo.enabled() else None
    if fp is None:
        return encode()
    key = memo.digest("tokens", memo.FORMAT, fp, text, memo.source_of(tokenize))   # (encode is inside it)
    ids = memo.load("tokens", key)
    if isinstance(ids, torch.Tensor):
        return ids.long()
    ids = encode()
    if ids.numel() == 0 or int(ids.max()) < 2**31:      # kept as int32: half the file
        memo.save("tokens", key, ids.int())
    return ids


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text by its own convention (e.g. Gemma's and
    Llama's start-of-text token; none for SmolLM2). Every calibration sample and held-out window
    starts with them, as the model saw text in training: some models depend on it (Gemma's
    held-out perplexity is ~4× worse without its <bos>)."""
    probe = "Hello"
    try:
        with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
        plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer without special-token support has no prefix
        return []
    if not plain:
        return []
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return with_special[:i]
    return []


def _with_prefix(windows: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    if not prefix:
        return windows
    head = torch.tensor(prefix, dtype=windows.dtype).expand(windows.shape[0], len(prefix))
    return torch.cat([head, windows], dim=1)


def calibration_samples(ids: torch.Tensor, n_samples: int, ctx: int, seed: int,
                        prefix: list[int] | None = None) -> torch.Tensor:
    """n_samples windows of ctx tokens at seeded random offsets ([n_samples, ctx]); each starts
    with `prefix` (the tokenizer's start-of-text tokens) followed by ctx − len(prefix) text tokens."""
    prefix = prefix or []
    body = ctx - len(prefix)
    if body < 1 or ids.numel() < body + 1:
        raise UserError(f"the calibration text has {ids.numel()} tokens, fewer than one "
                        f"context of {ctx}; give more text or a shorter context")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (n_samples,), generator=g)
    return _with_prefix(torch.stack([ids[s:s + body] for s in starts.tolist()]), prefix)


def heldout_windows(ids: torch.Tensor, ctx: int, max_windows: int | None = None,
                    prefix: list[int] | None = None) -> torch.Tensor:
    """Non-overlapping windows of ctx tokens from the start of the held-out text (each starting
    with `prefix`, the tokenizer's start-of-text tokens)."""
    prefix = prefix or []
    body = ctx - len(prefix)
    n = ids.numel() // body if body > 0 else 0
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"the held-out text has {ids.numel()} tokens, fewer than one window of {ctx}")
    return _with_prefix(ids[: n * body].view(n, body), prefix)


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
                 field: str = "text", model=None) -> Data:
    """Calibration samples and held-out windows for `source`.

    ``mix`` (and ``generated``) add text the dense model writes itself (selfgen.py; needs
    `model`): half the calibration samples come from it, half from the built-in documentation.
    Held-out windows always come from a text's held-out part, never from generated text."""
    prefix = special_prefix(tokenizer)
    mode = (source or "builtin").strip()
    split = load_text("builtin" if mode in GENERATED_SOURCES else mode, field)
    held_ids = tokenize(tokenizer, split.held_out)
    held = heldout_windows(held_ids, eval_ctx or ctx, eval_windows, prefix)
    samples, name, tokens = _calibration(tokenizer, mode, split, n_samples, ctx, seed, prefix, model)
    return Data(samples, held, name, tokens, held_ids.numel())


def calibration_only(tokenizer, source: str, n_samples: int, ctx: int, seed: int, field: str = "text",
                     model=None) -> torch.Tensor:
    """n_samples calibration samples of `source`, drawn exactly as prepare_data draws them (same
    split, so never from the held-out part). Recovery reads more samples than learning does."""
    mode = (source or "builtin").strip()
    split = load_text("builtin" if mode in GENERATED_SOURCES else mode, field)
    return _calibration(tokenizer, mode, split, n_samples, ctx, seed, special_prefix(tokenizer), model)[0]


def with_fresh_text(tokenizer, source: str, n_samples: int, ctx: int, seed: int, field: str,
                    fresh: torch.Tensor) -> torch.Tensor:
    """n_samples samples for a recovery that reads fresh model-written text (`fresh`, token ids):
    drawn uniformly over one pool of the run source's calibration text and the fresh text, so each
    part gets samples in proportion to its tokens. The fresh text takes the place of the text the
    model wrote for `mix` and `generated` (their human-written part is the built-in text, none)."""
    mode = (source or "builtin").strip()
    prefix = special_prefix(tokenizer)
    if mode == "generated":
        return calibration_samples(fresh, n_samples, ctx, seed, prefix)
    own = tokenize(tokenizer, load_text("builtin" if mode in GENERATED_SOURCES else mode, field).calibration)
    n_own = round(n_samples * own.numel() / (own.numel() + fresh.numel()))
    parts = [calibration_samples(own, n_own, ctx, seed, prefix)] if n_own else []
    if n_samples > n_own:
        parts.append(calibration_samples(fresh, n_samples - n_own, ctx, seed, prefix))
    return torch.cat(parts)


def _calibration(tokenizer, mode: str, split: TextSplit, n_samples: int, ctx: int, seed: int,
                 prefix: list[int], model) -> tuple[torch.Tensor, str, int]:
    """(samples [n_samples, ctx], a name for their source, tokens in the text they come from)."""
    cal_ids = tokenize(tokenizer, split.calibration)
    if mode not in GENERATED_SOURCES:
        return calibration_samples(cal_ids, n_samples, ctx, seed, prefix), split.source, cal_ids.numel()
    if model is None:
        raise UserError(f"data {mode!r} needs the model to write its own calibration text")
    from proxsparse_core.data.selfgen import generated_ids

    n_gen = n_samples if mode == "generated" else n_samples // 2
    gen_ids = generated_ids(model, tokenizer, tokens=n_gen * ctx, seed=seed)
    parts = [calibration_samples(gen_ids, n_gen, ctx, seed, prefix)]
    if n_samples - n_gen:
        parts.insert(0, calibration_samples(cal_ids, n_samples - n_gen, ctx, seed, prefix))
    name = ("text the model wrote itself" if mode == "generated"
            else f"{split.source} + text the model wrote itself")
    return torch.cat(parts), name, cal_ids.numel() + gen_ids.numel()
