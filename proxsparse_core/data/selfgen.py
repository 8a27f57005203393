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
    from proxsparse_core.chat import template as chat_template

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


# ---------------------------------------------------------------------------------------------- chat turns
# Recovery reads the model's own chat turns (issue 28): a chat model recovered on documentation alone never
# sees a chat turn and, asked a question in its chat format, recited its system prompt instead of answering.
# And the chat format's scaffolding (system prompt, role tags, the user's instruction) is input the model
# reads, never text it should learn to write: recovery's loss leaves out the positions that predict it.

def scaffold(tokenizer) -> tuple[list[int], list[int]] | None:
    """(head, tail): the token ids the model's chat template writes before and after a user's message —
    for SmolLM2 the system prompt and the user's tag, then the end of the turn and the assistant's tag —
    read as the longest common prefix and suffix of its renders of PROMPTS. None without a template or
    when it cannot be rendered (then nothing is left out)."""
    from proxsparse_core.chat import template as chat_template

    if not chat_template.has_template(tokenizer):
        return None
    try:
        rendered = list(_prompt_ids(tokenizer, PROMPTS).values())
    except chat_template.TemplateProblem:
        return None
    shortest = min(len(r) for r in rendered)
    head = next((k for k in range(shortest) if any(r[k] != rendered[0][k] for r in rendered)), shortest)
    tail = next((k for k in range(shortest - head) if any(r[-1 - k] != rendered[0][-1 - k] for r in rendered)),
                shortest - head)
    return rendered[0][:head], (rendered[0][len(rendered[0]) - tail:] if tail else [])


def _starts(rows: torch.Tensor, seq: list[int]) -> torch.Tensor:
    """[n, ctx] bool: where a whole occurrence of `seq` starts in each row."""
    n, ctx = rows.shape
    out = torch.zeros(n, ctx, dtype=torch.bool)
    if seq and len(seq) <= ctx:
        hit = (rows.unfold(1, len(seq), 1) == torch.tensor(seq, dtype=rows.dtype)).all(-1)
        out[:, :hit.shape[1]] = hit
    return out


def scaffold_positions(rows: torch.Tensor, head: list[int], tail: list[int], chunk: int = 4096) -> torch.Tensor:
    """[n, ctx] bool: the tokens of `rows` [n, ctx] that belong to a chat prompt — from a `head` to the
    end of the next `tail` (so the user's instruction too), with prompts cut by a row's edges: a row
    that starts inside a prompt (its first tail comes before any head, or it starts with the last ≥ 2
    tokens of a head or a tail) and one that ends inside a head. Plain text and answers are False."""
    if not head and not tail:
        return torch.zeros(rows.shape, dtype=torch.bool)
    if rows.shape[0] > chunk:
        return torch.cat([scaffold_positions(part, head, tail, chunk) for part in rows.split(chunk)])
    n, ctx = rows.shape
    idx = torch.arange(ctx).expand(n, ctx)
    heads, tail_ends = _starts(rows, head), torch.zeros(n, ctx, dtype=torch.bool)
    if tail:
        tail_ends[:, len(tail) - 1:] = _starts(rows, tail)[:, :ctx - len(tail) + 1]
        done = torch.zeros(n, dtype=torch.bool)
        for k in range(min(len(tail) - 1, ctx), 1, -1):          # a row that starts with the end of a tail
            cut = (rows[:, :k] == torch.tensor(tail[-k:], dtype=rows.dtype)).all(-1) & ~done
            tail_ends[cut, k - 1] = True
            done |= cut
    if not head:          # no head to find where a prompt starts: only the tails' own tokens
        inside = tail_ends.clone()
        for o in range(1, len(tail)):
            inside[:, :-o] |= tail_ends[:, o:]
        return inside
    for j in range(1, len(head) - 1):                              # a row that starts inside a head
        k = min(len(head) - j, ctx)
        heads[:, 0] |= (rows[:, :k] == torch.tensor(head[j:j + k], dtype=rows.dtype)).all(-1)
    for k in range(min(len(head) - 1, ctx), 0, -1):               # a row that ends inside a head
        heads[(rows[:, ctx - k:] == torch.tensor(head[:k], dtype=rows.dtype)).all(-1), ctx - k] = True
    none, never = torch.full((n, ctx), -1), torch.full((n, ctx), ctx)
    last_head = torch.where(heads, idx, none).cummax(1).values                 # latest head start ≤ i
    ended = torch.where(tail_ends, idx, none).cummax(1).values                 # latest tail end ≤ i
    before = torch.cat([torch.full((n, 1), -1), ended[:, :-1]], 1)             # latest tail end < i
    first_end = torch.where(tail_ends, idx, never).min(1).values
    first_head = torch.where(heads, idx, never).min(1).values
    opened = (first_end < first_head)[:, None] & (idx <= first_end[:, None])    # the row starts inside a prompt
    return (last_head > before) | opened                                        # or a head opened, not yet closed


def answer_weights(rows: torch.Tensor, tokenizer) -> torch.Tensor | None:
    """[n, ctx] float32 loss weights for distillation on `rows`: 0 at every position whose next token is
    chat scaffolding (scaffold_positions), 1 elsewhere — answers, their end-of-turn token and plain text.
    The last position (its next token lies beyond the row) counts unless it is inside a prompt before
    its last token. None when the model has no chat template, or no row holds scaffolding."""
    parts = scaffold(tokenizer)
    if parts is None:
        return None
    head, tail = parts
    inside = scaffold_positions(rows, head, tail)
    if not inside.any():
        return None
    weights = torch.ones(rows.shape, dtype=torch.float32)
    weights[:, :-1][inside[:, 1:]] = 0.0
    last = inside[:, -1].clone()
    if tail and rows.shape[1] >= len(tail):
        last &= ~(rows[:, -len(tail):] == torch.tensor(tail, dtype=rows.dtype)).all(-1)
    weights[last, -1] = 0.0
    return weights


def chat_turns(model, tokenizer, n: int, ctx: int, seed: int = 0, prefix: list[int] | None = None,
               progress=None) -> torch.Tensor:
    """n windows of ctx tokens that each start where one of the model's own chat turns starts (its
    chat prompt for one of PROMPTS, then its sampled answer; the window runs on into the next turn when
    the answer is short) — the position a chat prompt has when the model is used. Read from the
    generated_ids stream of this model and seed (the one data `mix` reads, cached); each window starts
    with `prefix` unless the turn does already. Turns in stream order, reused only if the stream holds
    fewer than n."""
    from proxsparse_core.errors import UserError

    prefix = prefix or []
    prompts = list(_prompt_ids(tokenizer, PROMPTS).values())
    longest = max(len(p) for p in prompts)
    ids = generated_ids(model, tokenizer, n * (longest + MAX_NEW + 1) + ctx, seed, progress=progress)
    eos = tokenizer.eos_token_id
    stream = ids.tolist()
    starts, i = [], 0
    while i < len(stream):     # turn after turn: a prompt, the answer, its end of text (which a template may
        p = next((p for p in prompts if stream[i:i + len(p)] == p), [])         # also use inside a prompt)
        if p:
            starts.append(i)
        try:
            i = stream.index(eos, i + len(p)) + 1
        except ValueError:
            break
    rows = []
    for s in starts:
        head = [] if stream[s:s + len(prefix)] == prefix else prefix
        body = ctx - len(head)
        if s + body <= len(stream):
            rows.append(head + stream[s:s + body])
    if not rows:
        raise UserError("the model's own chat turns are shorter than one sample; use a shorter context")
    return torch.tensor([rows[i % len(rows)] for i in range(n)], dtype=torch.long).reshape(n, ctx)
