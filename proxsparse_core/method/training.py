"""The masked-training loop that ProxSparse learning and recovery share.

Both train the prunable weights of a model with AdamW, one learning rate per layer (the base rate
times the layer's scale), a linear warm-up then a constant or cosine rate, and a projection after
every optimizer step: the 2:4 prox for learning, "pruned weights stay zero" for recovery. Both emit
one `StepEvent` per step, stop cleanly between steps, and give the model back exactly as it came.

* `StepEvent` — the plain record a step emits (the UI plots it, the CLI prints it);
* `lr_factor` — the schedule (warm-up, then constant or cosine);
* `MaskedTraining` — the optimizer over per-layer groups and one step: loss and gradients,
  an optional hook before the update, AdamW, the schedule, the projection; timed;
* `trainable` — the model in training mode with only the chosen parameters trainable, and
  everything restored (W0, flags, cache, mode, gradients) however the block ends;
* `run_steps` — the loop: Stop between steps, a non-finite loss ends it as "failed";
* `eta_seconds`, `memory_in_use` — what every event reports.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from proxsparse_core.method.adamw_native import AdamW
from proxsparse_core.native import cpu_has_native_bf16
from proxsparse_core.sparsity.masks import load_weights


def autocast_mode(setting: str, device: str, dtype: torch.dtype) -> str:
    """"bf16" when a model's forward passes (learning's and the held-out scores') run under bfloat16
    autocast: RunConfig.cpu_autocast "auto", a float32 model on a CPU with native bf16; else "off"."""
    on = setting == "auto" and device == "cpu" and dtype == torch.float32 and cpu_has_native_bf16()
    return "bf16" if on else "off"


def autocast_context(mode: str):
    """The context a forward pass runs in for `mode` ("bf16" or "off", autocast_mode)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()


@dataclass
class StepEvent:
    step: int
    total_steps: int
    lm_loss: float
    l2_term: float              # λ2 · L2 (0 when λ2 is off)
    loss: float
    lr: float
    share_24: float             # share of prunable groups with ≤ 2 non-zeros
    nnz_hist: list[int]         # groups with 0, 1, 2, 3, 4 non-zeros
    layer_share: list[float] | None  # per prunable layer (order of LearnResult.layer_names), every N steps
    t_fwd_bwd: float
    t_opt: float
    t_prox: float
    t_step: float
    tokens_per_s: float
    mem_bytes: int              # peak device memory (CUDA) or resident memory (CPU)
    elapsed: float
    eta: float
    objective: str = "lm"       # what lm_loss is: "lm" (next-token loss) or "distill" (KL to the dense model)
    mem_by_device: dict | None = None   # device → peak memory, when the model spans several devices
    heldout_loss_24: float | None = None     # held-out next-token loss of W0 · (current top-2 mask), when measured
    heldout_loss_dense: float | None = None  # the dense model's on the same held-out tokens (measured once)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        held = ""
        if self.heldout_loss_24 is not None:
            held = f"  held-out loss if stopped now {self.heldout_loss_24:.4f}"
            if self.heldout_loss_dense is not None:
                held += f" (dense {self.heldout_loss_dense:.4f})"
        return (f"step {self.step}/{self.total_steps}  {'KL to dense' if self.objective == 'distill' else 'loss'} "
                f"{self.lm_loss:.4f}"
                + (f" + λ2·L2 {self.l2_term:.4f}" if self.l2_term else "")
                + f"  2:4 {100 * self.share_24:5.1f}%"
                + f"  groups with 0/1/2/3/4 non-zeros: {' / '.join(f'{n:,}' for n in self.nnz_hist)}"
                + held
                + f"  fwd+bwd {self.t_fwd_bwd:.2f}s opt {self.t_opt:.2f}s prox {self.t_prox:.2f}s"
                + f"  {self.tokens_per_s:.0f} tok/s  mem {self.mem_bytes / 2**30:.2f} GiB"
                + f"  eta {self.eta:.0f}s")


