"""AdamW on the CPU with torch.optim.AdamW's exact results in fewer passes over memory.

torch.optim.AdamW on CPU tensors runs its update as seven elementwise operations and two temporaries
per parameter (lerp, mul, addcmul, sqrt, div, add, addcdiv), each a pass over memory; for a model's
worth of weights that is a large share of a learning step on a small CPU. `AdamW` here is
torch.optim.AdamW whose update, for float32 CPU parameters and the settings the training loop uses
(no weight decay, amsgrad or maximize), runs as two C passes around torch's own sqrt (which is not
the correctly rounded one on every build, so it is not replaced): the same operations, rounded the
same way (torch fuses lerp's and addcmul's multiply-add; the kernel says so with fmaf and is
otherwise built without fused multiply-adds).

Whether the two agree bit for bit on this machine, this torch and this CPU is not assumed: the first
step of the process checks it on a small problem of odd sizes against torch.optim.AdamW itself,
and uses the kernel only if every bit of every parameter and state tensor agrees. Otherwise (and
for anything else: other dtypes, devices or settings) it is torch.optim.AdamW unchanged. The
optimizer's state is torch's own (`step`, `exp_avg`, `exp_avg_sq`), so either path can take over.
"""
from __future__ import annotations

import ctypes
import threading

import torch

from proxsparse_core import native

_SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* torch.optim.AdamW's single-tensor update of n float32 values with weight decay 0, in two passes
   around torch.sqrt (whose CPU implementation is not the correctly rounded sqrtf):
   moments:  m = lerp(m, g, w1)  (|w1| < 0.5: m + w1·(g − m), fused)
             v = v · beta2;  v = v + value2·g·g  (addcmul: (value2·g)·g + v, fused)
   update:   d = s / bc2s + eps  (s = torch.sqrt(v))
             p = p + (negstep·m) / d  (addcdiv) */
void adamw_moments(const float *g, float *m, float *v, int64_t n, float w1, float beta2, float value2,
                   int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        m[i] = fmaf(w1, gi - m[i], m[i]);
        v[i] = fmaf(value2 * gi, gi, v[i] * beta2);
    }
}

void adamw_update(float *p, const float *m, const float *s, int64_t n, float bc2s, float eps, float negstep,
                  int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float d = s[i] / bc2s + eps;
        p[i] = p[i] + negstep * m[i] / d;
    }
}
"""


def _setup(lib) -> None:
    lib.adamw_moments.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_float] * 3 + [ctypes.c_int]
    lib.adamw_moments.restype = None
    lib.adamw_update.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_float] * 3 + [ctypes.c_int]
    lib.adamw_update.restype = None


_LIB = native.Library("adamw", _SOURCE, _setup)
_AGREES: bool | None = None           # the kernel gave torch's bits on this machine (checked once)
_CHECK = threading.Lock()


def _plain(group: dict) -> bool:
    return (group["weight_decay"] == 0 and not group["amsgrad"] and not group["maximize"]
            and not group.get("capturable") and not group.get("differentiable") and not group.get("fused")
            and not isinstance(group["lr"], torch.Tensor)
            and all(not isinstance(b, torch.Tensor) for b in group["betas"]))


def _fits(p: torch.Tensor) -> bool:
    g = p.grad
    return (p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() and not p.is_sparse
            and (g is None or (g.dtype == torch.float32 and g.device.type == "cpu" and g.is_contiguous()
                               and not g.is_sparse)))


def _state_fits(state) -> bool:
    """No state yet, or torch's own for a float32 CPU parameter."""
    if not state:
        return True
    m, v, step = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")
    return (isinstance(m, torch.Tensor) and isinstance(v, torch.Tensor) and isinstance(step, torch.Tensor)
            and m.dtype == v.dtype == torch.float32 and m.device.type == v.device.type == "cpu"
            and m.is_contiguous() and v.is_contiguous() and step.numel() == 1)


def agrees() -> bool:
    """Whether the kernel reproduces torch.optim.AdamW exactly here (checked once per process)."""
    global _AGREES
    with _CHECK:
        if _AGREES is None:
            try:
                _AGREES = _LIB.get() is not None and _self_check()
            except Exception:  # noqa: BLE001 - e.g. torch's functional API changed: torch's own AdamW then
                _AGREES = False
    return _AGREES


