"""The ProxSparse learner: proximal gradient on the causal-LM loss.

Each step: LM loss (+ λ2 frozen-weight term) → backward → AdamW step (linear warm-up) → the 2:4
prox with λ1 on every prunable weight. After the last step the mask is the top-2 |W| of every
group. With score "activation" the prox and the mask work on W·diag(a), a_j the dense model's
norm of input channel j (scores.py): the top-2 |W|·a, Wanda's ranking, refined by the loss.
On a bf16 or fp16 model AdamW, the prox and the λ2 term act on float32 master copies of the
prunable weights (master_weights "fp32", the default; training.MaskedTraining), and the model's
weights, which the forward pass and the mask read, are the copies rounded after every step.
The learner emits one plain `StepEvent` per step (the UI plots them, the CLI prints them),
stops cleanly between steps when asked, and always gives back a mask from the last good state.
The model's weights are restored to W0 however it ends (even on an exception), so the caller
still holds the dense model.

Given a few held-out windows, it also measures now and then what the run would give if it stopped
now: the held-out loss of W0 under the current top-2 mask, next to the dense model's loss on the
same tokens. The training loss rises while the prox pushes groups towards 2:4; this curve shows
the pruned model getting better at the same time, the gap to dense closing as groups settle.
"""
from __future__ import annotations

import gc
import contextlib
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from proxsparse_core.config import RunConfig
from proxsparse_core.memo import source_of
from proxsparse_core.method.distill import distill_loss, teacher_targets
from proxsparse_core.sparsity import masks_native, scores
from proxsparse_core.sparsity.masks import clean_and_count, extract_masks, mask_2to4, snapshot
from proxsparse_core.method import prox_native
from proxsparse_core.method.prox import FAST_TOL, MAX_SWEEPS, prox_2to4_, triton_kernels
from proxsparse_core.sparsity.scores import ChannelNorms, channel_weights, ranking
from proxsparse_core.method.training import (MaskedTraining, StepEvent, autocast_context, eta_seconds,  # noqa: F401
                                             autocast_mode, memory_by_device, memory_in_use, run_steps, trainable)


@dataclass
class LearnResult:
    status: str                  # "finished", "stopped" or "failed"
    message: str
    steps_done: int
    masks: dict                  # name → bool mask (CPU), from the last good learned state
    layer_names: list[str]
    events: list[StepEvent] = field(default_factory=list)
    learned_share_24: float = 0.0  # share of groups already 2:4 in the learned weights
    name: str = ""               # the workspace result it became (Workspace.learn), if any
    master_weights: str = "none"   # "fp32": AdamW and the prox moved float32 copies of bf16/fp16 weights;
                                   # "none": the model's own weights (a float32 model, or master_weights off)
    autocast: str = "off"          # "bf16": the forward passes ran under bfloat16 autocast (cpu_autocast)


@torch.no_grad()
def frozen_weight_term_(weights: dict, w0: dict, lam2: float, eps: float, scale: dict | None = None) -> float:
    """λ2 · Σ (W·(W−W0)/(|W0|+ε))², with its gradient added to W.grad analytically (no autograd
    graph, and W0 may live on another device: it is moved one matrix at a time, in its own dtype).
    On CUDA one fused Triton pass per matrix does it; the sum is read back once, not per matrix.

    With `scale` (layer name → s = rms(W0), lambda_scale=layer) the term is the same one measured
    in units of each layer's scale: W, W0 and ε are read as W/s, W0/s and ε, i.e. layer n uses
    ε·s and λ2/s², so λ2 and ε mean the same on layers (and models) of any weight scale."""
    totals, lams = {}, []   # per device: Σu² of each layer (in order); λ2 of each layer
    tri = triton_kernels()
    for n, w in weights.items():
        s = scale[n] if scale is not None else 1.0
        lam_n, eps_n = lam2 / (s * s), eps * s
        ref = w0[n].to(w.device, non_blocking=True)
        if tri is not None and tri.frozen_supports(w, ref, w.grad):
            acc = totals.setdefault(str(w.device), torch.zeros(len(weights), dtype=torch.float32, device=w.device))
            tri.frozen_grad_(w.detach(), ref, w.grad, lam_n, eps_n, acc[len(lams):len(lams) + 1])
            lams.append(lam_n)
            continue
        ref = ref.float()
        wf = w.detach().float()
        d = ref.abs().add_(eps_n)
        u = wf * (wf - ref) / d
        acc = totals.setdefault(str(w.device), torch.zeros(len(weights), dtype=torch.float32, device=w.device))
        acc[len(lams)] = (u * u).sum()
        lams.append(lam_n)
        g = (2 * lam_n) * u * (2 * wf - ref) / d
        if w.grad is None:
            w.grad = g.to(w.dtype)
        else:
            w.grad.add_(g.to(w.grad.dtype))
    lam = torch.tensor(lams, dtype=torch.float32)
    return float(sum((acc.cpu() * lam).sum() for acc in totals.values())) if totals else 0.0


