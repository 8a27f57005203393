"""2:4 inference on sparse tensor cores: run a pruned model's linears on them and measure the gain.

A 2:4 mask only pays off at inference when the matrix products run on sparse tensor cores
(NVIDIA, compute capability ≥ 8.0, fp16/bf16). On Hopper (H100/H200) only cuSPARSELt reaches them;
torch's CUTLASS backend raises "Supported only on GPUs with compute capability 8.x" (measured).

Why not simply `torch.sparse.to_sparse_semi_structured` (measured on an H200, torch 2.11): its
tensor subclass sends every F.linear through Python dispatch and a custom op, and cuSPARSELt then
builds a plan per call: about 0.5–1 ms of host work per product even at 256 tokens. Timed back to
back the way a model calls it, a 16 K-token product was 0.8× dense and an 8-layer 7B-shaped
prefill 0.09–0.28× (2:4 up to 10× slower), although the kernels themselves are 1.3–1.4× faster
(triton.testing.do_bench). So this module

* calls the cuSPARSELt op directly (`SparseLinear24`): the weight is compressed once; each call
  views the [..., in] input as [tokens, in] rows, hands it over transposed (a view, no copy) and
  has the result written transposed, i.e. straight into [tokens, out]; the algorithm is picked once
  per (shape, token count) by cuSPARSELt's own search;
* times whole prefills with CUDA graphs (dense and 2:4 alike), which removes what host work is
  left (launches, cuSPARSELt plans), and also eagerly, so both are reported.

The weights are never modified: `sparse_linears(prunable)` runs the prunable linears through
`SparseLinear24` inside a `with` block (the layers' own forward is restored on exit), so a
workspace's model stays dense and usable. Without `torch._cslt_*` ops (older PyTorch) it falls
back to semi-structured tensors and says so (`backend()`).
"""
from __future__ import annotations

import contextlib
import inspect
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = (torch.float16, torch.bfloat16)
MIN_ROWS = MIN_COLS = 16     # cuSPARSELt's shape granularity for fp16/bf16 weights
TOKEN_MULTIPLE = 8           # ... and for the dense operand's token dimension (padded up to it)


# ----------------------------------------------------------------------------- capability

def direct_available() -> bool:
    """This PyTorch exposes the cuSPARSELt ops that SparseLinear24 calls."""
    return hasattr(torch, "_cslt_compress") and hasattr(torch, "_cslt_sparse_mm")


def backend() -> str:
    if direct_available():
        return "cuSPARSELt, called directly"
    return ("torch.sparse semi-structured tensors (this PyTorch has no torch._cslt_sparse_mm; each "
            "call pays ~0.5–1 ms of dispatch, so short prompts are much slower)")


def status() -> tuple[bool, str]:
    """Can this machine run 2:4 sparse matrix products? (ok, reason)."""
    if not torch.cuda.is_available():
        return False, "2:4 sparse inference needs a CUDA GPU (compute capability 8.0 or newer); none here"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"this GPU has compute capability {major}.{minor}; sparse tensor cores need 8.0 or newer"
    if major >= 9 and not torch.backends.cusparselt.is_available():
        return False, "this PyTorch build has no cuSPARSELt, which Hopper and newer GPUs need for 2:4 products"
    return True, f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"


def convertible(weight: torch.Tensor) -> bool:
    out_f, in_f = weight.shape
    return (weight.is_cuda and weight.dtype in DTYPES and out_f % MIN_ROWS == 0 and in_f % MIN_COLS == 0)