def _self_check() -> bool:
    """Four steps of odd-sized parameters (every vector width's tail) at changing rates: torch's own
    update (torch.optim.adam.adam, what torch.optim.AdamW.step calls) against `_update`."""
    from torch.optim.adam import adam

    gen = torch.Generator().manual_seed(12345)
    shapes = [(3,), (37, 11), (1000, 9), (257, 64)]
    start = [torch.randn(s, generator=gen) * 0.05 for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 10.0 ** float(k - 4) for s in shapes] for k in range(4)]
    betas, eps = (0.9, 0.999), 1e-8
    theirs = [[t.clone() for t in start], [torch.zeros_like(t) for t in start], [torch.zeros_like(t) for t in start],
              [torch.tensor(0.0) for _ in start]]
    ours = [{"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
            for t in start]
    mine = [t.clone() for t in start]
    scratch = torch.empty(max(t.numel() for t in start))
    for k, step_grads in enumerate(grads):
        for i, g in enumerate(step_grads):
            lr = 1e-2 * (i + 1) * (0.5 + k)
            p, m, v, step = (x[i] for x in theirs)
            adam([p], [g], [m], [v], [], [step], amsgrad=False, has_complex=False, beta1=betas[0], beta2=betas[1],
                 lr=lr, weight_decay=0.0, eps=eps, maximize=False, foreach=False, capturable=False,
                 differentiable=False, fused=False, grad_scale=None, found_inf=None, decoupled_weight_decay=True)
            _update(mine[i], g, ours[i], betas, lr, eps, scratch)
    pairs = list(zip(theirs[0], mine)) + list(zip(theirs[1], [s["exp_avg"] for s in ours])) \
        + list(zip(theirs[2], [s["exp_avg_sq"] for s in ours])) + list(zip(theirs[3], [s["step"] for s in ours]))
    return all(a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in pairs)


def _update(p: torch.Tensor, grad: torch.Tensor, state: dict, betas, lr: float, eps: float,
            scratch: torch.Tensor) -> None:
    """One AdamW update of float32 CPU parameter `p` (weight decay 0) with torch's state dict."""
    lib = _LIB.get()
    beta1, beta2 = betas
    m, v = state["exp_avg"], state["exp_avg_sq"]
    state["step"] += 1
    step = float(state["step"])
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    threads = torch.get_num_threads()
    lib.adamw_moments(grad.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(), 1 - beta1, beta2, 1 - beta2, threads)
    root = torch.sqrt(v.view(-1), out=scratch[:p.numel()])
    lib.adamw_update(p.data_ptr(), m.data_ptr(), root.data_ptr(), p.numel(), bias_correction2 ** 0.5, eps,
                     -step_size, threads)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose update runs in C where that gives torch's exact results (module
    docstring), and is torch's own otherwise. Its `step()` is torch.optim.AdamW.step, looked up at
    every call (so whatever wraps or watches that method sees every step), which asks `_init_group`
    for each group's parameters to update: for a group the kernel takes, they are updated right
    there and torch is handed none."""

    _scratch: torch.Tensor | None = None     # sqrt(v) of one parameter at a time

    def step(self, closure=None):
        impl = torch.optim.AdamW.step
        if getattr(impl, "hooked", False):     # torch's own hook wrapper: this class has its own already
            impl = impl.__wrapped__
        return impl(self, closure)

    def _init_group(self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        if not (_LIB.get() is not None and _plain(group) and torch.is_grad_enabled() is False
                and all(_fits(p) and _state_fits(self.state.get(p)) for p in group["params"]) and agrees()):
            return super()._init_group(group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                       state_steps)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:            # as torch.optim.Adam._init_group makes it
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self._scratch is None or self._scratch.numel() < p.numel():
                self._scratch = torch.empty(p.numel(), dtype=torch.float32)
            _update(p, p.grad, state, group["betas"], group["lr"], group["eps"], self._scratch)
        return False                       # nothing left for torch's update to do