def held_gap(cost: float, step_times: list[float]) -> float:
    """Steps until the next held-out measurement, so that measuring takes HELDOUT_BUDGET of the time."""
    if HELDOUT_BUDGET <= 0:
        return math.inf
    per_step = statistics.median(step_times[-10:])
    return max(1, math.ceil(cost / (HELDOUT_BUDGET * max(per_step, 1e-9))))


HELDOUT_WINDOWS = 2       # held-out windows of the "if stopped now" measurement, each cut to ctx/2 tokens:
                          # one forward pass over as many tokens as a step's batch of one (no backward)
HELDOUT_BUDGET = 0.03     # between step 1 and the last step it runs at evenly spaced stats steps, spaced so
                          # that it costs this share of the run (plus the two ends; the dense reference is
                          # read from the model's memo after the first run)
NORM_SAMPLES = 32         # with the LM loss (no teacher pass to share) the channel norms of score "activation" read
                          # the run's first 32 samples (all of them cost several times as long on a CPU;
                          # bench/RESULTS.md); kept in the model's memo for the next run on the same samples


@contextlib.contextmanager
def masked_w0(prunable, originals: dict, cols: dict | None = None):
    """While inside, every prunable layer computes with W0 · (top-2 mask of its current weights,
    ranked as the final mask is: |W|, or |W|·a with `cols`),
    built one layer at a time as the forward pass reaches it (no copy of the whole model: one buffer
    per layer shape on the CPU). The
    learned weights are never modified: each layer's tensor is swapped back right after its call,
    and on the way out whatever a failed forward left swapped."""
    learned: dict = {}
    scratch: dict = {}      # (shape, dtype) → [mask, W0·mask]: reused by each layer of that shape in turn

    def before(name):
        def hook(module, args):
            w = module.weight
            learned[name] = w.data
            a = None if cols is None else cols[name]
            o = originals[name]
            if masks_native.supports(w.data, a) and o.device == w.device and o.dtype == w.dtype:
                # one pass for the mask, one for W0·mask, into buffers the next layer of this shape reuses
                keep, pruned = scratch.setdefault((tuple(w.shape), w.dtype), [torch.empty(w.shape, dtype=torch.bool),
                                                                             torch.empty_like(w.data)])
                torch.mul(o, masks_native.mask_(w.data, a, out=keep), out=pruned)
                w.data = pruned
            else:
                keep = mask_2to4(w.data, ranking(w.data, a))
                w.data = o.to(w.device, w.dtype, non_blocking=True) * keep.to(w.device, w.dtype)
        return hook

    def after(name):
        def hook(module, args, output):
            module.weight.data = learned.pop(name)
        return hook

    handles = []
    try:
        for n in prunable.names:
            m = prunable.modules[n]
            handles += [m.register_forward_pre_hook(before(n)), m.register_forward_hook(after(n))]
        yield
    finally:
        for h in handles:
            h.remove()
        for n, data in learned.items():
            prunable.modules[n].weight.data = data


@torch.no_grad()
def heldout_loss(model, batch: torch.Tensor) -> float:
    """Next-token loss of `model` on `batch` in eval mode (the training mode is put back)."""
    was_training = model.training
    model.eval()
    try:
        return float(model(input_ids=batch, labels=batch, use_cache=False).loss)
    finally:
        model.train(was_training)


@dataclass
class _Plan:
    """What a run prepares before its first step (all on the layers' own devices)."""
    order: torch.Tensor                  # the sample order
    lam: dict                            # layer → λ1 in the coordinates the prox works in
    scale: dict                          # layer → lr (and λ2) scale: rms(W0) with lambda_scale "layer", else 1
    w0: dict | None = None               # the λ2 copy of W0
    teacher: object = None               # distill.TeacherTargets, with the LM loss None
    slot: torch.Tensor | None = None     # sample index → row of `teacher`
    cols: dict | None = None             # score "activation": layer → weight per input channel