def memory_in_use(device: str) -> int:
    """Peak allocated memory of a CUDA device; the process's resident memory otherwise."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def memory_by_device(devices) -> dict[str, int]:
    """Peak allocated memory of each CUDA device in `devices`, resident memory for "cpu". With a
    model split over devices (accelerate's device_map) every device reports its own share."""
    out = {}
    for d in devices:
        d = torch.device(d)
        out[str(d)] = (int(torch.cuda.max_memory_allocated(d)) if d.type == "cuda" and torch.cuda.is_available()
                       else memory_in_use("cpu"))
    return out


def sync(device):
    """Wait for the GPU work of `device` (a name, or a collection of names: every CUDA device used)."""
    for d in ([device] if isinstance(device, str) else device):
        if str(d).startswith("cuda"):
            torch.cuda.synchronize(torch.device(d))


def eta_seconds(step_times: list[float], total: int, held_spent: float = 0.0, held_cost: float = 0.0) -> float:
    """Seconds left: the median of the recent step times (the first step, which warms caches and
    allocates the optimizer state, is left out once there are others) for each step left, plus
    the share of time spent on measurements between steps and the last one's cost."""
    left = total - len(step_times)
    if left <= 0 or not step_times:
        return 0.0
    recent = step_times[1:][-10:] or step_times
    per_step = statistics.median(recent)
    trained = sum(step_times)
    return per_step * left * (1 + held_spent / max(trained, 1e-9)) + held_cost


def lr_factor(step_index: int, steps: int, warm: int, schedule: str) -> float:
    """The learning-rate multiplier of step `step_index` + 1 of `steps`: a linear warm-up over the
    first `warm` steps, then 1 ("constant") or a cosine decay towards 0 ("cosine"; the last step
    still moves a little)."""
    s = step_index + 1
    if s <= warm:
        return s / warm
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm + 1)))
    return 1.0


class NonFiniteLoss(Exception):
    """A step's loss was NaN or infinite; nothing of that step was applied."""

    def __init__(self, loss: float):
        super().__init__(f"the loss became {loss}")
        self.loss = loss


@dataclass
class StepTimes:
    loss: float
    fwd_bwd: float        # seconds: loss and gradients
    opt: float            # seconds: the hook before the update, AdamW and the schedule
    project: float        # seconds: the projection after the update (the prox, or masking)
    extra: object = None  # what the `before` hook returned (e.g. the λ2 term)


