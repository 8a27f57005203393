"""Time a learning step of a mixture-of-experts model at a real model's layer widths.

The studio prunes every expert of a MoE as its own `nn.Linear` (proxsparse_core/sparsity/experts.py),
so a step runs the prox once per expert and projection: a Qwen3-30B-A3B-shaped block (128 experts,
hidden 2048, expert width 768) has 256 prunable expert layers. This builds a random model with those
widths and a few blocks, learns a few steps with the CLI and prints the phases of each step as the
learner reports them (forward + backward, AdamW, prox), so that the prox's share of a MoE step can be
compared with a dense model's: `--dense` builds the twin with as many MLP weights in three layers a
block, so the difference between the two proxes is the cost of many small layers.

    python bench/moe_step.py --device cuda --dtype bfloat16            # 2 blocks × 128 experts
    python bench/moe_step.py --device cuda --dtype bfloat16 --dense    # its dense twin
    python bench/moe_step.py --device cpu --experts 8 --hidden 256 --inner 128 --steps 3   # a smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxsparse_core.runs.files import read_events  # noqa: E402


def build(folder: Path, layers: int, experts: int, top_k: int, hidden: int, inner: int, dense: bool) -> str:
    """Save a random Qwen3-MoE model with the bundled tokenizer, or (dense) its dense twin: a Qwen3 whose
    MLP has as many weights as all the experts together, in three layers a block; returns what it is."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from proxsparse_core.models.loading import bundled_folder

    tok = AutoTokenizer.from_pretrained(bundled_folder())
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, head_dim=128,
                  num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
                  tie_word_embeddings=True)
    if dense:
        model = Qwen3ForCausalLM(Qwen3Config(intermediate_size=experts * inner, **common))
        what = f"dense twin: MLP width {experts * inner}, 3 MLP layers a block"
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=inner, intermediate_size=4 * inner,
                                                   num_experts=experts, num_experts_per_tok=top_k,
                                                   decoder_sparse_step=1, mlp_only_layers=[], **common))
        what = f"{experts} experts (top {top_k}), expert width {inner}: {2 * experts} expert layers a block"
    torch.manual_seed(0)
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return what


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inner", type=int, default=768)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dense", action="store_true", help="the dense twin instead (as many MLP weights in 3 layers)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "moe"
        what = build(folder, args.layers, args.experts, args.top_k, args.hidden, args.inner, args.dense)
        cmd = [sys.executable, "-m", "proxsparse_core", "learn", "--model", str(folder), "--device", args.device,
               "--dtype", args.dtype, "--data", "builtin", "--samples", "16", "--ctx", "128", "--batch",
               str(args.batch), "--steps", str(args.steps), "--lambda1", "0.1", "--lr", "1e-3", "--no-eval",
               "--out", str(Path(tmp) / "run")]
        out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        events = read_events(Path(tmp) / "run") or []
    rows = [(e["step"], e["t_fwd_bwd"], e["t_opt"], e["t_prox"]) for e in events if "t_prox" in e]
    if out.returncode or not rows:
        print(out.stdout[-2000:], out.stderr[-2000:])
        return 1
    later = [r for r in rows if r[0] >= 3] or rows        # the first steps warm up kernels and caches
    med = [statistics.median(r[i] for r in later) for i in (1, 2, 3)]
    print(f"{args.layers} blocks, hidden {args.hidden}, {what}; {args.dtype} on {args.device}, batch {args.batch} × "
          f"128 tokens")
    print(f"median of steps {int(later[0][0])}–{int(later[-1][0])}: fwd+bwd {med[0] * 1e3:.1f} ms, AdamW {med[1] * 1e3:.1f} ms, "
          f"prox {med[2] * 1e3:.1f} ms (prox / AdamW {med[2] / max(med[1], 1e-9):.2f}, prox share of the step "
          f"{med[2] / sum(med):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