class ProxSparseLearner:
    """Learns a 2:4 mask for `lm` (a models.LoadedModel) from calibration samples.

    `held_out` (token windows, optional): a few of them measure the "if stopped now" loss.
    `originals` (optional): the caller's CPU copy of W0, used instead of taking another one."""

    def __init__(self, lm, cfg: RunConfig, samples: torch.Tensor,
                 on_event: Callable[[StepEvent], None] | None = None,
                 stop: threading.Event | None = None,
                 held_out: torch.Tensor | None = None, originals: dict | None = None, memo=None):
        self.lm, self.cfg, self.samples = lm, cfg, samples
        self.on_event = on_event or (lambda e: None)
        self.stop = stop or threading.Event()
        self.names = list(lm.prunable.names)
        self.held_out = (held_out[:HELDOUT_WINDOWS, :min(held_out.shape[1], max(cfg.ctx // 2, 16))]
                         if held_out is not None and held_out.numel() else None)
        self.originals = originals
        self.memo = memo              # memo.ModelMemo of the model, or None: the dense model's facts computed anew

    def _dense_fact(self, kind: str, inputs: tuple, compute):
        """What the dense model gives for `inputs` (channel norms, a held-out loss): read from the
        model's memo when it has it, else computed (and kept there). Tensors come back on the devices
        they were computed on: a layer's channel weights on that layer's."""
        if self.memo is None:
            return compute()
        value = self.memo.lookup(kind, *inputs)
        if value is None:
            value = compute()
            self.memo.store(kind, value, *inputs)
        elif isinstance(value, dict):
            value = {n: t.to(self.lm.prunable.modules[n].weight.device) for n, t in value.items()}
        return value

    def _input_device(self):
        return self.lm.model.get_input_embeddings().weight.device

    def run(self) -> LearnResult:
        """Learn, and give the model back exactly as it came, whatever happens.

        On every exit (a normal end, Stop, a NaN loss, out of memory, and any other exception,
        e.g. a kernel or CUDA error or Ctrl-C) the prunable weights are W0 again, parameters
        trained with train_all are restored, and so are the requires_grad flags, use_cache,
        gradient checkpointing and the train/eval mode; the optimizer state, the master copies,
        the λ2 copy of W0 and all gradients are released. Out of memory and a NaN loss end the
        run as "failed" with the mask of the last good step. Any other exception is re-raised
        after the restore: the step it interrupted was half-applied, so no mask is made from it."""
        cfg, model, prunable = self.cfg, self.lm.model, self.lm.prunable
        device = str(self._input_device())
        weights = prunable.weights()
        own_copy = self.originals is None
        originals = snapshot(prunable) if own_copy else self.originals    # W0, on the CPU
        prunable_ids = {id(w) for w in weights.values()}
        trained = {id(p) for p in model.parameters() if cfg.train_all or id(p) in prunable_ids}
        # with train_all, the other trained parameters are restored too (the pruned model is W0*mask)
        others = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                  if cfg.train_all and id(p) not in prunable_ids}
        scratch: dict = {}       # optimizer, λ2 copy of W0, channel weights: emptied in place when the run ends
        try:
            with trainable(model, prunable, originals, trained, cfg.grad_ckpt):
                status, message, done, events = self._loop(weights, originals, prunable_ids, device, scratch)
                master = "fp32" if scratch["training"].masters else "none"
                autocast = scratch.get("autocast", "off")
                masks, share = self._extract(weights, scratch.get("cols"))
        finally:
            self._release(scratch)
            if others:
                named = dict(model.named_parameters())
                with torch.no_grad():
                    for n, v in others.items():
                        named[n].data.copy_(v)
            others.clear()
            if own_copy:
                originals.clear()
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if status == "finished":
            message = f"finished {done} steps; {100 * share:.1f}% of groups were already 2:4"
        return LearnResult(status, message, done, masks, self.names, events, share, master_weights=master,
                           autocast=autocast)

    def _extract(self, weights: dict, cols: dict | None) -> tuple[dict, float]:
        """The mask from the learned weights, and the share of groups that were already 2:4."""
        total_groups = sum(w.numel() // 4 for w in weights.values())
        with torch.no_grad():
            # a diverged weight must not poison the mask ranking: non-finite weights become 0
            learned_hist = clean_and_count(weights)
            masks = extract_masks(self.lm.prunable, cols)
        return masks, float(learned_hist[:3].sum()) / max(1, total_groups)

    @staticmethod
    def _release(scratch: dict):
        """Free the optimizer state, the master copies and the λ2 copy of W0 in place, so that
        nothing big stays alive even while an exception's traceback still holds the loop's frame."""
        training = scratch.pop("training", None)
        if training is not None:
            training.release()
        w0 = scratch.pop("w0", None)
        if w0 is not None:
            w0.clear()
        scratch.clear()

    def _plan(self, weights: dict, originals: dict, device: str, scratch: dict) -> _Plan:
        """The sample order, the λ2 copy of W0, the teacher's targets and channel weights, and the
        per-layer λ1 and learning-rate scales."""
        cfg, model = self.cfg, self.lm.model
        torch.manual_seed(cfg.seed)
        order = torch.randperm(self.samples.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
        w0 = None
        if cfg.lambda2 > 0:
            if cfg.w0_offload:   # pinned, so each step's copy to the GPU is a fast DMA
                w0 = ({n: t.pin_memory() for n, t in originals.items()} if device.startswith("cuda")
                      else dict(originals))
            else:
                w0 = {n: originals[n].to(weights[n].device) for n in self.names}
            scratch["w0"] = w0
        used = order[:min(self.samples.shape[0], cfg.steps * cfg.batch)]    # the samples the run reads
        # score "activation": the regulariser acts on W·diag(a), a_j the dense model's ‖X_j‖ over the
        # samples the run reads (scores.py), recorded during the teacher's pass when there is one
        activation = cfg.score == "activation"
        teacher = cols = slot = None
        if cfg.loss == "distill":   # the dense model's distributions, read once before any weight moves
            with ChannelNorms(self.lm.prunable) if activation else contextlib.nullcontext() as norms:
                teacher = teacher_targets(model, self.samples[used], stop=self.stop)
            slot = torch.full((self.samples.shape[0],), -1, dtype=torch.long)
            slot[used] = torch.arange(used.numel())
            cols = norms.weights() if activation else None
        elif activation:
            picked = self.samples[used[:NORM_SAMPLES]]
            cols = self._dense_fact("channel-norms", (picked, source_of(scores.channel_weights, ChannelNorms,
                                                                        scores.InputNorms), scores.MIN_WEIGHT),
                                    lambda: channel_weights(self.lm, picked, stop=self.stop))
        if cols is not None:
            scratch["cols"] = cols
        # per-layer λ1 and learning rate. "none" is the published method. "layer" makes the step
        # scale-free: prox_λ(s·y) = s·prox_{λs}(y), so λ1/s shrinks every layer by the same share of
        # its own scale s = rms(W0), and lr·s moves every layer by the same share under Adam.
        def rms(n, weighted=False):
            w = originals[n].float()
            if weighted and cols is not None:
                w = w * cols[n].cpu().unsqueeze(0)
            return float(w.pow(2).mean().sqrt())
        layer = cfg.lambda_scale == "layer"
        scale = {n: (rms(n) if layer else 1.0) for n in self.names}
        # λ1 in the coordinates the prox works in (W, or W·diag(a)): there the scale is rms(W0·diag(a))
        lam = {n: cfg.lambda1 / max(rms(n, True) if layer else 1.0, 1e-12) for n in self.names}
        return _Plan(order, lam, scale, w0, teacher, slot, cols)

    def _prox_all(self, weights: dict, plan: _Plan) -> dict:
        """The 2:4 prox on every layer; returns each layer's count of groups with 0…4 non-zeros
        (the kernels count them as they go: one row per layer, on its own device)."""
        data = [weights[n].data for n in self.names]
        cols = None if plan.cols is None else [plan.cols[n] for n in self.names]
        lams = [plan.lam[n] for n in self.names]
        if all(lam >= 0 for lam in lams) and prox_native.layers_supported(data, cols):
            # every layer in one call of the C kernel, the same results as the loop below
            return dict(zip(self.names, prox_native.prox_layers_(data, lams, FAST_TOL, MAX_SWEEPS, cols)))
        rows = {}
        for n in self.names:
            dev = weights[n].device
            rows[n] = torch.zeros(5, dtype=torch.long, device=dev)
            if plan.cols is None:
                prox_2to4_(weights[n], plan.lam[n], hist=rows[n])
            else:   # the prox of R(W·diag(a)) in the metric ‖(W − Z)·diag(a)‖², in float32 so
                a = plan.cols[n].to(dev).unsqueeze(0)     # that a bf16 weight it leaves alone comes back exact
                v = weights[n].data.float() * a
                prox_2to4_(v, plan.lam[n], hist=rows[n])
                weights[n].data.copy_(v.div_(a))
        return rows

    def _loop(self, weights: dict, originals: dict, prunable_ids: set, device: str, scratch: dict):
        """The optimisation itself; returns (status, message, steps done, events)."""
        run = self._start(weights, originals, prunable_ids, device, scratch)
        try:
            status, message, done, bad = run_steps(self.cfg.steps, self.stop, lambda step: self._step(run, step))
            if status == "failed":
                message = (f"the loss became {bad} at step {done + 1}: the run stopped and "
                           f"kept the state after step {done}. Lower the learning rate or λ.")
            elif status == "finished":
                message = f"finished {self.cfg.steps} steps"
        except torch.OutOfMemoryError:
            done = len(run.events)
            status = "failed"
            message = (f"out of memory at step {done + 1}: lower ctx or batch, turn on gradient "
                       f"checkpointing, keep W0 on the CPU (w0_offload) or turn λ2 off. "
                       f"The state after step {done} was kept.")
        return status, message, done, run.events

    def _start(self, weights: dict, originals: dict, prunable_ids: set, device: str, scratch: dict) -> "_Run":
        """What every step shares: the plan, the optimizer (kept in `scratch` for its release), the
        held-out measurement; the peak-memory counters reset and the model in training mode."""
        cfg, model = self.cfg, self.lm.model
        # with accelerate's device_map the layers live on several devices: every per-layer operation
        # (prox, λ2 term, statistics) runs on its layer's own device; only small rows are gathered
        devices = sorted({device} | {str(w.device) for w in weights.values()})
        plan = self._plan(weights, originals, device, scratch)
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in prunable_ids]
        training = scratch["training"] = MaskedTraining(
            weights, plan.scale, cfg.lr, cfg.steps, max(1, int(round(cfg.warmup * cfg.steps))), cfg.lr_schedule,
            rest=rest, fused=all(d.startswith("cuda") for d in devices), devices=devices,
            master=cfg.master_weights == "fp32")
        for d in devices:
            if d.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(torch.device(d))
        scratch["autocast"] = autocast_mode(cfg.cpu_autocast, device, next(iter(weights.values())).dtype)
        held = _HeldOut(self, originals, plan.cols, device)
        groups = sum(w.numel() // 4 for w in weights.values())
        run = _Run(training.params, plan, training, held, device, devices, groups, autocast=scratch["autocast"])
        model.train()
        return run

    def _step(self, run: "_Run", step: int) -> None:
        """One step: its batch, the loss and gradients, the λ2 term, AdamW, the prox; then its event."""
        cfg, plan = self.cfg, run.plan
        t0 = time.perf_counter()
        pos = ((step - 1) * cfg.batch + torch.arange(cfg.batch)) % self.samples.shape[0]
        picked = plan.order[pos]
        batch = self.samples[picked].to(run.device)
        rows = {}
        l2_term = None if plan.w0 is None else (lambda: frozen_weight_term_(
            run.weights, plan.w0, cfg.lambda2, cfg.eps, plan.scale if cfg.lambda_scale == "layer" else None))
        times = run.training.step(self._loss_and_grad(batch, picked, plan, run.device, run.autocast),
                                  lambda: rows.update(self._prox_all(run.weights, plan)), l2_term)
        self._report(run, step, times, rows, batch.numel(), t0)

    def _loss_and_grad(self, batch: torch.Tensor, picked: torch.Tensor, plan: _Plan, device: str,
                       autocast: str = "off"):
        """The step's loss (KL to the teacher, or the LM loss) with its gradients; no backward
        through a non-finite loss. `autocast` "bf16": the forward pass under bfloat16 autocast."""
        model = self.lm.model

        def loss_and_grad():
            with autocast_context(autocast):
                if plan.teacher is not None:
                    loss = distill_loss(model, batch, *plan.teacher.batch(plan.slot[picked], device))
                else:
                    loss = model(input_ids=batch, labels=batch).loss
            loss = loss.float()
            if torch.isfinite(loss):
                loss.backward()
            return loss.detach()
        return loss_and_grad

    def _report(self, run: "_Run", step: int, times, rows: dict, tokens: int, t0: float) -> None:
        """The step's event (2:4 counts, per-layer shares every N steps, the "if stopped now" loss
        when due, timings, memory, ETA), kept and handed to `on_event`."""
        cfg, device = self.cfg, run.device
        per_layer = torch.stack([r.to(device) for r in rows.values()]).cpu()
        hist = per_layer.sum(0)
        want_layers = step % cfg.layer_stats_every == 0 or step == cfg.steps
        layer_share = ((per_layer[:, :3].sum(1).double() / per_layer.sum(1).clamp_min(1)).tolist()
                       if want_layers else None)
        t_step = time.perf_counter() - t0
        run.step_times.append(t_step)
        pruned_loss = run.held.maybe_measure(step, want_layers, run.step_times)
        elapsed = time.perf_counter() - run.t_start
        l2 = times.extra or 0.0
        ev = StepEvent(
            step=step, total_steps=cfg.steps, lm_loss=times.loss, l2_term=l2, loss=times.loss + l2,
            lr=run.training.lr_at(step), share_24=float(hist[:3].sum()) / max(1, run.total_groups),
            nnz_hist=hist.tolist(), layer_share=layer_share,
            t_fwd_bwd=times.fwd_bwd, t_opt=times.opt, t_prox=times.project, t_step=t_step,
            tokens_per_s=tokens / max(t_step, 1e-9),
            mem_bytes=memory_in_use(device), elapsed=elapsed,
            mem_by_device=memory_by_device(run.devices) if len(run.devices) > 1 else None,
            eta=eta_seconds(run.step_times, cfg.steps, run.held.spent, run.held.cost),
            objective=cfg.loss, heldout_loss_24=pruned_loss, heldout_loss_dense=run.held.dense)
        run.events.append(ev)
        self.on_event(ev)


@dataclass
class _Run:
    """What one learning run carries from step to step."""
    weights: dict                        # name → what AdamW, the prox and λ2 act on: the prunable weight or
                                         # its float32 master copy (MaskedTraining.params)
    plan: _Plan
    training: MaskedTraining
    held: "_HeldOut"
    device: str                          # the input device
    devices: list                        # every device a layer lives on (and the input device)
    total_groups: int
    autocast: str = "off"                # "bf16": forward passes under bfloat16 autocast (autocast_mode)
    events: list = field(default_factory=list)
    step_times: list = field(default_factory=list)      # per step, without the held-out measurement
    t_start: float = field(default_factory=time.perf_counter)


class _HeldOut:
    """The "if stopped now" measurement: the held-out loss of W0 under the current top-2 mask, at
    step 1, the last step and evenly spaced stats steps costing about HELDOUT_BUDGET of the run,
    next to the dense model's loss on the same tokens (measured once, before any weight moves)."""

    def __init__(self, learner: ProxSparseLearner, originals: dict, cols: dict | None, device: str):
        self.learner, self.originals, self.cols = learner, originals, cols
        self.batch = learner.held_out.to(device) if learner.held_out is not None else None
        self.dense, self.cost, self.spent = None, 0.0, 0.0
        self.next = 1                    # the first step at which the next measurement may run
        self.costs: list[float] = []     # seconds per measurement
        if self.batch is not None:       # the reference line, while the weights are still W0
            t0 = time.perf_counter()
            self.dense = learner._dense_fact("heldout-loss", (self.batch, source_of(heldout_loss)),
                                             lambda: heldout_loss(learner.lm.model, self.batch))
            self.cost = self.spent = time.perf_counter() - t0

    def maybe_measure(self, step: int, stats_step: bool, step_times: list[float]) -> float | None:
        total = self.learner.cfg.steps
        if self.batch is None or not (step in (1, total) or (stats_step and step >= self.next)):
            return None
        t0 = time.perf_counter()
        with masked_w0(self.learner.lm.prunable, self.originals, self.cols):
            loss = heldout_loss(self.learner.lm.model, self.batch)
        self.cost = time.perf_counter() - t0
        self.spent += self.cost
        self.costs.append(self.cost)     # the least of the last few: one slow call (a busy machine) is no rule
        self.next = step + held_gap(min(self.costs[-3:]), step_times)
        return loss
