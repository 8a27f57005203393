"""Recovery: after the 2:4 mask is fixed, adjust the surviving weights so the model works again.

ProxSparse (and magnitude, Wanda) choose *which* weights to drop and keep the survivors at W0.
Practitioners then recover: they change the survivors, never the mask, to make up for what was
dropped. Two ways, usable alone or in sequence, for any 2:4 result (learned or one-shot):

* ``obs`` — the optimal-brain-surgeon update of SparseGPT with the mask held fixed: layer by
  layer, the survivors are solved so that the layer's outputs on calibration inputs change as
  little as possible (sparsegpt.py, given a mask instead of choosing one). Seconds on a GPU.
  Recovery damps it ten times more than SparseGPT does (OBS_DAMP, 10 % of the mean Hessian
  diagonal against 1 %): a steadier update that fits the few calibration samples less; after
  fine-tuning it gave lower held-out perplexity for ProxSparse's mask and SparseGPT's alike, on
  two models (bench/RESULTS.md 1g). SparseGPT's own result is still rebuilt with its 1 % (reopen.py).
* ``finetune`` — masked fine-tuning by self-distillation: the survivors are trained so the
  model's next-token distributions match the dense model's (distill.py) on the calibration
  samples, with every pruned weight held at exactly zero after each step. Live events, Stop
  and ETA work like learning. The teacher is either *stored* (its top-64 log-probabilities per
  position, read once before training: cheap for a few thousand samples) or *live* (the dense
  weights W0 run on every batch beside the student, the full distribution, nothing stored: any
  amount of text, at one extra forward pass per step). Fine-tuning can also read *fresh text*
  the dense model writes for it in large batches (selfgen.py), for runs that read millions of
  tokens.
* ``both`` — obs first, then finetune from its weights.

For a chat model, fine-tuning reads its own chat turns too (half the samples when the run's source
holds none: workspace.tuning_samples, selfgen.chat_turns), and every position that predicts the chat
template's scaffolding — system prompt, role tags, the user's message — is left out of the loss
(selfgen.answer_weights): recovered on documentation alone, SmolLM2 answered every question with its
system prompt (issue 28, bench/RESULTS.md).

The result is a new `Pruning` with the same masks and updated weights; the model itself goes
back to W0, like after every other method.

Every stage reports its progress with a count (blocks, samples, steps) through a `progress.Timeline`
built from `recovery_stages`: each stage's ETA from its own recent rate, and one ETA over the whole
recovery that counts the stages still to come (issue 28: the OBS update took 5.7 min under a label that
said seconds, the teacher pass ran 3.5 min with no count, the ETA swung 55:54 → 17:37).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from proxsparse_core.baselines.sparsegpt import DAMP
from proxsparse_core.data.selfgen import answer_weights
from proxsparse_core.method.distill import distill_loss, full_kl, live_teacher_logits, teacher_targets
from proxsparse_core.errors import Stopped, UserError
from proxsparse_core.progress import RateMeter, Timeline
from proxsparse_core.sparsity.masks import load_weights
from proxsparse_core.results import RECOVERED as SUFFIX, Pruning
from proxsparse_core.method.training import MaskedTraining, StepEvent, memory_in_use, run_steps, trainable

OBS_DAMP = 0.1                # recovery's OBS damping (SparseGPT's own is DAMP); see the module docstring

RECOVERY_METHODS = ("obs", "finetune", "both")
TEACHERS = ("stored", "live")
MAX_STORED = 20_000           # samples a stored teacher may keep (≈ 50 KB each at 128 tokens, top-64)
LIVE_CHUNK_TOKENS = 8192      # the live teacher's batch runs in chunks of about this many tokens


@dataclass
class RecoveryConfig:
    """Settings of a recovery run (CLI flags of `recover`, widgets of the app)."""
    method: str = "both"          # obs | finetune | both
    steps: int = field(default=300, metadata={"lo": 1, "hi": 10_000})   # fine-tuning steps (300 against 100: bench/RESULTS.md)
    lr: float = field(default=2e-3, metadata={"lo": 0, "hi": 1.0, "lo_open": True})   # relative to each layer's rms(W0)
    batch: int = field(default=1, metadata={"lo": 1, "hi": 256})     # calibration samples per fine-tuning step
    seed: int = field(default=0, metadata={"lo": 0, "hi": 2**32 - 1})
    samples: int = field(default=300, metadata={"lo": 0, "hi": 1_000_000})
    #                               calibration samples fine-tuning reads (0 = the run's own); 300 distinct
    #                               samples at lr 2e-3 against the run's own seen twice: bench/RESULTS.md
    teacher: str = "stored"       # stored (top-64 per position, read once) | live (W0 run every step, full KL)
    text: int = field(default=0, metadata={"lo": 0, "hi": 50_000_000})   # tokens of fresh text (0 = none)
    obs_dense: float = field(default=0.0, metadata={"lo": 0.0, "hi": 1.0})
    #                               how far the OBS update's targets move towards the dense model's outputs
    obs_damp: float = field(default=OBS_DAMP, metadata={"lo": 0.0, "hi": 10.0, "lo_open": True})
    #                               the OBS update's damping (measured: bench/RESULTS.md 1e–1g)

    HELP = {"method": "obs (weight update with the mask fixed), finetune (masked distillation from the "
                      "dense model) or both",
            "steps": "fine-tuning steps", "lr": "fine-tuning learning rate, relative to each layer's "
                                                "weight scale rms(W0) (cosine decay)",
            "batch": "calibration samples per fine-tuning step", "seed": "seed for the sample order",
            "samples": "calibration samples the fine-tuning reads, drawn from the run's calibration source "
                       "and seed like the run's own (0 = exactly the run's samples); for a chat model on a "
                       "source without chat turns (a file, the built-in text) half of them are the model's own "
                       "chat turns (written once, cached per model and seed); the OBS update always reads the "
                       "run's samples",
            "teacher": "stored (the dense model's top-64 next-token log-probabilities per position, read once "
                       "before training; up to 20,000 samples) or live (the dense weights run on every batch: "
                       "the full distribution, no storage, any number of samples)",
            "obs_dense": "the OBS update's target, from 0 (each layer keeps its own outputs on the inputs the "
                         "pruned layers before it give: SparseGPT's update) to 1 (the dense model's outputs: "
                         "the layer also makes up for the error of the layers before it); in between, that share "
                         "of the way",
            "obs_damp": "the OBS update's damping: the share of the mean of each layer's input Hessian diagonal added "
                        f"to its diagonal ({DAMP:g} is SparseGPT's own); larger keeps the update smaller and steadier",
            "text": "tokens of fresh text the dense model writes for fine-tuning in large batches (half answers "
                    "to varied instructions, half free text from the start-of-text token; cached per model and "
                    "seed); fine-tuning samples are then drawn over it and the run's calibration text together "
                    "(it replaces the model's own text of data mix). 0 = none. A GPU job for large amounts"}

    TITLES = {"lr": "learning rate"}       # names in messages, where the field's own name says less

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def bounds(cls, name: str) -> tuple:
        """(lowest, highest, lowest excluded?) of a numeric setting: the one declaration that the
        check here, the CLI and the Compare tab's widgets read."""
        meta = next(f.metadata for f in fields(cls) if f.name == name)
        return meta["lo"], meta["hi"], meta.get("lo_open", False)

    def validate(self) -> "RecoveryConfig":
        if not isinstance(self.method, str) or self.method not in RECOVERY_METHODS:
            raise UserError(f"recovery method must be one of {', '.join(RECOVERY_METHODS)}; got {self.method!r}")
        if not isinstance(self.teacher, str) or self.teacher not in TEACHERS:
            raise UserError(f"recovery teacher must be one of {', '.join(TEACHERS)}; got {self.teacher!r}")
        for f in fields(self):              # bounds are declared once, on the field (see `bounds`)
            if "hi" not in f.metadata:
                continue
            name, (lo, hi, lo_open) = f.name, self.bounds(f.name)
            v = getattr(self, name)
            if isinstance(f.default, float):                # a number: lr, obs_dense, obs_damp
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                        or not (lo < v if lo_open else lo <= v) or v > hi:
                    span = f"in ({lo:g}, {hi:g}]" if lo_open else f"from {lo:g} to {hi:g}"
                    raise UserError(f"recovery {self.TITLES.get(name, name)} must be a number {span}; got {v!r}")
                setattr(self, name, float(v))
                continue
            if isinstance(v, float) and v.is_integer():
                v = int(v)
                setattr(self, name, v)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise UserError(f"recovery {name} must be a whole number from {lo} to {hi}; got {v!r}")
        reads = min(self.samples or MAX_STORED, self.steps * self.batch)
        if self.method != "obs" and self.teacher == "stored" and reads > MAX_STORED:
            raise UserError(f"a stored teacher keeps the dense model's top-64 log-probabilities of every sample "
                            f"read ({reads:,} here, at most {MAX_STORED:,}); use teacher live, or fewer "
                            f"samples or steps × samples per step")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "RecoveryConfig":
        if not isinstance(d, dict):
            raise UserError("recovery settings must be a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown recovery setting(s): {', '.join(sorted(map(str, unknown)))}")
        # settings recorded before obs_dense / obs_damp existed ran with 0 / SparseGPT's 1 %
        return cls(**{"obs_dense": 0.0, "obs_damp": DAMP, **d}).validate()


