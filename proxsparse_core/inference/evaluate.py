"""Evaluation: perplexity on held-out windows and text generation."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import torch

from proxsparse_core.errors import Stopped, UserError


@dataclass
class Score:
    """A model on the held-out windows: perplexity, and its top-1 next-token choice at every
    position (to compare a pruned model's choices with the dense model's)."""
    ppl: float
    top1: torch.Tensor          # [windows, ctx − 1] int32, argmax of the next-token logits


@torch.no_grad()
def score(model, windows: torch.Tensor, batch: int = 4,
          progress: Callable[[int, int], None] | None = None,
          stop: threading.Event | None = None) -> Score:
    """exp(mean next-token NLL) over non-overlapping windows ([n, ctx] token ids), and the
    top-1 predictions. Every method compared gets the same windows, so the numbers compare."""
    device = model.get_input_embeddings().weight.device
    nll, count, top1 = 0.0, 0, []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, windows.shape[0], batch):
            if stop is not None and stop.is_set():
                raise Stopped("perplexity stopped by the user")
            x = windows[i:i + batch].to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += x[:, 1:].numel()
            top1.append(logits.argmax(-1).to("cpu", torch.int32))
            if progress:
                progress(min(i + batch, windows.shape[0]), windows.shape[0])
    finally:
        model.train(was_training)
    return Score(math.exp(nll / count), torch.cat(top1))


def perplexity(model, windows: torch.Tensor, batch: int = 4,
               progress: Callable[[int, int], None] | None = None,
               stop: threading.Event | None = None) -> float:
    return score(model, windows, batch, progress, stop).ppl


def agreement(top1: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of positions where two models choose the same next token (1.0 = always)."""
    return float((top1 == reference).double().mean())


# the prompts a live demo starts from (the Compare tab's examples; bench/quality.py --answers asks
# every 2:4 model the same ones)
EXAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences what a neural network is.",
    "Write a short poem about the sea.",
    "Give three tips for writing clean Python code.",
]


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False       # greedy by default
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    chat: bool = True             # wrap the prompt in the tokenizer's chat template when it has one
    no_repeat_ngram: int = 0      # n > 0: no n tokens in a row appear twice (a loop guard); 0 = off
    stop: threading.Event | None = field(default=None, compare=False, repr=False)   # set: end after this token
    # what the user should hear about a generation (the chat template failed, so the plain prompt was used)
    notes: list[str] = field(default_factory=list, compare=False, repr=False)

    MAX_NGRAM: ClassVar[int] = 16
    # (lowest, highest) of the settings a page or a script sets: the check below, the CLI and the
    # Compare tab's widgets read them here
    LIMITS: ClassVar[dict] = {"max_new_tokens": (1, 512), "temperature": (0.05, 2.0), "top_p": (0.05, 1.0),
                              "no_repeat_ngram": (0, MAX_NGRAM)}
    HELP: ClassVar[dict] = {
        "no_repeat_ngram": "loop guard: with N > 0 no N tokens in a row appear twice in one answer (greedy decoding "
                           "then takes the likeliest token that repeats none); 0 = off. Small and pruned models "
                           "repeat a phrase or line under greedy decoding; with 4, the bundled model's answers "
                           "that did not loop stayed almost word for word (bench/RESULTS.md)"}

    def validate(self) -> "GenerationSettings":
        m, (lo, hi) = self.max_new_tokens, self.LIMITS["max_new_tokens"]
        if isinstance(m, bool) or not isinstance(m, int) or not lo <= m <= hi:
            raise UserError(f"max new tokens must be a whole number from {lo} to {hi}; got {m!r}")
        n = self.no_repeat_ngram
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.MAX_NGRAM:
            raise UserError(f"the loop guard (no repeated n-gram) must be a whole number from 0 to {self.MAX_NGRAM}; "
                            f"got {n!r}")
        return self


def _encode(tokenizer, prompt: str, s: GenerationSettings) -> torch.Tensor:
    """The prompt's ids: in the model's chat template (rendered within a bound, chat_template.py;
    Stop ends it), or, when the template fails or runs past the bound, the plain prompt, with a
    line in `s.notes` saying so."""
    from proxsparse_core.chat import template as chat_template

    if s.chat and chat_template.has_template(tokenizer):
        try:
            return torch.tensor([chat_template.encode_user_prompts(tokenizer, [prompt], s.stop)[0]],
                                dtype=torch.long)
        except chat_template.TemplateProblem as exc:
            if not any("chat template" in n for n in s.notes):      # once per request (dense, then 2:4)
                s.notes.append(f"{exc}; generated from the plain prompt instead")
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def _stopping(stop: threading.Event):
    """A transformers StoppingCriteria that ends generation once `stop` is set."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class OnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([OnEvent()])


def _gen_kwargs(tokenizer, s: GenerationSettings) -> dict:
    kw = dict(max_new_tokens=s.max_new_tokens, do_sample=s.do_sample,
              pad_token_id=tokenizer.pad_token_id)
    if s.no_repeat_ngram:
        kw["no_repeat_ngram_size"] = s.no_repeat_ngram
    if s.stop is not None:
        kw["stopping_criteria"] = _stopping(s.stop)
    if s.do_sample:
        kw.update(temperature=s.temperature, top_p=s.top_p)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


@torch.no_grad()
def generate(model, tokenizer, prompt: str, settings: GenerationSettings | None = None) -> str:
    s = settings or GenerationSettings()
    ids = _encode(tokenizer, prompt, s).to(model.get_input_embeddings().weight.device)
    torch.manual_seed(s.seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **_gen_kwargs(tokenizer, s))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generate_stream(model, tokenizer, prompt: str,
                    settings: GenerationSettings | None = None) -> Iterator[str]:
    """Yield the growing completion as tokens arrive (generation runs in a thread)."""
    from transformers import TextIteratorStreamer

    s = settings or GenerationSettings()
    ids = _encode(tokenizer, prompt, s).to(model.get_input_embeddings().weight.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def work():
        try:
            torch.manual_seed(s.seed)
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                               **_gen_kwargs(tokenizer, s))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
            streamer.end()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    t.join()
    if errors:
        raise errors[0]


def first_divergence(a: str, b: str) -> int:
    """Index of the first character where two texts differ (len of the shorter if one is a prefix)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n if len(a) != len(b) else -1
