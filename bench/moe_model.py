"""A mixture-of-experts model with real weights, offline: the bundled SmolLM2-135M "upcycled" to Mixtral.

No mixture-of-experts checkpoint is available offline here, so this builds one from the bundled model:
attention, norms and embeddings copied, the MLP of every block copied into E experts (each with its
own small perturbation, so that their masks can differ), and a random router choosing the top k.
Mixtral renormalises the k routing weights to sum 1, so with near-identical experts the model computes
nearly what the dense one does, and its held-out perplexity is close to SmolLM2's; the experts then see
different tokens, which is what exercises the studio's per-expert pruning on real text.

    python bench/moe_model.py --out /tmp/moe-smol            # 4 experts, top 2, noise 1 % of rms
    python bench/quality.py --device cpu --preset quick-demo --set "model=/tmp/moe-smol seed=0" ...

Random routing is not a trained model's: this says whether pruning works and how the methods rank on a
real-weights MoE, not how a trained MoE prunes.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from proxsparse_core.models.loading import bundled_folder  # noqa: E402


def upcycle(experts: int, top_k: int, noise: float, seed: int):
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(bundled_folder(), dtype=torch.float32)
    c = dense.config
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                        rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters,
                        tie_word_embeddings=c.tie_word_embeddings, num_local_experts=experts,
                        num_experts_per_tok=top_k, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                        pad_token_id=c.pad_token_id, hidden_act=c.hidden_act)
    moe = MixtralForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moe.model.embed_tokens.weight.copy_(dense.model.embed_tokens.weight)
        moe.model.norm.weight.copy_(dense.model.norm.weight)
        if not c.tie_word_embeddings:
            moe.lm_head.weight.copy_(dense.lm_head.weight)
        for d, m in zip(dense.model.layers, moe.model.layers):
            m.self_attn.load_state_dict(d.self_attn.state_dict())
            m.input_layernorm.load_state_dict(d.input_layernorm.state_dict())
            m.post_attention_layernorm.load_state_dict(d.post_attention_layernorm.state_dict())
            gate_up = torch.cat([d.mlp.gate_proj.weight, d.mlp.up_proj.weight])
            for e in range(experts):
                for fused, w in ((m.mlp.experts.gate_up_proj, gate_up), (m.mlp.experts.down_proj, d.mlp.down_proj.weight)):
                    rms = w.pow(2).mean().sqrt()
                    fused[e].copy_(w + noise * rms * torch.randn(w.shape, generator=g))
            m.mlp.gate.weight.copy_(0.02 * torch.randn(m.mlp.gate.weight.shape, generator=g))
    return moe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.01, help="each expert's perturbation, a share of the weight's rms")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoTokenizer
    moe = upcycle(args.experts, args.top_k, args.noise, args.seed)
    moe.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(bundled_folder()).save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in moe.parameters()) / 1e6:.0f} M parameters, "
          f"{args.experts} experts, top {args.top_k}")


if __name__ == "__main__":
    main()