# How long fine-tuning runs (one registry: the CLI's --length, the Compare tab's Length radio and the
# labels read it). `standard` is RecoveryConfig's defaults, sized for 2 CPU cores; `long` reads 27× the
# samples, for a GPU; `deep` reads ~16 M tokens (1,000 steps × 128 samples) with the live teacher, drawn
# over the run's calibration text and 1 M tokens of fresh text the dense model writes first: a GPU job of
# minutes, hours on a CPU. Measured times: measured.describe("recover:<length>:<cpu|gpu>"); quality of
# each length: bench/RESULTS.md.
_KEYS = ("steps", "samples", "batch", "lr", "teacher", "text")
RECOVERY_LENGTHS = {"standard": {k: getattr(RecoveryConfig, k) for k in _KEYS},
                    "long": {**{k: getattr(RecoveryConfig, k) for k in _KEYS}, "steps": 1000, "samples": 8000,
                             "batch": 8},
                    "deep": {"steps": 1000, "samples": 128_000, "batch": 128, "lr": 3e-3, "teacher": "live",
                             "text": 1_000_000}}


# What each stage of a recovery is expected to cost, in multiply-adds of the model, each stage's count
# weighted by how much slower than a batched forward pass (the held-out perplexity) it goes per
# multiply-add: progress.Timeline turns the work into seconds at the speed measured so far (only ratios
# matter; a stage's own ETA, once it runs, comes from its own measured rate). EFFORT: each stage's
# fastest time per multiply-add over two recoveries of the bundled model on 2 shared CPU cores
# (bench/recovery_time.py, bench/RESULTS.md section 3), over the forward pass's: on that machine a stage
# ran up to 14x slower while other jobs took the cores, so the least disturbed run of each stage says
# most about the stages' proportions. Decoding one token at a time costs 3.5x a batched forward pass per
# multiply-add, a one-sample training step 1.5x; OBS and the teacher about the same. Fresh text (large
# batches, for a GPU) was not measured: it takes the chat turns' figure until it runs.
EFFORT = {"fresh-text": 3.5, "chat-turns": 3.5, "obs": 0.9, "teacher": 0.8, "finetune": 1.5, "perplexity": 1.0}
VOCAB_OPS = 8.0     # per position and vocabulary entry: log-softmax with top-k, or the KL over the vocabulary
ADAMW_OPS = 20.0    # per trainable weight and fine-tuning step: clipping, AdamW, the mask