def is_24(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 along the input dimension."""
    return not bool(((weight.detach().reshape(-1, 4) != 0).sum(1) > 2).any())


# ----------------------------------------------------------------------------- the sparse linear

class SparseLinear24(torch.nn.Module):
    """y = x·Wᵀ + b with a 2:4 weight W on sparse tensor cores (cuSPARSELt, called directly)."""

    _algs: dict = {}     # (out, in, tokens, dtype, bias?, device) → algorithm id, shared by all layers

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, search: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", torch._cslt_compress(weight.detach().contiguous()), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        self.search = search

    def _alg(self, xt: torch.Tensor) -> int:
        key = (self.out_features, self.in_features, xt.shape[1], xt.dtype, self.bias is not None, xt.device)
        alg = self._algs.get(key)
        if alg is not None:
            return alg
        if not self.search or (xt.is_cuda and torch.cuda.is_current_stream_capturing()):
            return 0                        # no search inside a CUDA graph: it synchronises
        alg = 0
        if hasattr(torch, "_cslt_sparse_mm_search"):
            try:
                found = int(torch._cslt_sparse_mm_search(self.packed, xt, bias=self.bias, transpose_result=True))
                if found != 0 and self._faster(found, 0, xt):
                    alg = found
            except RuntimeError:            # a search or an id the plain call rejects: the default
                alg = 0
        self._algs[key] = alg
        return alg

    def _faster(self, a: int, b: int, xt: torch.Tensor, reps: int = 5) -> bool:
        """Is algorithm a faster than b on this input? (The search also tunes split-k, which
        the plain call does not take, so its pick is checked against the default.)"""
        def run(alg):
            return torch._cslt_sparse_mm(self.packed, xt, bias=self.bias, transpose_result=True, alg_id=alg)
        if not xt.is_cuda:
            run(a)
            return True
        times = {}
        for alg in (a, b, a, b):
            run(alg)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                run(alg)
            end.record()
            end.synchronize()
            times[alg] = min(times.get(alg, float("inf")), start.elapsed_time(end))
        return times[a] < times[b]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        n = x2.shape[0]
        if n % TOKEN_MULTIPLE:
            x2 = F.pad(x2, (0, 0, 0, -n % TOKEN_MULTIPLE))
        x2 = x2.contiguous()                # a no-op for the activations of a model
        xt = x2.t()                         # [in, tokens]: W·xᵀ, written transposed = x·Wᵀ
        y = torch._cslt_sparse_mm(self.packed, xt, bias=self.bias, transpose_result=True,
                                  alg_id=self._alg(xt))
        return y[:n].view(*lead, self.out_features)


class _SemiStructuredLinear(torch.nn.Module):
    """The same product through torch.sparse.to_sparse_semi_structured (the slow dispatch)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured
        self.weight = torch.nn.Parameter(to_sparse_semi_structured(weight.detach().contiguous()),
                                         requires_grad=False)
        self.bias = bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def sparse_module(weight: torch.Tensor, bias: torch.Tensor | None = None, path: str = "direct"):
    """A module computing x·Wᵀ + b on sparse tensor cores: 'direct' (SparseLinear24, when this
    PyTorch has the ops) or 'semi' (torch.sparse semi-structured tensors)."""
    if path == "direct" and direct_available():
        return SparseLinear24(weight, bias)
    return _SemiStructuredLinear(weight, bias)


def _patch(prunable, path: str = "direct"):
    """Route each eligible prunable linear's forward through a sparse module (its weight untouched).
    Returns (converted names, skipped names, what to restore)."""
    done, skipped, saved = [], [], []
    for name in prunable.names:
        lin = prunable.modules[name]
        if not (convertible(lin.weight) and is_24(lin.weight)):
            skipped.append(name)
            continue
        sparse = sparse_module(lin.weight, lin.bias, path)
        saved.append((lin, lin.__dict__.get("forward")))
        lin.forward = sparse.forward        # a bound method: an instance attribute, not a submodule
        done.append(name)
    return done, skipped, saved


def _unpatch(saved):
    for lin, forward in reversed(saved):
        if forward is None:
            lin.__dict__.pop("forward", None)
        else:
            lin.forward = forward


@contextlib.contextmanager
def sparse_linears(prunable, path: str = "direct"):
    """Inside the block, every prunable linear whose weight is 2:4 (fp16/bf16, on a CUDA GPU,
    dimensions divisible by 16) runs on sparse tensor cores; the others stay dense. Yields
    (converted names, skipped names). The weights are not modified; the layers are restored on
    exit, even after an error."""
    with torch.no_grad():
        done, skipped, saved = _patch(prunable, path)
    try:
        yield done, skipped
    finally:
        _unpatch(saved)


@torch.no_grad()
def sparsify_(prunable) -> tuple[list[str], list[str]]:
    """Run each prunable linear with a 2:4 weight on sparse tensor cores from now on (inference
    only; the dense weight stays in place). Returns (converted names, skipped names)."""
    done, skipped, _ = _patch(prunable)
    return done, skipped


@torch.no_grad()
def relative_error(weight: torch.Tensor, x: torch.Tensor) -> float:
    """‖sparse(x) − dense(x)‖ / ‖dense(x)‖ for a 2:4 weight and inputs x [tokens, in]."""
    dense = F.linear(x, weight).float()
    sparse = sparse_module(weight)(x).float()
    return float((sparse - dense).norm() / dense.norm().clamp_min(1e-30))


def random_24_weight(out_f: int, in_f: int, dtype=torch.bfloat16, device="cuda", seed: int = 0) -> torch.Tensor:
    """A random weight with exactly 2 of every 4 kept (top-2 |w|), for timing and checks."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out_f, in_f, device=device, dtype=torch.float32, generator=g) * 0.02
    groups = w.view(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).view(out_f, in_f).to(dtype)


def top2_weights(originals: dict) -> dict:
    """2:4 weights by magnitude (the two largest |w| of every group of 4), for models without a
    learned mask yet."""
    out = {}
    for name, w in originals.items():
        groups = w.reshape(-1, 4)
        keep = groups.abs().float().topk(2, dim=1).indices
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=w.device).scatter_(1, keep, True)
        out[name] = (groups * mask).view(w.shape)
    return out


# ----------------------------------------------------------------------------- timing
# Every comparison times dense and 2:4 with the same function, warm, median of repetitions.

def median_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median of single calls between two CUDA events (host time before the launch included)."""
    return loop_ms(fn, calls=1, reps=reps, warmup=warmup)


def loop_ms(fn, calls: int = 10, reps: int = 10, warmup: int = 3) -> float:
    """Per call: median over reps of `calls` back-to-back calls between two events. The host
    queues calls while the GPU works (as inside a model), so its per-call cost shows only where
    it exceeds the GPU time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def capture(fn, warmup: int = 2):
    """A CUDA graph of fn() (after warm-up on a side stream, as capture requires). Returns
    (graph, output of the captured call)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_ms(fn, calls: int = 10, reps: int = 10) -> float | None:
    """Per call: `calls` calls captured in one CUDA graph, replays timed (GPU time only: no host
    work between kernels). None where the calls cannot be captured."""
    try:
        graph, _ = capture(lambda: [fn() for _ in range(calls)])
    except RuntimeError:
        _free()
        return None
    ms = median_ms(graph.replay, reps, warmup=1) / calls
    del graph, _
    _free()
    return ms


def bench_ms(fn) -> float | None:
    """triton.testing.do_bench (flushes L2 between calls; median), for reference; None without Triton."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return float(do_bench(fn, return_mode="median"))


# ----------------------------------------------------------------------------- one product

@dataclass
class Timing:
    out_f: int
    in_f: int
    tokens: int
    dense_ms: float                          # loop_ms of F.linear with the dense 2:4 weight
    sparse_ms: float                         # loop_ms of the direct path (SparseLinear24)
    rel_error: float                         # ‖2:4 − dense‖ / ‖dense‖ (both bf16)
    old_ms: float | None = None              # loop_ms of to_sparse_semi_structured
    dense_graph_ms: float | None = None
    sparse_graph_ms: float | None = None
    dense_bench_ms: float | None = None
    sparse_bench_ms: float | None = None
    dense_error_fp32: float | None = None    # ‖dense − fp32‖ / ‖fp32‖: the bf16 noise floor
    sparse_error_fp32: float | None = None

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm().clamp_min(1e-30))


@torch.no_grad()
def time_linear(out_f: int, in_f: int, tokens: int, dtype=torch.bfloat16, reps: int = 10,
                old: bool = False, graphs: bool = False, do_bench: bool = False, device="cuda") -> Timing:
    """Dense vs 2:4 time of one product y = x·Wᵀ, x [tokens, in_f] (a prefill matmul), each timed
    the same way (loop_ms; optionally also CUDA graphs, do_bench, and the old semi-structured path)."""
    w = random_24_weight(out_f, in_f, dtype, device)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    new = sparse_module(w)
    dense_fn, sparse_fn = (lambda: F.linear(x, w)), (lambda: new(x))
    dense, sparse = dense_fn(), sparse_fn()
    t = Timing(out_f, in_f, tokens, loop_ms(dense_fn, reps=reps), loop_ms(sparse_fn, reps=reps),
               _err(sparse, dense.float()))
    ref = x.float() @ w.float().t()
    t.dense_error_fp32, t.sparse_error_fp32 = _err(dense, ref), _err(sparse, ref)
    del dense, sparse, ref
    if old:
        semi = _SemiStructuredLinear(w)
        t.old_ms = loop_ms(lambda: semi(x), reps=reps)
    if graphs:
        t.dense_graph_ms, t.sparse_graph_ms = graph_ms(dense_fn, reps=reps), graph_ms(sparse_fn, reps=reps)
    if do_bench:
        t.dense_bench_ms, t.sparse_bench_ms = bench_ms(dense_fn), bench_ms(sparse_fn)
    return t


def layer_shapes(prunable) -> list[tuple[int, int]]:
    """The distinct (out, in) shapes of a model's prunable linears, largest first."""
    shapes = {tuple(prunable.modules[n].weight.shape) for n in prunable.names}
    return sorted(shapes, key=lambda s: -s[0] * s[1])


def speedup_report(prunable=None, shapes=None, token_counts=(256, 2048, 8192, 16384),
                   dtype=torch.bfloat16, reps: int = 10) -> tuple[list[Timing], str]:
    """Dense vs 2:4 products on this GPU for a model's layer shapes (or given shapes) at several
    token counts per product. Returns the timings and a plain-language summary."""
    ok, why = status()
    if not ok:
        return [], why + ". The learned mask is still valid; the speed-up needs such a GPU."
    if shapes is None:
        shapes = [s for s in layer_shapes(prunable) if s[0] % MIN_ROWS == 0 and s[1] % MIN_COLS == 0]
    rows = [time_linear(o, i, t, dtype, reps) for (o, i) in shapes for t in token_counts]
    lines = [f"2:4 sparse vs dense matrix products on {why} ({backend()}):"]
    for t in token_counts:
        sel = [r for r in rows if r.tokens == t]
        dense, sparse = sum(r.dense_ms for r in sel), sum(r.sparse_ms for r in sel)
        lines.append(f"  {t:>6} tokens per product: dense {dense:.3f} ms, 2:4 {sparse:.3f} ms "
                     f"→ {dense / sparse:.2f}× ({'faster' if dense > sparse else 'SLOWER'})")
    return rows, "\n".join(lines)


# ----------------------------------------------------------------------------- whole prefill

@dataclass
class PrefillRow:
    tokens: int
    dense_ms: float | None = None            # the headline: each side's faster of eager and CUDA graph
    sparse_ms: float | None = None
    timing: str = ""                         # which timing each side's headline is
    agreement: float | None = None           # share of positions whose next token = dense's
    dense_eager_ms: float | None = None
    sparse_eager_ms: float | None = None
    dense_graph_ms: float | None = None
    sparse_graph_ms: float | None = None
    logits_rel_error: float | None = None    # last 64 positions, when asked for
    note: str = ""

    @property
    def speedup(self) -> float | None:
        return self.dense_ms / self.sparse_ms if self.dense_ms and self.sparse_ms else None


def _forward_kwargs(model) -> dict:
    """Prefill as generation runs it: no cache object, logits of the last position only."""
    kw = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1
    return kw


@torch.no_grad()
def next_tokens(model, ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """argmax next token at every position of ids [1, T]. Where the model allows it, the final
    hidden states go through the output head in float32, chunk by chunk: no [T, vocab] logits at
    once, and no near-ties decided by rounding the logits to bf16 (3 significant digits)."""
    decoder = getattr(model, "get_decoder", lambda: None)()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is not None and isinstance(head, torch.nn.Linear):
        try:
            h = decoder(input_ids=ids, use_cache=False).last_hidden_state
        except (TypeError, AttributeError):
            h = None
        if h is not None and h.shape[-1] == head.in_features:
            w = head.weight.float()
            b = None if head.bias is None else head.bias.float()
            return torch.cat([F.linear(part.float(), w, b).argmax(-1) for part in h.split(chunk, dim=1)], dim=1)
    return model(input_ids=ids, use_cache=False).logits.float().argmax(-1)


def _free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _measure(model, ids, reps: int, graphs: bool, logits: bool) -> dict:
    """Eager and (if it captures) CUDA-graph time of one prefill, its next tokens and last logits."""
    kw = _forward_kwargs(model)
    fwd = lambda: model(input_ids=ids, **kw)   # noqa: E731
    res = {"eager": median_ms(fwd, reps), "graph": None, "graph_error": ""}
    if graphs:
        graph = None
        try:
            graph, _ = capture(fwd)
            res["graph"] = median_ms(graph.replay, reps, warmup=1)
        except RuntimeError as exc:          # not capturable (or out of memory while capturing)
            res["graph_error"] = str(exc).splitlines()[0][:160]
        finally:
            del graph
            _free()
    res["next"] = next_tokens(model, ids)
    if logits:
        last = {**kw, "logits_to_keep": 64} if "logits_to_keep" in kw else {"use_cache": False}
        res["logits"] = model(input_ids=ids, **last).logits[0, -64:].float()
    return res


@torch.no_grad()
def prefill_speedup(model, prunable, token_counts, prompts: dict | None = None, reps: int = 5,
                    graphs: bool = True, logits: bool = False, path: str = "direct", seed: int = 0,
                    progress=None) -> tuple[list[PrefillRow], list[str], list[str]]:
    """Dense vs 2:4 prefill of `model` (batch 1) at each token count: its prunable linears must
    already hold 2:4 weights (the caller swaps them in and restores them). Random token ids unless
    `prompts` gives ids [1, T] for a count. Returns (rows, converted names, skipped names).

    Both sides are timed the same way: eager (median of single forwards) and, where both capture,
    as CUDA graphs, which are the headline (`timing`). Agreement: share of positions whose argmax
    next token equals the dense model's."""
    report = progress or (lambda msg: None)
    eligible = [n for n in prunable.names if convertible(prunable.modules[n].weight)
                and is_24(prunable.modules[n].weight)]
    if not eligible:
        return [], [], list(prunable.names)
    vocab = model.get_input_embeddings().num_embeddings
    device = model.get_input_embeddings().weight.device
    g = torch.Generator().manual_seed(seed)
    counts = sorted(set(int(t) for t in token_counts))
    rows = {t: PrefillRow(t) for t in counts}
    ids = {t: (prompts or {}).get(t) for t in counts}
    ids = {t: (v if v is not None else torch.randint(0, vocab, (1, t), generator=g)).to(device)
           for t, v in ids.items()}
    was_training = model.training
    model.eval()
    dense = {}
    try:
        for t in counts:
            report(f"dense prefill, {t} tokens")
            try:
                dense[t] = _measure(model, ids[t], reps, graphs, logits)
            except torch.cuda.OutOfMemoryError:
                rows[t].note = "not enough GPU memory at this length"
                _free()
        with sparse_linears(prunable, path) as (done, skipped):
            for t in counts:
                if t not in dense or not done:
                    continue
                report(f"2:4 prefill, {t} tokens")
                try:
                    sparse = _measure(model, ids[t], reps, graphs, logits)
                except torch.cuda.OutOfMemoryError:
                    rows[t].note = "not enough GPU memory at this length (2:4)"
                    _free()
                    continue
                _fill(rows[t], dense[t], sparse)
                del sparse
            _free()
    finally:
        model.train(was_training)
    return [rows[t] for t in counts], done, skipped


def _fill(row: PrefillRow, d: dict, s: dict):
    row.dense_eager_ms, row.sparse_eager_ms = d["eager"], s["eager"]
    row.dense_graph_ms, row.sparse_graph_ms = d["graph"], s["graph"]
    # Headline: each side at its fastest of the two timings. On the H200 a captured dense prefill
    # was slower than the eager one at 8-16 K tokens (234.9 vs 145.9 ms at 16 K), while the 2:4
    # side gains most from the graph at short lengths (its per-call host cost): taking one timing
    # for both would flatter one side.
    def best(m):
        return min((m[k], k) for k in ("eager", "graph") if m[k] is not None)
    (row.dense_ms, dk), (row.sparse_ms, sk) = best(d), best(s)
    names = {"eager": "eager", "graph": "CUDA graph"}
    row.timing = names[dk] if dk == sk else f"dense {names[dk]}, 2:4 {names[sk]}"
    why = d["graph_error"] or s["graph_error"]
    if why:
        row.note = f"no CUDA graph ({'dense' if d['graph_error'] else '2:4'}): {why}"
    row.agreement = float((d["next"] == s["next"]).float().mean())
    if "logits" in d:
        row.logits_rel_error = float((s["logits"] - d["logits"]).norm() / d["logits"].norm().clamp_min(1e-30))


def lengths_to_measure(prompt_tokens: int, max_positions: int | None,
                       synthetic=(2048, 8192, 16384)) -> list[int]:
    """The prompt's length (if any) and the long synthetic lengths the model can take."""
    cap = max_positions or max(synthetic)
    counts = {t for t in synthetic if t <= cap}
    if prompt_tokens > 0:
        counts.add(min(prompt_tokens, cap))
    return sorted(counts)


def describe(rows: list[PrefillRow], converted: list[str], skipped: list[str], prunable=None,
             device: str = "") -> str:
    """The measurement in plain words, ending with where 2:4 is slower."""
    measured = [r for r in rows if r.speedup is not None]
    if not converted:
        return ("No prunable layer could run on sparse tensor cores: they need 2:4 weights in "
                "float16/bfloat16 on the GPU with both dimensions divisible by 16 "
                f"({len(skipped)} layers skipped). Load the model in bfloat16 to measure.")
    head = (f"Prefill (batch 1) of this model, dense vs 2:4, on {device or 'this GPU'}: "
            f"{len(converted)} linear layers on sparse tensor cores via {backend()}"
            + (f", {len(skipped)} kept dense" if skipped else "") + ".")
    lines = [head]
    for r in rows:
        if r.speedup is None:
            lines.append(f"  {r.tokens:>6} tokens: not measured ({r.note or 'no result'})")
            continue
        lines.append(f"  {r.tokens:>6} tokens: dense {r.dense_ms:8.2f} ms, 2:4 {r.sparse_ms:8.2f} ms → "
                     f"{r.speedup:.2f}× ({'faster' if r.speedup > 1 else 'SLOWER'}; {r.timing}); "
                     f"next token as dense at {100 * r.agreement:.1f}% of positions")
    if not measured:
        return "\n".join(lines)
    slower = [r.tokens for r in measured if r.speedup < 1]
    faster = [r.tokens for r in measured if r.speedup >= 1]
    shapes = layer_shapes(prunable) if prunable is not None else []
    big = f" (its largest layer is {shapes[0][0]}×{shapes[0][1]})" if shapes else ""
    if not faster:
        verdict = (f"2:4 is SLOWER than dense at every length measured here{big}: sparse tensor "
                   f"cores pay off on large matrices (roughly 4096 wide and up) and long prompts.")
    elif not slower:
        verdict = (f"2:4 is faster at every length measured here ({min(faster)} tokens and up), "
                   f"up to {max(r.speedup for r in measured):.2f}×.")
    else:
        verdict = (f"2:4 is SLOWER at {', '.join(str(t) for t in slower)} tokens and faster at "
                   f"{', '.join(str(t) for t in faster)} tokens.")
    lines.append(verdict + " Token-by-token generation after the prompt multiplies one token at a "
                 "time, where 2:4 does not help (not measured here).")
    return "\n".join(lines)
