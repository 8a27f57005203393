"""Recovery at scale: does far more distillation text bring back what a 2:4 model forgets?

Issue 9's last open target is that the best 2:4 model answers at least three of the Compare tab's
four example prompts sensibly (greedy). Every recovery the app offers reads at most 8,000 windows
of 128 tokens (1 M tokens, `long`) cut from ~0.35 M distinct tokens (the built-in text and the
model's own 200 k-token text), and perplexity was still falling with every doubling. This script
asks the question two orders of magnitude further on, on one GPU, within a lent machine's
10-minute calls:

1. the bundled model, the `bundled-quality` calibration samples (seed 0), SparseGPT's 2:4 result
   on them (the base whose recoveries talk best, bench/RESULTS.md seventh pass);
2. a text pool: the built-in calibration text, the model's cached self-written text, and as much
   new text as --gen-seconds allows, sampled by the dense model in large batches: half of the
   rounds answer selfgen's instructions (none is an example prompt or one of quality.py's
   MORE_PROMPTS), half start from the start-of-text token alone (the model's pre-training kind of
   text: news, stories, how-tos);
3. masked fine-tuning of the survivors by the *full* KL divergence to the dense model (a frozen
   copy, run on the same batch: no stored top-k targets, so the text can be as long as wanted),
   --batch windows of --ctx tokens a step, lr relative to each layer's rms(W0), warm-up then
   cosine over the steps the time allows; pruned weights held at exactly zero;
4. the four example answers printed every --answer-every seconds, and at the end the row of
   bench/quality.py (perplexity and top-1 agreement on the built-in held-out text and the three
   held-out texts of other domains, greedy answers to the 12 prompts).

A run can be continued in a second call (--resume) from the state it saved (--state): the
schedule's length is fixed in the first call from the measured step time and --resume-seconds.

    python bench/scale_recovery.py --device cuda --until $(( $(date +%s) + 560 )) --gen-seconds 90 \\
        --resume-seconds 480 --state /tmp/scale --out $OUT/scale
    python bench/scale_recovery.py --device cuda --until … --resume --state /tmp/scale --out $OUT/scale2
    python bench/scale_recovery.py --smoke --until $(( $(date +%s) + 240 )) --state /tmp/s --out /tmp/s  # CPU
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality as Q  # noqa: E402
from proxsparse_core.config import RunConfig  # noqa: E402
from proxsparse_core.data import builtin_text, heldout_windows, special_prefix, tokenize  # noqa: E402
from proxsparse_core.evaluate import EXAMPLE_PROMPTS, GenerationSettings, generate  # noqa: E402
from proxsparse_core.masks import load_weights  # noqa: E402
from proxsparse_core.results import DENSE, Pruning  # noqa: E402
from proxsparse_core.selfgen import PROMPTS, _prompt_ids, generated_ids  # noqa: E402
from proxsparse_core.workspace import Workspace  # noqa: E402

TEXTS = ["legal", "mldocs", "manual"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def sample_text(model, tokenizer, until: float, batch: int, max_new: int, seed: int) -> torch.Tensor:
    """The dense model's own text, in rounds of `batch` sequences until the time `until`: even rounds
    answer selfgen's instructions (temperature 0.8, as selfgen), odd rounds start from the
    start-of-text token alone (temperature 1). One stream, sequences separated by end-of-text."""
    device = model.get_input_embeddings().weight.device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    model.eval()
    model.config.use_cache = True
    stream, rnd = [], 0
    g = torch.Generator().manual_seed(seed)
    while time.time() < until:
        if rnd % 2 == 0:
            picks = torch.randint(0, len(PROMPTS), (batch,), generator=g).tolist()
            prompts = [_prompt_ids(tokenizer, PROMPTS[i]) for i in picks]
            temp = 0.8
        else:
            prompts, temp = [[start]] * batch, 1.0
        width = max(len(p) for p in prompts)
        x = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        torch.manual_seed(seed * 1_000_003 + rnd)
        out = model.generate(x, attention_mask=attn, do_sample=True, temperature=temp, top_p=0.95, top_k=0,
                             max_new_tokens=max_new, pad_token_id=pad)
        for p, row in zip(prompts, out.tolist()):
            body = row[width:]
            if eos in body:
                body = body[:body.index(eos)]
            if len(body) >= 8:
                stream.extend((p if rnd % 2 == 0 else []) + body + [eos])
        rnd += 1
        log(f"text round {rnd}: {len(stream):,} tokens")
    return torch.tensor(stream, dtype=torch.int32)


def windows(pool: torch.Tensor, n: int, ctx: int, prefix: list[int], g: torch.Generator) -> torch.Tensor:
    body = ctx - len(prefix)
    starts = torch.randint(0, pool.numel() - body, (n,), generator=g)
    w = torch.stack([pool[s:s + body] for s in starts.tolist()]).long()
    if prefix:
        w = torch.cat([torch.tensor(prefix).expand(n, len(prefix)), w], 1)
    return w


def answers(ws: Workspace, n_new: int) -> list[str]:
    model = ws.lm.model
    model.eval()
    use_cache = model.config.use_cache
    model.config.use_cache = True
    try:
        return [generate(model, ws.lm.tokenizer, p, GenerationSettings(max_new_tokens=n_new)) for p in EXAMPLE_PROMPTS]
    finally:
        model.config.use_cache = use_cache
        model.train()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--until", type=float, required=True, help="Unix time by which this call must be done")
    p.add_argument("--gen-seconds", type=float, default=90)
    p.add_argument("--gen-batch", type=int, default=256)
    p.add_argument("--gen-new", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="relative to each layer's rms(W0)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--resume-seconds", type=float, default=0, help="training seconds the --resume call will add")
    p.add_argument("--eval-seconds", type=float, default=60, help="kept free at the end for scoring")
    p.add_argument("--answer-every", type=float, default=120)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--state", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny sizes")
    args = p.parse_args()
    if args.smoke:
        args.device, args.gen_batch, args.gen_new, args.batch, args.ctx, args.warmup = "cpu", 4, 16, 2, 32, 2
    t_call = time.time()
    state_dir, out = Path(args.state), Path(args.out)
    state_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    cfg = RunConfig(device=args.device).with_preset("bundled-quality")
    cfg = RunConfig(**{**cfg.to_dict(), "dtype": "float32", "eval_windows": 2 if args.smoke else 0, "seed": 0,
                       "samples": 8 if args.smoke else cfg.samples}).validate()
    ws = Workspace()
    ws.load(cfg)
    tok, model, prunable = ws.lm.tokenizer, ws.lm.model, ws.lm.prunable
    prefix = special_prefix(tok)
    for name in TEXTS:
        ids = tokenize(tok, (Path(__file__).parent / "texts" / f"{name}.txt").read_text())
        Q.EXTRA[name] = heldout_windows(ids, cfg.eval_ctx, 2 if args.smoke else 40, prefix)
    Q.ANSWERS = 8 if args.smoke else 48
    Q.PROMPTS_ASKED.extend(Q.MORE_PROMPTS)
    Q._scores(ws, DENSE)
    log(f"loaded {ws.lm.describe()}")
    teacher = copy.deepcopy(model).eval().requires_grad_(False)     # the dense model, W0

    if not args.resume:
        sgpt = ws.prune("sparsegpt", cfg)
        masks, start = sgpt.masks, sgpt.weights
        log("SparseGPT done")
        own = generated_ids(model, tok, 2_000 if args.smoke else 200_000, seed=0)   # the cached self-written text
        new = sample_text(model, tok, time.time() + args.gen_seconds, args.gen_batch, args.gen_new, seed=1)
        torch.save(new, out / "new_text.pt")
        pool = torch.cat([tokenize(tok, builtin_text().calibration).int(), own.int(), new])
        torch.save({"pool": pool, "masks": masks}, state_dir / "pool.pt")
        step, total, opt_state = 0, None, None
        log(f"pool: {pool.numel():,} tokens (new text {new.numel():,}, own {own.numel():,})")
    else:
        d = torch.load(state_dir / "pool.pt", weights_only=True)
        pool, masks = d["pool"], d["masks"]
        s = torch.load(state_dir / "state.pt", weights_only=True)
        start, step, total, opt_state = s["weights"], s["step"], s["total"], s["opt"]
        log(f"resumed at step {step} of {total}")

    names = list(prunable.names)
    weights = {n: prunable.modules[n].weight for n in names}
    load_weights(prunable, start)
    for prm in model.parameters():
        prm.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    keep = {n: masks[n].to(weights[n].device, weights[n].dtype) for n in names}
    scale = {n: float(ws.originals[n].float().pow(2).mean().sqrt()) for n in names}
    opt = torch.optim.AdamW([{"params": [weights[n]], "lr": args.lr * scale[n]} for n in names], lr=args.lr,
                            weight_decay=0.0, fused=args.device == "cuda")
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    base_lr = [g["lr"] for g in opt.param_groups]
    g = torch.Generator().manual_seed(1000 + step)
    model.config.use_cache = False
    model.train()
    train_end = args.until - args.eval_seconds - 30      # 30 s: saving the state
    t_ans, t0, n_timed, t_timed = time.time(), time.time(), 0, 0.0
    while time.time() < train_end and (total is None or step < total):
        ts = time.time()
        x = windows(pool, args.batch, args.ctx, prefix, g).to(args.device)
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), -1)
        s_logp = F.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)
        loss = F.kl_div(s_logp, t_logp, reduction="sum", log_target=True) / (x.shape[0] * x.shape[1])
        del t_logp
        loss.backward()
        del s_logp
        torch.nn.utils.clip_grad_norm_(list(weights.values()), 1.0)
        warm = min(1.0, (step + 1) / args.warmup)
        frac = 0.0 if total is None else min(1.0, max(0.0, (step - args.warmup) / max(1, total - args.warmup)))
        f = warm * (0.5 * (1 + math.cos(math.pi * frac)) if step >= args.warmup else 1.0)
        for grp, lr0 in zip(opt.param_groups, base_lr):
            grp["lr"] = lr0 * f
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n in names:
                weights[n].mul_(keep[n])
        step += 1
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step > 5:
            n_timed, t_timed = n_timed + 1, t_timed + time.time() - ts
        if total is None and n_timed == 20:
            dt = t_timed / n_timed
            total = step + int((train_end - time.time()) / dt) + int(args.resume_seconds / dt)
            log(f"{dt:.3f} s/step ({args.batch * args.ctx / dt:,.0f} tokens/s): schedule of {total} steps")
        if step % 50 == 0 or args.smoke:
            log(f"step {step}/{total} loss {loss.item():.4f} lr×{f:.3f}")
        if time.time() - t_ans > args.answer_every:
            for a in answers(ws, 48 if not args.smoke else 8):
                log(f"step {step} answer: {a[:240]!r}")
            t_ans = time.time()
    trained = time.time() - t0
    log(f"trained to step {step} of {total} ({trained:.0f} s this call)")
    with torch.no_grad():
        final = {n: weights[n].detach().to("cpu", copy=True) for n in names}
    torch.save({"weights": final, "step": step, "total": total, "opt": opt.state_dict()}, state_dir / "state.pt")
    del opt
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
    model.eval()
    model.config.use_cache = True
    load_weights(prunable, ws.originals)
    del teacher
    name = "sparsegpt+scale"
    ws.add_result(name, Pruning("sparsegpt+recovery", masks, final, {"steps": step}))
    label = (f"SparseGPT + {step} of {total} steps × {args.batch} × {args.ctx} tokens, full KL, lr {args.lr}, "
             f"pool {pool.numel():,} tokens")
    row = Q._row(ws, name, label, time.time() - t_call)
    row["loops"] = sum(Q.loops(a) for a in row.get("answers", {}).values())
    row["tokens_seen"] = step * args.batch * args.ctx
    print(json.dumps(row), flush=True)
    with open(out / "rows.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    log(f"done: {json.dumps(row['scores'])}, loops {row['loops']}")


if __name__ == "__main__":
    main()