STAGE_TITLES = {"fresh-text": "fresh text", "samples": "drawing samples", "chat-turns": "chat turns",
                "obs": "weight update (OBS)", "teacher": "teacher pass", "finetune": "fine-tuning",
                "perplexity": "held-out perplexity"}


def forward_work(lm, tokens: int, ctx: int) -> float:
    """Multiply-adds of one forward pass over `tokens` tokens in windows of `ctx` (logits included)."""
    model = lm.model
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 0) or 0
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    head = model.get_output_embeddings()
    head_w = getattr(head, "weight", None)
    per_token = lm.prunable.n_params + (head_w.numel() if head_w is not None else 0) + 2 * ctx * hidden * layers
    return float(tokens) * per_token


def _vocab(lm) -> int:
    head = lm.model.get_output_embeddings()
    w = getattr(head, "weight", None)
    return int(w.shape[0]) if w is not None else int(getattr(lm.model.config, "vocab_size", 0) or 0)


def recovery_stages(lm, cfg: "RecoveryConfig", calibration_shape: tuple, tuning_rows: int, ctx: int,
                    turn_tokens: int = 0, text: int = 0, eval_windows: int = 0, eval_ctx: int = 0) -> list:
    """(stage, units, work per unit: multiply-adds × EFFORT) of every stage a recovery with `cfg` goes through, in order:
    fresh-text (tokens), samples (no count), chat-turns (tokens), obs (blocks), teacher (samples, a stored
    teacher), finetune (steps), perplexity (held-out windows: `eval_windows` of `eval_ctx` tokens, over
    every result still to be scored). Stages that will not run are left out; a stage whose text turns out
    cached never reports and counts nothing (Timeline)."""
    from proxsparse_core.sparsity.prunable import find_decoder_blocks

    vocab, fine = _vocab(lm), cfg.method != "obs"
    out = []

    def stage(name, units, work):
        out.append((name, units, EFFORT[name] * work))
    if fine and text:
        stage("fresh-text", text, forward_work(lm, 1, ctx))
    if fine:
        out.append(("samples", 0, 0.0))
    if fine and turn_tokens:
        stage("chat-turns", turn_tokens, forward_work(lm, 1, ctx))
    if cfg.method != "finetune":
        n_cal = calibration_shape[0] * calibration_shape[1]
        blocks = max(1, len(find_decoder_blocks(lm.model)[1]))
        solve = sum(n_cal * w.shape[1] ** 2 + w.numel() * w.shape[1] + w.shape[1] ** 3    # X·Xᵀ, the solve
                    for w in (lm.prunable.modules[n].weight for n in lm.prunable.names))
        body = 2.0 * n_cal * lm.prunable.n_params             # each block runs twice over the calibration
        stage("obs", blocks, (body + solve) / blocks)
    if fine:
        rows = min(tuning_rows, cfg.steps * cfg.batch)
        if cfg.teacher == "stored":
            stage("teacher", rows, forward_work(lm, ctx, ctx) + VOCAB_OPS * ctx * vocab)
        tokens = cfg.batch * ctx
        step = 3 * forward_work(lm, tokens, ctx) + VOCAB_OPS * tokens * vocab + ADAMW_OPS * lm.prunable.n_params
        if cfg.teacher == "live":
            step += forward_work(lm, tokens, ctx) + VOCAB_OPS * tokens * vocab
        stage("finetune", cfg.steps, step)
    if eval_windows:
        stage("perplexity", eval_windows, forward_work(lm, eval_ctx, eval_ctx) + VOCAB_OPS * eval_ctx * vocab)
    return out


