"""Every command a user has, on tiny random models of many architectures: does any of them fail,
crash or claim 2:4 where it is not?

For each architecture a random model of a few million weights (the bundled model's tokenizer) is saved
as a local folder, then the CLI runs, each step in its own process, as a user would:
learn (3 steps) → prune --method sparsegpt → recover --method both (3 steps) → export → the export loaded
with `transformers`. A row says which step failed (with the CLI's one error line), the share of the
decoder blocks' weights that no mask covers (`left_dense` in the export's metrics.json), and the share
that is 2:4 in the export as plain `transformers` loads it (counted on the tensors, not taken from the
studio's word).

    python bench/architectures.py                       # every architecture below, 2 at a time
    python bench/architectures.py gpt2 mixtral          # some of them
    python bench/architectures.py --out /tmp/arch        # where folders and runs go (default: a temp folder)

The models are random: the perplexities mean nothing, only that every step ran and what it claimed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
MOE = dict(num_experts_per_tok=2)
# name: (config class, model class, config keywords); classes by name so that a transformers without one
# only loses that row
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", BASE),
    "mistral": ("MistralConfig", "MistralForCausalLM", BASE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", BASE),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(BASE, head_dim=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(BASE, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(BASE, num_key_value_heads=4, pad_token_id=0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", BASE),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", BASE),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", BASE),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", BASE),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                num_attention_heads=4, word_embed_proj_dim=64,
                                                max_position_embeddings=512)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(BASE, num_key_value_heads=4)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=64, n_layer=2, n_head=4,
                                                                     n_positions=512)),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                            n_positions=512, n_ctx=512)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=2, n_head=4)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=512)),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2)),
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=1, lru_width=64, head_dim=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(BASE, num_local_experts=4, **MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(BASE, moe_intermediate_size=64, num_experts=4,
                                                                head_dim=16, **MOE)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(BASE, num_experts=4, **MOE)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(BASE, moe_intermediate_size=64, num_experts=4,
                                                                shared_expert_intermediate_size=64, **MOE)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(BASE, num_local_experts=4, **MOE)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(BASE, num_local_experts=4, head_dim=16, **MOE)),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(BASE, num_local_experts=4, head_dim=16,
                                                             intermediate_size_mlp=128, num_experts_per_tok=1)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(BASE, num_key_value_heads=4, moe_intermediate_size=64, n_routed_experts=4,
                         n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                         qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8, n_group=1, topk_group=1, **MOE)),
}
SMALL = ["--device", "cpu", "--dtype", "float32", "--samples", "8", "--ctx", "32", "--eval-ctx", "64",
         "--eval-windows", "4"]


def make(name: str, folder: Path, tokenizer) -> str:
    """Save a random `name` model with `tokenizer` in `folder`; '' or why it could not be built."""
    import torch
    import transformers
    cfg_name, model_name, kw = ARCHS[name]
    try:
        cfg = getattr(transformers, cfg_name)(vocab_size=len(tokenizer), **kw)
        torch.manual_seed(0)
        getattr(transformers, model_name)(cfg).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - a row, not a crash
        return f"not built here: {type(exc).__name__}: {str(exc)[:120]}"
    return ""


def _cli(*args) -> tuple[bool, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PROXSPARSE_TRACEBACK": "0"}
    try:
        p = subprocess.run([sys.executable, "-m", "proxsparse_core", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return False, "still running after 900 s (stopped)"      # a row, not the end of the sweep
    errors = [line for line in (p.stderr + p.stdout).splitlines() if line.startswith(("error:", "Traceback"))]
    return p.returncode == 0, (errors[0] if errors else (p.stderr.strip().splitlines() or [""])[-1])[:200]


def probe(name: str, out: Path, tokenizer) -> dict:
    folder, runs = out / name, out / "runs" / name
    row = {"architecture": name}
    why = make(name, folder, tokenizer)
    if why:
        return {**row, "failed": "build", "why": why}
    steps = [("learn", ["learn", "--model", str(folder), *SMALL, "--steps", "3", "--lambda1", "0.1", "--lr", "1e-3",
                        "--out", str(runs / "learn"), "--overwrite"]),
             ("sparsegpt", ["prune", "--model", str(folder), *SMALL, "--method", "sparsegpt",
                            "--out", str(runs / "sgpt"), "--overwrite"]),
             ("recover", ["recover", "--run", str(runs / "learn"), "--method", "both", "--steps", "3",
                          "--samples", "8", "--out", str(runs / "rec"), "--overwrite"]),
             ("export", ["export", "--run", str(runs / "rec"), "--out", str(runs / "export"), "--overwrite"])]
    for step, args in steps:
        ok, line = _cli(*args)
        if not ok:
            return {**row, "failed": step, "why": line}
    p = subprocess.run([sys.executable, "-c", SHARE_24, str(runs / "export")], capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode:
        return {**row, "failed": "load export", "why": (p.stderr.strip().splitlines() or [""])[-1][:200]}
    metrics = json.loads((runs / "export" / "proxsparse" / "metrics.json").read_text())
    left = metrics.get("left_dense") or {}
    return {**row, "failed": "", "layers": metrics.get("mask_stats", {}).get("layers"),
            "left_dense_share": left.get("share_of_block_weights", 0.0),
            "share_24": float(p.stdout.split()[-1])}


# run on the export, loaded with plain transformers: the share of the decoder blocks' weight matrices
# (≥ 2-D) that are 2:4 along one of their last two dimensions (a fused expert tensor [experts, out, in] along
# its inputs, a Conv1D [in, out] along its first)
SHARE_24 = """
import sys, transformers
from proxsparse_core.sparsity.prunable import find_decoder_blocks
def is24(t):
    return t.shape[-1] % 4 == 0 and bool(((t.reshape(-1, 4) != 0).sum(-1) <= 2).all())
_, blocks = find_decoder_blocks(transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]))
total = sparse = 0
for p in (p for b in blocks for p in b.parameters() if p.dim() >= 2):
    total += p.numel()
    sparse += p.numel() if is24(p.detach()) or is24(p.detach().transpose(-1, -2).contiguous()) else 0
print(sparse / total)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"architectures (default: all of {', '.join(ARCHS)})")
    ap.add_argument("--out", default="")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    unknown = [n for n in args.names if n not in ARCHS]
    if unknown:
        ap.error(f"unknown architecture(s): {', '.join(unknown)}")
    from transformers import AutoTokenizer

    from proxsparse_core.models.loading import bundled_folder
    tokenizer = AutoTokenizer.from_pretrained(bundled_folder())
    out = Path(args.out or tempfile.mkdtemp(prefix="ps-arch-"))
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda n: probe(n, out, tokenizer), args.names or list(ARCHS)))
    print("| architecture | result | prunable layers | blocks' weights left dense (metrics) | 2:4 in the export |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        result = "every step ran" if not r["failed"] else f"**{r['failed']} failed**: {r['why']}"
        shares = ("", "") if r["failed"] else (format(r["left_dense_share"], ".1%"), format(r["share_24"], ".1%"))
        print(f"| {r['architecture']} | {result} | {r.get('layers', '')} | {shares[0]} | {shares[1]} |")
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