class MaskedTraining:
    """AdamW over the prunable weights `weights` (name → parameter), one group per layer at
    `lr · scale[name]`, plus `rest` (other trained parameters) at `lr`; the rate follows
    `lr_factor`. `step()` does one optimisation step and returns its timings.

    With `master=True`, prunable weights held in bfloat16 or float16 get a float32 master copy:
    AdamW (whose moments are then float32 too) and the projection act on the copies
    (`params`), the model's weights are the copies rounded to their own dtype after every step,
    and only the model's weights see the forward and backward passes. An update smaller than half
    the spacing of bf16 values near a weight (|w|·2⁻⁹ to |w|·2⁻⁸) would otherwise be rounded away
    at every step; in the copy it accumulates. Costs 10 bytes per such weight at the update (the
    copy, its float32 gradient, float32 moments instead of bf16 ones), 8 between updates
    (docs/gpu.md). `rest` keeps its own dtype."""

    def __init__(self, weights: dict, scale: dict, lr: float, steps: int, warm: int, schedule: str,
                 rest: list | None = None, fused: bool = False, devices=("cpu",), master: bool = False):
        self.weights, self.lr, self.steps, self.warm, self.schedule = weights, lr, steps, warm, schedule
        self.devices = list(devices)
        self.masters = {n: w.detach().float().requires_grad_() for n, w in weights.items()
                        if master and w.requires_grad and w.dtype in (torch.bfloat16, torch.float16)}
        self.params = {n: self.masters.get(n, w) for n, w in weights.items()}   # what AdamW and the projection move
        groups = [{"params": [self.params[n]], "lr": lr * scale[n]} for n, w in weights.items() if w.requires_grad]
        if rest:
            groups.append({"params": list(rest), "lr": lr})
        # on the CPU, torch's AdamW with its update in C (adamw_native: the same bits, fewer passes)
        self.opt = (torch.optim.AdamW if fused else AdamW)(groups, lr=lr, weight_decay=0.0, fused=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.factor)

    def factor(self, step_index: int) -> float:
        return lr_factor(step_index, self.steps, self.warm, self.schedule)

    def lr_at(self, step: int) -> float:
        """The peak-relative learning rate of step `step` (1-based), as the events report it."""
        return self.lr * self.factor(step - 1)

    def step(self, loss_and_grad: Callable[[], torch.Tensor], project: Callable[[], None],
             before: Callable[[], object] | None = None) -> StepTimes:
        """`loss_and_grad()` computes the loss and its gradients (it must not call backward on a
        non-finite loss); then `before()` (e.g. gradients of an extra term, clipping), AdamW, the
        schedule, and `project()` (the prox, or pruned weights back to zero). A non-finite loss
        raises NonFiniteLoss before any weight moves. With master copies, `before()` and
        `project()` must act on `params` (the copies); the gradients are moved onto them before
        `before()`, and the model's weights are refreshed from them after `project()`."""
        t0 = time.perf_counter()
        loss = loss_and_grad()
        value = float(loss)
        if not math.isfinite(value):
            self.zero_grad()
            raise NonFiniteLoss(value)
        sync(self.devices)
        t1 = time.perf_counter()
        self._grads_to_masters()
        extra = before() if before is not None else None
        self.opt.step()
        self.sched.step()
        self.zero_grad()
        sync(self.devices)
        t2 = time.perf_counter()
        with torch.no_grad():
            project()
            for n, m in self.masters.items():       # the model's weights: the copies, rounded
                self.weights[n].data.copy_(m)
        sync(self.devices)
        return StepTimes(value, t1 - t0, t2 - t1, time.perf_counter() - t2, extra)

    def _grads_to_masters(self) -> None:
        """Each master copy takes its weight's gradient in float32; the weight's own is freed at
        once (one layer at a time, so at most one layer holds both)."""
        for n, m in self.masters.items():
            w = self.weights[n]
            m.grad = None if w.grad is None else w.grad.float()
            w.grad = None

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for n in self.masters:
            self.weights[n].grad = None

    def release(self):
        """Free the optimizer state and the master copies in place (nothing big stays alive in a
        traceback)."""
        self.zero_grad()
        self.opt.state.clear()
        for group in self.opt.param_groups:      # they hold the master copies too
            group["params"] = []
        self.masters.clear()
        self.params.clear()
        if isinstance(self.opt, AdamW):
            self.opt._scratch = None


@contextlib.contextmanager
def trainable(model, prunable, originals: dict, trained_ids: set, grad_ckpt: bool = False):
    """While inside: only the parameters whose id() is in `trained_ids` need gradients, the KV
    cache is off, the model is in training mode (with gradient checkpointing if asked). On the way
    out, however the block ends, the prunable weights are W0 (`originals`) again and the flags,
    the cache setting, the mode and the gradients are as they were."""
    saved_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    use_cache = getattr(model.config, "use_cache", None)
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in trained_ids)
        if grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        yield
    finally:
        if grad_ckpt:
            model.gradient_checkpointing_disable()
        model.config.use_cache = use_cache
        model.train(was_training)
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved_grad.get(n, True))
        load_weights(prunable, originals)              # back to the dense W0


def run_steps(steps: int, stop: threading.Event, one_step: Callable[[int], None],
              unit: str = "steps") -> tuple[str, str, int, float | None]:
    """Call `one_step(step)` for step = 1 … `steps`, checking `stop` before each. Returns
    (status, message, steps done, the non-finite loss or None): "finished", "stopped", or
    "failed" when a step raised NonFiniteLoss (that step was not applied)."""
    done = 0
    for step in range(1, steps + 1):
        if stop.is_set():
            return "stopped", f"stopped by the user after {done} {unit}", done, None
        try:
            one_step(step)
        except NonFiniteLoss as exc:
            return "failed", str(exc), done, exc.loss
        done = step
    return "finished", f"finished {done} {unit}", done, None