@dataclass
class RecoveryResult:
    status: str                   # finished | stopped | failed
    message: str
    pruning: Pruning | None       # None only when nothing was recovered (stopped before any work)
    events: list
    name: str = ""                # the workspace result it became (Workspace.recover), if any


def recovered_name(base: str) -> str:
    return base if base.endswith(SUFFIX) else base + SUFFIX


@torch.no_grad()
def _masked(weights: dict, masks: dict) -> dict:
    return {n: w * masks[n].to(w.dtype) for n, w in weights.items()}


def obs_update(lm, calibration: torch.Tensor, masks: dict, progress=None, stop=None,
               timeline: Timeline | None = None, dense_share: float = 0.0, damp: float = DAMP) -> dict:
    """Survivors re-solved layer by layer with the masks fixed (SparseGPT's update); CPU weights.
    `progress(done, total)` and `timeline` (stage obs) hear of every decoder block. `dense_share`:
    how far each layer's target moves from its own outputs towards the dense model's
    (oneshot.sparsegpt_layers); `damp`: the share of the mean Hessian diagonal added to its diagonal."""
    from proxsparse_core.baselines.oneshot import sparsegpt_layers
    from proxsparse_core.sparsity.prunable import find_decoder_blocks

    def block(done, total):
        if progress:
            progress(done, total)
        if timeline is not None:
            timeline.report("obs", done, total, f"weight update (OBS): block {done}/{total}", "blocks")
    if timeline is not None:
        block(0, len(find_decoder_blocks(lm.model)[1]))
    _, weights = sparsegpt_layers(lm, calibration, block, stop, keep=masks, dense_share=dense_share, damp=damp)
    return weights


