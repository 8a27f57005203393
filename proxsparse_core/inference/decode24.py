"""2:4 products for a few tokens at a time (token-by-token generation), with a dense fallback.

Generating one token at a time multiplies every weight by 1–16 activation rows: the time is the
time to read the weights. A 2:4 weight needs half the values plus 2 bits of position per kept value,
so its product can read ≈ 1.78× fewer bytes than the dense one. cuSPARSELt (sparse24.py) does not
help there: its fixed cost per call is larger than the whole product. This module packs a 2:4 weight
once and multiplies it by a Triton kernel that reads only the packed form:

* ``values`` [out, Kp/2]: the two kept values of every group of 4 (a group with fewer than two
  non-zeros keeps zeros), in the weight's dtype (bf16/fp16); Kp is the input size rounded up to 64;
* ``meta`` [out, Kp/32] int32: per group a 4-bit code of its two positions (see ``_CODE``), eight
  groups per word, the first group in the lowest nibble.

Two kernels read this form; each program takes BN output rows and a share of the input dimension
(SPLIT shares):

* ``mma`` expands a BN × BK tile of the weight in registers and multiplies it with the activation
  tile on tensor cores (tokens padded to 16), for 1–16 tokens;
* ``fma``, for one token (what batch-1 generation multiplies), never expands the weight: each
  kept value multiplies the activation at its position, picked from the group's four by two
  selects, on the CUDA cores.

Both accumulate in float32. With SPLIT > 1 the shares write float32 partial sums and the last one
to finish (an atomic counter per row block, reset by that program) adds them in a fixed order, so
the result does not depend on timing.

`Decode24Linear` runs this kernel where it is faster than the dense product of the same layer on
this GPU — measured once per shape and token count (do_bench, caches flushed, as in generation where
the weights come from memory) — and the dense product everywhere else (more tokens than
``MAX_TOKENS``, CPU tensors, shapes where the kernel loses). `use_24_kernels(model)` switches every
2:4 prunable linear of a loaded model (an export included) to it in one call, and
`generation_speed(model)` times greedy generation dense against 2:4 (what the Compare tab can show
as tokens per second).
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MAX_TOKENS = 16          # the mma kernel pads tokens to one 16-wide tensor-core tile
FMA_MAX_TOKENS = 1       # the fma kernel serves one token (at 2 and 4 it lost to mma: bench/RESULTS.md)
K_ALIGN = 64             # packed input size is a multiple of this (zeros appended)
TOKEN_BUCKETS = (1, 2, 4, 8, 16)
DTYPES = (torch.float16, torch.bfloat16)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


# ----------------------------------------------------------------------------- packing

def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@torch.no_grad()
def pack_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [out, Kp/2], meta [out, Kp/8] uint8) of a 2:4 weight [out, in] (see the module doc).
    Raises ValueError if some group of 4 has more than two non-zeros or in % 4 != 0."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"a 2:4 weight is [out, in] with in divisible by 4, got {tuple(weight.shape)}")
    n, k = weight.shape
    kp = _round_up(k, K_ALIGN)
    w = weight.detach()
    if kp != k:
        w = F.pad(w, (0, kp - k))
    g = w.reshape(n, kp // 4, 4)
    nz = g != 0
    if bool((nz.sum(-1) > 2).any()):
        raise ValueError("the weight is not 2:4: some group of 4 has more than two non-zeros")
    # the non-zeros first, then zeros, lower positions first among equals; then p0 < p1
    key = nz.to(torch.int16) * 4 + (3 - torch.arange(4, device=w.device, dtype=torch.int16))
    pos = key.topk(2, dim=-1).indices.sort(dim=-1).values
    values = g.gather(-1, pos).reshape(n, kp // 2).contiguous()
    code = _CODE.to(w.device)[pos[..., 0] * 4 + pos[..., 1]].view(n, kp // 32, 8)
    meta = (code << (4 * torch.arange(8, device=w.device, dtype=torch.int32))).sum(-1, dtype=torch.int32)
    return values, meta.contiguous()


# Per group a 4-bit code a | b << 2. The group's four outputs are two 32-bit words of two 16-bit
# values: word A (positions 0, 1) is the kept pair V = v0 | v1 << 16 rearranged by a = 0: V,
# 1: v0 alone, 2: v0 moved up, 3: zero; word B (positions 2, 3) by b = 0: zero, 1: v1 moved down,
# 2: v1 alone, 3: V. (p0, p1) → code:
_CODE = torch.full((16,), -1, dtype=torch.int32)
for (_p0, _p1), _c in {(0, 1): 0, (0, 2): 5, (0, 3): 9, (1, 2): 6, (1, 3): 10, (2, 3): 15}.items():
    _CODE[_p0 * 4 + _p1] = _c
# the byte selectors (prmt) that build A and B from V, four 16-bit selectors per table
SEL_A = (0x44103210, 0x44441044)
SEL_B = (0x44324444, 0x32103244)


@torch.no_grad()
def unpack_24(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense weight [out, in] that (values, meta) encode (for checks)."""
    n = values.shape[0]
    code = (meta[:, :, None] >> (4 * torch.arange(8, device=meta.device, dtype=torch.int32))) & 15
    code = code.reshape(n, -1).long()
    lookup = torch.zeros(16, 2, dtype=torch.long)
    for i in range(16):
        if int(_CODE[i]) >= 0:
            lookup[int(_CODE[i])] = torch.tensor([i // 4, i % 4])
    pos = lookup.to(meta.device)[code]
    dense = torch.zeros(n, pos.shape[1], 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.reshape(n, -1, 2))
    return dense.reshape(n, -1)[:, :in_features]


# ----------------------------------------------------------------------------- the kernel

@dataclass(frozen=True)
class Config:
    bn: int = 16            # output rows per program
    bk: int = 256           # input columns per step (fma: 4 × the groups per step)
    split: int = 1          # programs sharing one row block's input dimension
    warps: int = 1
    stages: int = 3
    asm: bool = True        # mma: expand groups with prmt (PTX); False: plain Triton selects
    left: bool = False      # mma: the weight tile as the product's left operand
    kind: str = "mma"       # mma (tensor cores, ≤ 16 tokens) | fma (CUDA cores, ≤ FMA_MAX_TOKENS)

    def __str__(self):
        if self.kind == "fma":
            return f"fma·BN{self.bn}·BK{self.bk}·S{self.split}·W{self.warps}·P{self.stages}"
        return (f"BN{self.bn}·BK{self.bk}·S{self.split}·W{self.warps}·P{self.stages}" + ("" if self.asm else "·sel")
                + ("·L" if self.left else ""))

    def serves(self, tokens: int) -> bool:
        return tokens <= (FMA_MAX_TOKENS if self.kind == "fma" else MAX_TOKENS)


def candidate_configs(n: int, k: int, tokens: int = MAX_TOKENS) -> list[Config]:
    """The configurations tried per shape and token count (the first is the default without a
    measurement). One token: fma, 4–16 rows per program, 4 or 8 rows a thread, 512 columns per
    step, 1–4 shares. More: mma, 16, 32 or 64 rows per program (1, 2, 4 warps), 128 or 256 input
    columns per step, the input dimension shared by 1–8 programs (more programs, more loads in
    flight); and 32–128 rows per program with the weight as the product's left operand."""
    if tokens <= FMA_MAX_TOKENS:
        # one token: fma only (mma was no faster than dense there, fma was: bench/RESULTS.md 2a′).
        # A warp's threads span 128 groups of a row; each thread holds bn / warps rows, which share
        # every activation word it loads
        return [Config(bn=bn, bk=512, split=split, warps=warps, stages=1, kind="fma")
                for bn, warps, split in ((4, 1, 2), (4, 1, 1), (4, 1, 4), (8, 2, 1), (8, 2, 2),
                                         (8, 1, 2), (16, 4, 1), (16, 4, 2), (16, 2, 2))]
    kp = _round_up(k, K_ALIGN)
    out = []
    # (columns a step, rows per program, warps, shares, the weight as the product's left operand:
    # bench/RESULTS.md 2a⁵)
    for bk, bn, warps, splits, left in ((128, 16, 1, (1, 2, 4, 8), False), (128, 32, 2, (1, 2, 4, 8), False),
                                        (128, 64, 4, (2, 4, 8), False), (256, 32, 2, (1, 2, 4), False),
                                        (128, 32, 2, (2, 4), True), (128, 64, 4, (2, 4, 8), True),
                                        (256, 64, 4, (4,), True), (128, 128, 4, (2, 4), True),
                                        (128, 128, 8, (2, 4), True)):
        if kp % bk:
            bk = next(b for b in (256, 128, 64) if kp % b == 0)
        blocks = -(-n // bn)
        for split in splits:
            if split == 1 or (blocks * split <= 8192 and k // split >= 512):
                out.append(Config(bn=bn, bk=bk, split=split, warps=warps, left=left))
    out = list(dict.fromkeys(out))
    # the default: on long inputs the left-operand tile closest to the best on all three 7B
    # shapes (bench/RESULTS.md 2a⁵); otherwise enough programs for a large GPU without splitting short inputs
    left = [c for c in out if c.left and c.bn == 64 and c.split == 4]
    default = max(left, key=lambda c: c.bk) if left and k >= 2048 else \
        next((c for c in out if c.bn == 16 and c.split == (4 if k >= 2048 else 1)), out[0])
    return [default] + [c for c in out if c != default]


def _kernel(kind: str):
    """The Triton kernel of that kind (decode24_triton.py, imported on first use)."""
    from proxsparse_core.inference import decode24_triton
    return decode24_triton.gemv24 if kind == "fma" else decode24_triton.mm24


def _interpreted() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mm24(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, in_features: int,
         bias: torch.Tensor | None = None, config: Config | None = None,
         sem: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) for x [T, in] (T ≤ MAX_TOKENS, contiguous rows) and a packed 2:4 W.
    `sem` (int32 zeros, ≥ row blocks) is the split counter buffer; it is left zeroed."""
    t, k = x.shape
    n = values.shape[0]
    cfg = config or candidate_configs(n, k, t)[0]
    if not cfg.serves(t) or k != in_features:
        limit = FMA_MAX_TOKENS if cfg.kind == "fma" else MAX_TOKENS
        raise ValueError(f"mm24 ({cfg.kind}) takes [≤{limit}, {in_features}] inputs, got {tuple(x.shape)}")
    import triton
    if x.stride(1) != 1:
        x = x.contiguous()
    tp = 1 if cfg.kind == "fma" else MAX_TOKENS
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(n, cfg.bn)
    if cfg.split > 1:
        ws = torch.empty(cfg.split, tp, n, dtype=torch.float32, device=x.device)
        if sem is None or sem.numel() < blocks:
            sem = torch.zeros(blocks, dtype=torch.int32, device=x.device)
    else:
        ws = sem = y                          # unused
    words = values.view(torch.int32)
    args = (x, words, meta, bias if bias is not None else y, y, ws, sem, t, n, k,
            words.shape[1], meta.shape[1], x.stride(0), y.stride(0))
    ctx = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with ctx:
        if cfg.kind == "fma":
            return _fma(x, words, meta, bias, y, ws, sem, cfg, blocks)
        if (4 * words.shape[1]) % cfg.bk:
            raise ValueError(f"{cfg} does not divide the packed input size {4 * words.shape[1]}")
        _kernel("mma")[(blocks, cfg.split)](
            *args, HAS_BIAS=bias is not None, BN=cfg.bn, BK=cfg.bk, TP=MAX_TOKENS, SPLIT=cfg.split,
            ASM=cfg.asm and not _interpreted(), LEFT=cfg.left, num_warps=cfg.warps, num_stages=cfg.stages)
    return y


def _fma(x, words, meta, bias, y, ws, sem, cfg: Config, blocks: int) -> torch.Tensor:
    """Launch the fma kernel (one token): activations read as int64 words of four (one per group)."""
    k = x.shape[1]
    n, kg = words.shape
    x = x.reshape(k)                              # one row, contiguous (mm24 made it so)
    if x.data_ptr() % 8:                          # whole int64 words
        x = x.clone()
    bg = cfg.bk // 4
    even = n % cfg.bn == 0 and kg == k // 4 and kg % (bg * cfg.split) == 0
    _kernel("fma")[(blocks, cfg.split)](
        x.view(torch.int64), words, meta, bias if bias is not None else y, y, ws, sem, n, k, kg, meta.shape[1],
        HAS_BIAS=bias is not None, BN=cfg.bn, BG=bg, SPLIT=cfg.split, BF16=x.dtype == torch.bfloat16,
        EVEN=even, num_warps=cfg.warps, num_stages=cfg.stages)
    return y


# ----------------------------------------------------------------------------- choosing per shape

def bucket(tokens: int) -> int:
    """The token count a decision is measured at (the next of TOKEN_BUCKETS)."""
    return next(b for b in TOKEN_BUCKETS if b >= tokens)


@dataclass
class Choice:
    config: Config | None                    # None: the dense product
    dense_ms: float | None = None
    kernel_ms: float | None = None


_CHOICES: dict = {}      # (out, in, bucket, dtype, device, bias?) → Choice, shared by all layers


def _bench(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


@torch.no_grad()
def choose(layer: "Decode24Linear", tokens: int, margin: float = 1.2) -> Choice:
    """Kernel (its fastest configuration) or dense for this layer's shape at this token count,
    measured once on this GPU and remembered. The kernel must beat dense by `margin`: single calls
    timed with flushed caches flatter the kernel against the back-to-back calls of a real decoding
    step (a CUDA graph of a whole model), see bench/RESULTS.md, so a small lead is not trusted."""
    b = bucket(tokens)
    key = layer._key(tokens)
    if key in _CHOICES:
        return _CHOICES[key]
    x = torch.randn(b, layer.in_features, device=layer.values.device, dtype=layer.values.dtype)
    dense_ms = _bench(lambda: F.linear(x, layer.weight, layer.bias))
    best, best_ms = None, float("inf")
    for cfg in candidate_configs(layer.out_features, layer.in_features, b):
        try:
            ms = _bench(lambda: layer.kernel(x, cfg))
        except Exception:                    # a configuration this GPU cannot run: skip it
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    choice = Choice(best if best is not None and best_ms * margin < dense_ms else None, dense_ms,
                    best_ms if best is not None else None)
    _CHOICES[key] = choice
    return choice


# ----------------------------------------------------------------------------- the module

class Decode24Linear(torch.nn.Module):
    """y = x·Wᵀ + b for a 2:4 weight W: the packed 2:4 kernel for ≤ MAX_TOKENS rows where it was
    measured faster, the dense product otherwise (the dense weight is kept for that)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, measure: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight                 # the layer's own dense (2:4) weight, not copied
        self.bias = bias
        values, meta = pack_24(weight)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("meta", meta, persistent=False)
        self.register_buffer("sem", torch.zeros(-(-self.out_features // 4), dtype=torch.int32,
                                                device=weight.device), persistent=False)
        self.measure = measure

    def kernel(self, x2: torch.Tensor, config: Config | None = None) -> torch.Tensor:
        return mm24(x2, self.values, self.meta, self.in_features, self.bias, config, self.sem)

    def _key(self, tokens: int) -> tuple:
        return (self.out_features, self.in_features, bucket(tokens), self.values.dtype, self.values.device,
                self.bias is not None)

    def chosen(self, tokens: int) -> Config | None:
        """The configuration already chosen for this many rows (None: dense, or not measured yet)."""
        choice = _CHOICES.get(self._key(tokens))
        return choice.config if choice is not None else None

    def path(self, tokens: int) -> Config | None:
        """The kernel configuration for this many rows, or None for the dense product."""
        if tokens > MAX_TOKENS or tokens == 0 or not self.values.is_cuda or not triton_available():
            return None
        key = self._key(tokens)
        if key in _CHOICES:
            return _CHOICES[key].config
        if not self.measure or torch.cuda.is_current_stream_capturing():
            return None                      # unmeasured: dense (no timing inside a CUDA graph)
        return choose(self, tokens).config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        cfg = self.path(x2.shape[0])
        if cfg is None:
            return F.linear(x, self.weight, self.bias)
        return self.kernel(x2, cfg).view(*x.shape[:-1], self.out_features)


def convertible(weight: torch.Tensor) -> bool:
    """A weight the kernel takes: CUDA, fp16/bf16, 2-D, input divisible by 4, 2:4."""
    if not (weight.is_cuda and weight.dtype in DTYPES and weight.dim() == 2 and weight.shape[1] % 4 == 0):
        return False
    return not bool(((weight.detach().reshape(-1, 4) != 0).sum(1) > 2).any())


@torch.no_grad()
def use_24_kernels(model, prunable=None, measure: bool = True,
                   accept=convertible) -> tuple[list[str], list[str]]:
    """From now on, run every 2:4 prunable linear of `model` through `Decode24Linear` (fast
    generation; prompts longer than MAX_TOKENS, and shapes where the kernel is slower, stay on the
    dense product). `prunable` defaults to `find_prunable(model)`. Returns (converted, skipped).
    The weights are not modified; `restore_dense(model)` undoes it."""
    if prunable is None:
        from proxsparse_core.sparsity.prunable import find_prunable
        prunable = find_prunable(model)
    done, skipped = [], []
    for name in prunable.names:
        lin = prunable.modules[name]
        if getattr(lin, "_decode24", None) is not None or not accept(lin.weight):
            (done if getattr(lin, "_decode24", None) is not None else skipped).append(name)
            continue
        mod = Decode24Linear(lin.weight, lin.bias, measure=measure)
        lin.__dict__["_decode24"] = mod       # not a submodule: state dicts stay as they were
        lin.forward = mod.forward
        done.append(name)
    return done, skipped


def measure(model, tokens: int = 1, progress=None) -> int:
    """Choose now, kernel or dense, for every layer shape of `model`'s converted 2:4 linears that has
    no choice yet at `tokens` rows (`choose`: each configuration compiled and timed against dense,
    seconds per shape on first use), calling `progress(done, total)` after each shape. A generation
    that follows never stops between two tokens to measure. Returns how many shapes were measured."""
    todo: dict = {}
    for m in model.modules():
        layer = m.__dict__.get("_decode24")
        if layer is not None and layer.measure and layer._key(tokens) not in _CHOICES:
            todo.setdefault(layer._key(tokens), layer)
    for i, layer in enumerate(todo.values()):
        choose(layer, tokens)
        if progress is not None:
            progress(i + 1, len(todo))
    return len(todo)


@contextlib.contextmanager
def fast_generation(model, prunable=None, progress=None):
    """`with fast_generation(model) as fast:` the model's 2:4 linears run through the 2:4 kernels
    inside (use_24_kernels), their own forward again after (restore_dense), however the block ends.
    The one-token choices are measured on entering (`measure`, `progress(done, total)` per layer
    shape; `fast.measured` shapes), so that a generation's tokens/s never counts them.
    `fast.converted` / `fast.skipped` name the layers; `fast.kernel_layers` is, once the block has
    ended, how many converted layers ran one-token products on the kernel (the others were measured
    slower there and stayed dense). Nothing is converted off CUDA or without Triton."""
    fast = FastGeneration(triton=triton_available())
    if fast.triton:
        fast.converted, fast.skipped = use_24_kernels(model, prunable)
    try:
        if fast.converted:
            fast.measured = measure(model, 1, progress)
        yield fast
    finally:
        layers = [m.__dict__["_decode24"] for m in model.modules() if "_decode24" in m.__dict__]
        fast.kernel_layers = sum(1 for layer in layers if layer.chosen(1) is not None)
        restore_dense(model)


@dataclass
class FastGeneration:
    """What one fast_generation block did: whether Triton was there, the layers converted and skipped,
    the layer shapes it measured first, and (once it ended) how many converted layers ran one-token
    products on the kernel."""
    triton: bool = False
    converted: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    kernel_layers: int = 0
    measured: int = 0            # layer shapes measured on entering (first use of a shape on this GPU)


def load_for_generation(folder: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                        trust_remote_code: bool = False):
    """One call: an exported 2:4 model (any folder `from_pretrained` reads) and its tokenizer, on
    `device` in `dtype`, its 2:4 linears switched to the 2:4 kernels (use_24_kernels: the one-token
    kernel where it was measured faster, dense elsewhere). Returns (model, tokenizer, converted
    layer names). On a CPU, or without Triton, the model runs dense and none are converted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from proxsparse_core.sparsity.prunable import linearise_conv1d
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    linearise_conv1d(model)                  # GPT-2's Conv1D layers, as the studio pruned them
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    done = use_24_kernels(model)[0] if triton_available() else []
    return model, tokenizer, done


def restore_dense(model) -> int:
    """Undo use_24_kernels: every converted linear runs its own forward again. Returns how many."""
    n = 0
    for m in model.modules():
        if m.__dict__.pop("_decode24", None) is not None:
            m.__dict__.pop("forward", None)
            n += 1
    return n


# ----------------------------------------------------------------------------- generation speed

@dataclass
class GenerationSpeed:
    dense_ms: float                          # per generated token, dense model
    sparse_ms: float                         # per generated token, after use_24_kernels
    tokens: int                              # tokens timed per side
    shared: int                              # greedy tokens equal to dense's before the first difference
    converted: int
    skipped: int

    @property
    def speedup(self) -> float:
        """Tokens per second, 2:4 over dense."""
        return self.dense_ms / self.sparse_ms


@torch.no_grad()
def _greedy_ms(model, ids: torch.Tensor, new: int, warmup: int = 2) -> tuple[float, list[int]]:
    """ms per token of greedy decoding with the model's own forward and KV cache, token by token
    (as generate() runs it), after `warmup` tokens; and the tokens."""
    from transformers import DynamicCache
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    toks, t0 = [], None
    import time
    for j in range(new + warmup):
        if j == warmup:
            sync()
            t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        toks.append(int(tok))
    sync()
    return 1e3 * (time.perf_counter() - t0) / max(new, 1), toks[warmup:]


@torch.no_grad()
def generation_speed(model, prunable=None, ids: torch.Tensor | None = None, new_tokens: int = 32,
                     measure: bool = True, accept=convertible) -> GenerationSpeed:
    """Greedy generation (batch 1) of `model` dense, then with use_24_kernels, timed the same way
    (eager, the model's own cache): ms per token each, and how long the two agree. The model is
    restored afterwards. `ids` [1, T] is the prompt (default: 16 random tokens)."""
    if ids is None:
        vocab = model.get_input_embeddings().num_embeddings
        dev = model.get_input_embeddings().weight.device
        ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(dev)
    dense_ms, dense = _greedy_ms(model, ids, new_tokens)
    done, skipped = use_24_kernels(model, prunable, measure=measure, accept=accept)
    try:
        sparse_ms, sparse = _greedy_ms(model, ids, new_tokens)
    finally:
        restore_dense(model)
    shared = next((i for i, (a, b) in enumerate(zip(dense, sparse)) if a != b), min(len(dense), len(sparse)))
    return GenerationSpeed(dense_ms, sparse_ms, new_tokens, shared, len(done), len(skipped))
