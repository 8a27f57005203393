"""Calibration text the dense model writes itself.

A mask learned on one document fits that document's kind of language. Text the model samples
itself covers its own distribution instead (answers, explanations, lists, stories, code) with
no data to download, and teaches the pruned model to keep doing what the dense one does. The
prompts below are a fixed, varied list of instructions (none of them is one of the app's
example prompts); answers are sampled with a seeded generator, so the same model and seed always
give the same text. Generation runs in batches with the KV cache; the stream is cached on disk
(cache folder, selfgen/) per model and seed, so only the first run of a model pays for it, and a
later request for more text (recovery reads more samples than learning) only adds the rounds it lacks.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

PROMPTS = [
    "Describe how a rainbow forms.", "Tell a short story about a lighthouse keeper.",
    "What are the main causes of inflation?", "Explain photosynthesis to a ten-year-old.",
    "Write a recipe for a simple vegetable soup.", "Summarise the history of the printing press.",
    "How does a bicycle stay upright?", "Give advice to someone starting their first job.",
    "Compare cats and dogs as pets.", "Explain what a database index is.",
    "Write a letter thanking a teacher.", "What should I pack for a week of hiking?",
    "Why do leaves change colour in autumn?", "Explain the rules of chess briefly.",
    "Describe a busy market in the morning.", "How do vaccines train the immune system?",
    "Write a function in Python that reverses a list, and explain it.",
    "What is the difference between weather and climate?", "Tell me about the Roman aqueducts.",
    "How can I improve my sleep?", "Explain how interest on a loan works.",
    "Write a haiku about winter, then explain its imagery.", "What does a project manager do?",
    "Describe the water cycle step by step.", "How do airplanes generate lift?",
    "Give a brief biography of Marie Curie.", "What are good habits for learning a language?",
    "Explain recursion with an everyday example.", "Why is the sky blue?",
    "Write a product description for a reusable water bottle.", "How do earthquakes happen?",
    "What is a healthy breakfast and why?", "Explain the difference between a virus and a bacterium.",
    "Describe your ideal weekend.", "How does a search engine find web pages?",
    "Write a dialogue between a customer and a shop assistant.", "What is the role of the moon in tides?",
    "List five facts about the ocean.", "Explain what an API is to a non-programmer.",
    "How do bees make honey?", "What were the causes of the First World War?",
    "Give tips for a good job interview.", "Explain how a refrigerator keeps food cold.",
    "Write a short news report about a local festival.", "What is machine learning?",
    "Describe the taste of a lemon to someone who has never had one.",
    "How should I prepare for a marathon?", "Explain the basics of supply and demand.",
]
MAX_NEW = 128          # tokens per answer
BATCH = 16
MAX_TOKENS = 200_000   # enough for any calibration set: longer runs reuse windows of it
# Fresh text for long recoveries (recovery.py, RecoveryConfig.text): millions of tokens, so written in
# large batches of long answers, and every other round starts from the start-of-text token alone
# (temperature 1: the model's own pre-training kind of text — news, stories, how-tos) instead of
# an instruction. Measured on an H200: 1.57 M tokens in ≈ 2 min at 512 × 256 (bench/RESULTS.md).
# A small request gets a smaller batch (about four rounds' worth, at least 8 answers), so a few
# thousand tokens on a CPU take minutes, not the hours of a 512-answer round.
FRESH_NEW = 256
FRESH_BATCH = 512
FRESH_MIN_BATCH = 8
FRESH_MAX_TOKENS = 50_000_000


def _prompt_ids(tokenizer, texts: list[str]) -> dict[str, list[int]]:
    """Each instruction's ids: in the model's chat template when it has one (all of them in one
    bounded render, chat_template.py), else the text and a newline."""
    from proxsparse_core.models import chat_template

    texts = list(dict.fromkeys(texts))
    if chat_template.has_template(tokenizer):
        try:
            return dict(zip(texts, chat_template.encode_user_prompts(tokenizer, texts)))
        except chat_template.TemplateProblem as exc:
            raise chat_template.TemplateProblem(f"{exc}: the model cannot write its own calibration text in its "
                                                "chat format; use the built-in text or a file") from None
    return {t: list(tokenizer(t + "\n", add_special_tokens=True)["input_ids"]) for t in texts}


def _cache_file(model, seed: int, max_new: int, batch: int, free: bool = False) -> Path:
    """Where the stream for this model (identified by its config and a checksum of its first and
    last weight matrices) and seed is kept: one growing stream, so a longer request (recovery reads
    more samples than learning) only generates the rounds it lacks."""
    from proxsparse_core.paths import cache_dir
    from proxsparse_core.sparsity.prunable import find_prunable

    prunable = find_prunable(model)
    probe = [prunable.modules[n].weight for n in (prunable.names[0], prunable.names[-1])]
    ident = [model.config.to_json_string(use_diff=False), *(f"{float(w.detach().double().sum()):.10e}" for w in probe),
             seed, max_new, batch, "\n".join(PROMPTS), "rounds-v2"] + (["free-rounds"] if free else [])
    key = hashlib.sha256(repr(ident).encode()).hexdigest()[:24]
    return cache_dir() / "selfgen" / f"{key}.pt"


def _read(path: Path) -> tuple[torch.Tensor, list[int]]:
    """(stream, cumulative length after each generation round) of a cache file; empty if none."""
    try:
        d = torch.load(path, weights_only=True)
        ids, ends = d["ids"], [int(e) for e in d["ends"].tolist()]
        if ids.dtype == torch.long and ids.dim() == 1 and ends == sorted(ends) and (not ends or ends[-1] == ids.numel()):
            return ids, ends
    except Exception:  # noqa: BLE001 - no file, or a damaged one: simply made again
        pass
    return torch.empty(0, dtype=torch.long), []


def generated_ids(model, tokenizer, tokens: int, seed: int = 0, max_new: int = MAX_NEW,
                  batch: int = BATCH, free: bool = False, progress=None) -> torch.Tensor:
    """About `tokens` token ids of prompts and the model's sampled answers, one stream
    (sequences separated by the end-of-text token), deterministic for a model and seed: the
    rounds of generation until the stream holds `tokens`, so a shorter request gives a prefix of
    a longer one. Made once per model and seed (and extended when more is asked), then read from
    the cache folder. `free`: every other round is free text from the start-of-text token alone
    (fresh_ids). `progress(tokens_so_far, tokens)` hears of each round."""
    tokens = min(tokens, FRESH_MAX_TOKENS if free else MAX_TOKENS)
    cap = 4 * (tokens // (batch * max_new) + 1)     # rounds: a model that ends every answer at once
    path = _cache_file(model, seed, max_new, batch, free)
    ids, ends = _read(path)
    if not any(e >= tokens for e in ends[:cap]) and len(ends) < cap:
        ids, ends = _generate(model, tokenizer, tokens, seed, max_new, batch, ids, ends, cap, free, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"ids": ids, "ends": torch.tensor(ends, dtype=torch.long)}, tmp)
        os.replace(tmp, path)
    last = next((k for k, e in enumerate(ends[:cap]) if e >= tokens), min(cap, len(ends)) - 1)
    out = ids[:ends[last]] if last >= 0 else ids[:0]
    if out.numel() < 2 * max_new:
        from proxsparse_core.errors import UserError
        raise UserError("the model ended almost every answer at once: it cannot write its own "
                        "calibration text; use the built-in text or a file")
    return out


def fresh_ids(model, tokenizer, tokens: int, seed: int = 0, progress=None) -> torch.Tensor:
    """About `tokens` ids of fresh text for a long recovery: the generated_ids stream in large
    batches of long answers, every other round free text from the start-of-text token alone.
    Deterministic for a model and seed, cached like generated_ids (its own file; the batch is sized
    to the request, so requests of 512 K tokens and more share one stream)."""
    batch = min(FRESH_BATCH, max(FRESH_MIN_BATCH, -(-tokens // (4 * FRESH_NEW))))
    return generated_ids(model, tokenizer, tokens, seed, FRESH_NEW, batch, free=True, progress=progress)


@torch.no_grad()
def _generate(model, tokenizer, tokens: int, seed: int, max_new: int, batch: int,
              ids: torch.Tensor, ends: list[int], cap: int, free: bool = False,
              progress=None) -> tuple[torch.Tensor, list[int]]:
    """Continue the stream `ids` (rounds `ends` so far) round by round until it holds `tokens` or
    `cap` rounds ran. Round k answers prompts k·batch … (k+1)·batch − 1 of the seeded order with
    its own seed, so continuing a stream gives exactly what one run would have; with `free`, odd
    rounds instead sample `batch` texts from the start-of-text token alone at temperature 1."""
    device = model.get_input_embeddings().weight.device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    start = getattr(tokenizer, "bos_token_id", None)
    start = eos if start is None else start
    order = torch.randperm(len(PROMPTS), generator=torch.Generator().manual_seed(seed)).tolist()
    prompt_ids = None                  # rendered on the first instruction round
    stream: list[int] = ids.tolist()
    ends = list(ends)
    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = True
    try:
        while len(stream) < tokens and len(ends) < cap:
            i = len(ends) * batch
            no_prompt = free and len(ends) % 2 == 1 and start is not None
            if no_prompt:
                prompts, temperature = [[start]] * batch, 1.0
            else:
                texts = [PROMPTS[order[(i + j) % len(order)]] for j in range(batch)]
                prompt_ids = prompt_ids or _prompt_ids(tokenizer, PROMPTS)
                prompts, temperature = [prompt_ids[t] for t in texts], 0.8
            width = max(len(p) for p in prompts)
            x = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            torch.manual_seed(seed * 1_000_003 + i + batch)
            out = model.generate(x, attention_mask=attn, do_sample=True, temperature=temperature, top_p=0.95,
                                 top_k=0, max_new_tokens=max_new, pad_token_id=pad)
            for p, row in zip(prompts, out.tolist()):
                answer = row[width:]
                if eos in answer:
                    answer = answer[:answer.index(eos)]
                answer = [t for t in answer if t != pad]
                if len(answer) >= 8:          # a sequence the model ended at once teaches nothing
                    stream += ([] if no_prompt else p) + answer + ([eos] if eos is not None else [])
            ends.append(len(stream))
            if progress:
                progress(len(stream), tokens)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    return torch.tensor(stream, dtype=torch.long), ends