class MaskedFinetuner:
    """Fine-tunes the survivors of a 2:4 model by distillation from the dense model (W0)."""

    def __init__(self, lm, cfg: RecoveryConfig, samples: torch.Tensor, masks: dict, originals: dict,
                 on_event=None, stop: threading.Event | None = None, weights: torch.Tensor | None = None,
                 timeline: Timeline | None = None):
        self.lm, self.cfg, self.samples, self.masks, self.originals = lm, cfg, samples, masks, originals
        self.weights = weights       # [n, ctx] loss weight per position (0: predicts chat scaffolding) or None
        self.on_event = on_event or (lambda e: None)
        self.stop = stop or threading.Event()
        self.timeline = timeline     # hears the teacher pass (samples) and every step (progress.Timeline)

    def run(self, start: dict) -> tuple[dict, list, str, str]:
        """Train from the weights `start` (name → CPU weight, 2:4). Returns (weights, events,
        status, message); the model is back at W0 afterwards, whatever happens."""
        cfg, model, prunable = self.cfg, self.lm.model, self.lm.prunable
        names = list(prunable.names)
        device = str(model.get_input_embeddings().weight.device)
        order = torch.randperm(self.samples.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
        used = order[:min(self.samples.shape[0], cfg.steps * cfg.batch)]
        weights = prunable.weights()
        loss_and_grad = self._objective(weights, used, device)
        precision = torch.get_float32_matmul_precision()
        events: list[StepEvent] = []
        # the last good state (CPU): after the last completed step when the run finishes or is
        # stopped (a step is never cut short); on a non-finite loss, the last periodic snapshot
        best = {"weights": {n: w.clone() for n, w in start.items()}, "step": 0}
        try:
            with trainable(model, prunable, self.originals, {id(w) for w in weights.values()}):
                load_weights(prunable, start)
                keep = {n: self.masks[n].to(weights[n].device, weights[n].dtype) for n in names}
                scale = {n: float(self.originals[n].float().pow(2).mean().sqrt()) for n in names}
                training = MaskedTraining(weights, scale, cfg.lr, cfg.steps, max(1, cfg.steps // 10), "cosine",
                                          fused=device.startswith("cuda"), devices=[device])
                torch.set_float32_matmul_precision("high")     # TF32 matmuls on CUDA for float32 models
                one_step = self._stepper(training, weights, keep, used, device, loss_and_grad, events, best)
                status, message, done, bad = run_steps(cfg.steps, self.stop, one_step, "fine-tuning steps")
                if status == "failed":
                    kept = f"the weights after step {best['step']}" if best["step"] else "the starting weights"
                    message = f"the loss became {bad} at step {done + 1}; kept {kept}"
                elif status == "finished":
                    message = f"fine-tuned the survivors for {done} steps"
                if status != "failed" and done:
                    best["weights"] = {n: weights[n].detach().to("cpu", copy=True) for n in names}
        finally:
            torch.set_float32_matmul_precision(precision)
        return best["weights"], events, status, message

    def _objective(self, weights: dict, used: torch.Tensor, device: str):
        """loss_and_grad(batch, positions): the distillation loss of a batch with its gradients, from
        the stored teacher (read now, while the model is dense) or the live one; positions weighted by
        `self.weights` when given (a chat prompt's scaffolding counts 0)."""
        model, cfg = self.lm.model, self.cfg

        def weight_of(pos):
            return None if self.weights is None else self.weights[used[pos]].to(device)
        if cfg.teacher == "stored":
            told = None
            if self.timeline is not None:
                told = self.timeline.counter("teacher", "samples", lambda d, t: (
                    f"the dense model reads the {t:,} fine-tuning samples (the teacher): {d:,} of {t:,}"))
                told(0, used.numel())
            stored = teacher_targets(model, self.samples[used], stop=self.stop, progress=told)   # the model is dense

            def loss_and_grad(batch, pos):
                loss = distill_loss(model, batch, *stored.batch(pos, device), weight_of(pos))
                if torch.isfinite(loss):
                    loss.backward()
                return loss.detach()
            return loss_and_grad
        w0 = {n: self.originals[n].to(w.device, w.dtype) for n, w in weights.items()}
        chunk = max(1, LIVE_CHUNK_TOKENS // self.samples.shape[1])

        def loss_and_grad(batch, pos):     # gradients accumulated over chunks: the same step, less memory
            total = torch.zeros((), device=batch.device)
            weight = weight_of(pos)
            count = batch.numel() if weight is None else weight.sum().clamp_min(1.0)
            for i, part in enumerate(batch.split(chunk)):
                t_logits = live_teacher_logits(model, w0, part)
                w = None if weight is None else weight[i * chunk:(i + 1) * chunk]
                loss = full_kl(model(input_ids=part, use_cache=False).logits, t_logits, w) / count
                del t_logits
                loss.backward()
                total += loss.detach()
            return total
        return loss_and_grad

    def _stepper(self, training: MaskedTraining, weights: dict, keep: dict, used: torch.Tensor, device: str,
                 loss_and_grad, events: list, best: dict):
        """One fine-tuning step (clipped gradients, pruned weights back to exactly zero) and its event."""
        cfg, names = self.cfg, list(weights)
        hist = [0, 0, sum(m.numel() // 4 for m in self.masks.values()), 0, 0]   # 2:4 by construction
        meter = RateMeter()          # the ETA of the steps: their recent median rate, the first step left out
        t_start = time.perf_counter()
        meter.update(0, t_start)
        if self.timeline is not None:
            self.timeline.report("finetune", 0, cfg.steps, f"fine-tuning: step 0 / {cfg.steps} …", "steps")

        def project():
            for n in names:
                weights[n].mul_(keep[n])          # pruned weights stay exactly zero

        def one_step(step: int):
            t0 = time.perf_counter()
            pos = ((step - 1) * cfg.batch + torch.arange(cfg.batch)) % used.numel()
            batch = self.samples[used[pos]].to(device)
            times = training.step(lambda: loss_and_grad(batch, pos), project,
                                  lambda: torch.nn.utils.clip_grad_norm_(list(weights.values()), 1.0))
            if step % max(1, cfg.steps // 20) == 0 or step == cfg.steps:
                best["weights"] = {n: weights[n].detach().to("cpu", copy=True) for n in names}
                best["step"] = step
            now = time.perf_counter()
            elapsed, t_step = now - t_start, now - t0
            meter.update(step, now)
            eta = meter.eta(cfg.steps - step)
            ev = StepEvent(step=step, total_steps=cfg.steps, lm_loss=times.loss, l2_term=0.0, loss=times.loss,
                           lr=training.lr_at(step), share_24=1.0, nnz_hist=hist, layer_share=None,
                           t_fwd_bwd=times.fwd_bwd, t_opt=times.opt + times.project, t_prox=0.0, t_step=t_step,
                           tokens_per_s=batch.numel() / max(t_step, 1e-9), mem_bytes=memory_in_use(device),
                           elapsed=elapsed, eta=elapsed / step * (cfg.steps - step) if eta is None else eta,
                           objective="distill")
            events.append(ev)
            self.on_event(ev)
            if self.timeline is not None:
                self.timeline.report("finetune", step, cfg.steps, f"fine-tuning: step {step} / {cfg.steps}", "steps")
        return one_step


def recover(lm, calibration: torch.Tensor, base: Pruning, base_name: str, originals: dict,
            cfg: RecoveryConfig, on_event=None, stop: threading.Event | None = None,
            progress=None, tuning: torch.Tensor | None = None, timeline: Timeline | None = None) -> RecoveryResult:
    """Recover the survivors of the result `base` (named `base_name`) with `cfg.method`. The OBS
    update reads `calibration` (the run's samples); fine-tuning reads `tuning` when given (more
    samples of the same source, see RecoveryConfig.samples), else `calibration` too. `progress(done,
    total)` hears of the OBS update's blocks; `timeline` (progress.Timeline, e.g. from
    Workspace.recovery_timeline) of every stage with its ETAs: obs, teacher, finetune."""
    cfg.validate()
    if timeline is None:
        rows = (calibration if tuning is None else tuning).shape
        timeline = Timeline(recovery_stages(lm, cfg, tuple(calibration.shape), rows[0], rows[1]))
    stop = stop or threading.Event()
    t0 = time.perf_counter()
    start = base.weights if base.weights is not None else _masked(originals, base.masks)
    info = {"base": base_name, "base_method": base.method, "recovery": cfg.to_dict()}
    events, status, message = [], "finished", ""
    if cfg.method in ("obs", "both"):
        try:
            start = obs_update(lm, calibration, base.masks, progress, stop, timeline, cfg.obs_dense, cfg.obs_damp)
        except Stopped:
            return RecoveryResult("stopped", "stopped during the weight update; nothing was recovered", None, [])
        info["obs"] = True
        message = "survivors re-solved layer by layer with the mask fixed (OBS update)"
    if cfg.method in ("finetune", "both"):
        samples = calibration if tuning is None else tuning
        weights = answer_weights(samples, lm.tokenizer)     # a chat prompt's scaffolding is read, not taught
        if weights is not None:
            info["scaffolding_left_out"] = round(float((weights == 0).double().mean()), 4)
        tuner = MaskedFinetuner(lm, cfg, samples, base.masks, originals, on_event, stop, weights, timeline)
        try:
            start, events, status, ft_message = tuner.run(start)
        except Stopped as exc:
            if cfg.method == "finetune":
                return RecoveryResult("stopped", str(exc), None, [])
            status, ft_message = "stopped", "stopped before fine-tuning; kept the OBS update"
        info["finetune_steps"] = len(events)
        info["finetune_samples"] = int(min(samples.shape[0], cfg.steps * cfg.batch))
        message = f"{message}; {ft_message}" if message else ft_message
    info.update(status=status, message=message, seconds=round(time.perf_counter() - t0, 2))
    pruning = Pruning(f"{base.method}{SUFFIX}", base.masks, _masked(start, base.masks), info)
    return RecoveryResult(status, message, pruning, events)
