"""The run configuration shared by the CLI, the app and the recipe file, and the presets.

One flat dataclass: every field is a CLI flag (``--lambda1``), a widget in the app, and a key
in ``recipe.json``, so a recipe reproduces a run exactly.
"""
from __future__ import annotations

import math
import re
import shlex
from dataclasses import asdict, dataclass, field, fields

import torch

from proxsparse_core.errors import SettingError, UserError
from proxsparse_core.results import LEARNED

BUNDLED = "bundled:smollm2-135m"     # the offline model that ships with the studio (models/loading.py)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")


def check_device(device) -> str:
    """auto, cpu, mps, cuda or cuda:N; anything else is refused before a model is touched."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N (N = GPU number) or mps")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

_ITEM = re.compile(r"^\s*(cpu|\d+)\s*=\s*(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB)\s*$", re.IGNORECASE)


def parse_max_memory(spec: str) -> dict | None:
    """'0=70GiB, 1=70GiB, cpu=200GiB' → {0: '70GiB', 1: '70GiB', 'cpu': '200GiB'} (None if empty)."""
    if not spec or not spec.strip():
        return None
    out = {}
    for item in spec.split(","):
        m = _ITEM.match(item)
        if not m:
            raise UserError(f"max_memory item {item.strip()!r} is not DEVICE=SIZE, e.g. 0=70GiB or cpu=200GiB")
        dev, size, unit = m.groups()
        out["cpu" if dev.lower() == "cpu" else int(dev)] = f"{size}{unit}"
    return out


MAX_TEXT = 1000     # characters in any text setting (a model id or path, a data file, a field name)


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    # model
    model: str = _f(BUNDLED, "bundled:smollm2-135m, a Hugging Face id, or a local folder")
    device: str = _f("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    dtype: str = _f("auto", "auto (bf16 on GPUs that support it, else fp32), float32, bfloat16, float16")
    trust_remote_code: bool = _f(False, "run a model's own Python code (only for authors you trust; "
                                            "only whoever starts the app or CLI can allow it)")
    device_map: str = _f("", "'auto' spreads a model too large for one GPU over all GPUs, then the CPU (accelerate)")
    max_memory: str = _f("", "with device_map auto: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB "
                             "(a small GPU share forces a split)")
    # data
    data: str = _f("builtin", "builtin (Python's documentation), mix (half of it, half text the model writes "
                              "itself), generated, a .txt/.jsonl file, or hf:NAME[:CONFIG[:SPLIT[:FIELD]]]")
    data_field: str = _f("text", "the text field of a .jsonl file or HF dataset")
    samples: int = _f(64, "calibration samples (each one context long)", lo=1, hi=1_000_000)
    ctx: int = _f(128, "context length of a calibration sample, in tokens", lo=8, hi=1_048_576)
    eval_ctx: int = _f(256, "context length of a held-out perplexity window", lo=8, hi=1_048_576)
    eval_windows: int = _f(40, "held-out windows for perplexity (0 = all)", lo=0, hi=1_000_000)
    # method
    lambda1: float = _f(2.0, "2:4 regulariser strength λ1 (used as is, NOT multiplied by the learning rate)", lo=0,
                        hi=1e4)
    lambda2: float = _f(0.0, "frozen-weight regulariser strength λ2 (0 = off)", lo=0, hi=1e4)
    eps: float = _f(0.5, "ε in the λ2 term W·(W−W0)/(|W0|+ε)", lo=0, hi=1e3, lo_open=True)
    loss: str = _f("lm", "what the learning minimises: lm (next-token loss on the calibration text, published) or "
                         "distill (KL divergence to the dense model's own next-token distribution: masks that "
                         "hold up on text unlike the calibration text)", choices=("lm", "distill"))
    lr: float = _f(1e-4, "AdamW learning rate (its peak, reached after the linear warm-up)", lo=0, hi=1.0, lo_open=True)
    steps: int = _f(30, "optimizer steps (each followed by the prox)", lo=1, hi=100_000)
    batch: int = _f(1, "calibration samples per step", lo=1, hi=4096)
    lambda_scale: str = _f("none", "none (published: one λ1 and lr for every layer) or layer (scale-free: "
                                   "λ1/rms(W0) and lr·rms(W0) per layer, and the λ2 term measured in units of "
                                   "rms(W0): ε·rms(W0), λ2/rms(W0)²; for models whose layers differ in scale)",
                           choices=("none", "layer"))
    score: str = _f("weight", "what decides which 2 of every 4 weights go: weight (published: the regulariser "
                              "and the mask rank |W|) or activation (they rank |W|·‖X‖, Wanda's score: each weight "
                              "scaled by the dense model's calibration activation norm of its input channel)",
                    choices=("weight", "activation"))
    warmup: float = _f(0.1, "share of steps with linear learning-rate warm-up", lo=0, hi=0.99)
    lr_schedule: str = _f("constant", "learning rate after the warm-up: constant (published) or cosine "
                                      "(decays towards 0 by the last step, so the mask settles before it is read)",
                           choices=("constant", "cosine"))
    seed: int = _f(0, "seed for sampling and any randomness", lo=0, hi=2**32 - 1)
    # engineering
    grad_ckpt: bool = _f(False, "gradient checkpointing (less memory, ~30% slower)")
    train_all: bool = _f(False, "train every parameter, not only the prunable weights")
    w0_offload: bool = _f(False, "keep the λ2 copy of W0 in CPU memory instead of on the GPU")
    master_weights: str = _f("fp32", "fp32 (AdamW and the prox act on float32 weights: on a bf16 or fp16 "
                                      "model, a float32 copy of the prunable weights that the model's weights "
                                      "are rounded from after every step; 8-10 more bytes per prunable weight) "
                                      "or off (the model's own weights: less memory, but updates below bf16's "
                                      "resolution are lost)", choices=("fp32", "off"))
    cpu_autocast: str = _f("auto", "auto (on a CPU that multiplies bfloat16 natively, AVX512-BF16 or AMX, learning's "
                                    "forward and backward passes and the held-out perplexity of a float32 model run "
                                    "their matrix products in bfloat16: several times faster there; weights, AdamW, "
                                    "the prox and the mask stay float32) or off (float32 products throughout)",
                           choices=("auto", "off"))
    layer_stats_every: int = _f(5, "emit per-layer 2:4 shares every N steps", lo=1, hi=1_000_000)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def bounds(cls, name: str) -> tuple:
        """(lowest, highest, lowest excluded?) of a numeric setting: the one declaration that the
        check here, the CLI and every widget of the app read."""
        meta = next(f.metadata for f in fields(cls) if f.name == name)
        return meta["lo"], meta["hi"], meta.get("lo_open", False)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise UserError(f"the settings must be a JSON object of name: value pairs, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown setting(s) in recipe: {', '.join(sorted(unknown))}")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.validate()
        return cfg

    def with_preset(self, name: str) -> "RunConfig":
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
        d = self.to_dict()
        d.update(PRESETS[name]["settings"])
        return RunConfig(**d)

    def validate(self, max_positions: int | None = None) -> "RunConfig":
        """Raise UserError with one clear line for the first bad value.

        Every field must have its declared type (text, whole number, number, true/false) before
        anything reads it: a recipe or an API request may hold anything."""
        self._check_types()
        def num(name, lo=None, hi=None, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SettingError(name, f"must be a finite number, got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise SettingError(name, f"must be {'>' if lo_open else '≥'} {lo}, got {v}")
            if hi is not None and v > hi:
                raise SettingError(name, f"= {v} is out of range (at most {hi})")

        def integer(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, float) and v.is_integer():
                setattr(self, name, int(v))
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SettingError(name, f"must be a whole number, got {v!r}")
            if not lo <= v <= hi:
                raise SettingError(name, f"must be between {lo} and {hi}, got {v}")

        for f in fields(self):              # bounds are declared once, on the field (see `bounds`)
            if "hi" in f.metadata:
                (integer if type(f.default) is int else num)(f.name, *self.bounds(f.name))
        if self.batch > self.samples:
            raise SettingError("batch", f"({self.batch}) cannot exceed the number of samples ({self.samples})")
        if max_positions:
            for name in ("ctx", "eval_ctx"):
                if getattr(self, name) > max_positions:
                    raise SettingError(name, f"= {getattr(self, name)} is longer than the model "
                                             f"allows ({max_positions} tokens)")
        check_device(self.device)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}; use auto, float32, bfloat16 or float16")
        if self.data not in ("", "builtin", "mix", "generated") and not self.data.startswith("hf:"):
            from pathlib import Path
            try:
                found = Path(self.data).expanduser().is_file()
            except (OSError, ValueError):     # a name too long for the file system, a NUL byte
                found = False
            if not found:
                raise UserError(f"data file {self.data!r} does not exist")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise SettingError(f.name, f"must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        if self.device_map not in ("", "auto"):
            raise SettingError("device_map", "must be empty or 'auto'")
        if self.max_memory:
            parse_max_memory(self.max_memory)
        return self

    def _check_types(self):
        for f in fields(self):
            v, kind = getattr(self, f.name), type(f.default)
            if kind is bool:
                if not isinstance(v, bool):       # "false" and "no" are truthy strings
                    raise SettingError(f.name, f"must be true or false, got {v!r}")
            elif kind is str:
                if not isinstance(v, str):
                    raise SettingError(f.name, f"must be text, got {v!r}")
                if len(v) > MAX_TEXT:
                    raise SettingError(f.name, f"is {len(v):,} characters long; the limit is {MAX_TEXT:,}")
            elif kind is int:
                if isinstance(v, float) and v.is_integer():
                    setattr(self, f.name, int(v))   # 3.0 from a number widget is 3
                elif isinstance(v, bool) or not isinstance(v, int):
                    raise SettingError(f.name, f"must be a whole number, got {v!r}")
            elif kind is float:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise SettingError(f.name, f"must be a number, got {v!r}")

    def cli_command(self, verb: str = "learn", extra: tuple = (), only: set | None = None) -> str:
        """The CLI command that reproduces this configuration (non-default values only; `only`
        limits it to the settings a subcommand accepts, `extra` are its own arguments)."""
        default = RunConfig()
        parts = ["python", "-m", "proxsparse_core", verb, *extra]
        for f in fields(self):
            v = getattr(self, f.name)
            if v == getattr(default, f.name) or (only is not None and f.name not in only):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                parts.append(flag)
            else:
                parts += [flag, str(v)]
        return shlex.join(parts)


# the settings a one-shot method uses: model, data and calibration (no learning settings)
PRUNE_SETTINGS = {"model", "device", "dtype", "trust_remote_code", "device_map", "max_memory", "data", "data_field",
                  "samples", "ctx", "eval_ctx", "eval_windows", "seed"}


def reproduce_command(cfg: RunConfig, method: str = LEARNED) -> str:
    """The CLI command that makes the result `method` again: `learn …` for ProxSparse,
    `prune --method NAME …` (with only the settings prune reads) for a one-shot method."""
    if method == LEARNED:
        return cfg.cli_command("learn")
    return cfg.cli_command("prune", ("--method", method), PRUNE_SETTINGS)


def _preset(model, note, gpu: bool = False, **settings):
    """A preset: its note and settings; `model` None means it fits any model (the model is kept);
    `gpu`: made for a GPU (the app says so where there is none)."""
    return {"note": note, "gpu": gpu, "settings": ({"model": model} if model else {}) | settings}


# The published 7B–14B recipes learn on the model's bf16 weights (master_weights off): float32 copies
# would add ~10 bytes per prunable weight, and a 7B run would no longer fit one 80 GB GPU (docs/gpu.md).
_PAPER = dict(samples=400, ctx=4096, steps=400, batch=1, warmup=0.1, grad_ckpt=True, lambda_scale="none",
              lr_schedule="constant", loss="lm", master_weights="off")

# Scale-free settings: λ1 and lr are shares of each layer's own weight scale rms(W0), so they mean
# the same on any model; the loss is self-distillation on half built-in, half self-written text,
# whose masks held up best on held-out text of other domains; and the regulariser ranks |W|·‖X‖
# (score "activation", scores.py) rather than |W|: with |W| a group the loss does not decide ends as
# magnitude pruning would leave it, with |W|·‖X‖ as Wanda would. Each choice was measured against its
# alternatives on two models and two seeds (bench/RESULTS.md): lr 0.005 rather than 0.01, 150 samples
# seen twice rather than 300 seen once. The model-agnostic `scale-free` preset adds λ2 = 1e-4 (ε 0.5,
# both relative to the layer's scale), which helped the second architecture measured and was within
# noise on the bundled model, so `bundled-quality` keeps λ2 = 0.
_SCALE_FREE = dict(samples=150, ctx=128, steps=300, batch=1, lambda1=0.01, lambda2=0.0, lr=0.005,
                   lambda_scale="layer", lr_schedule="cosine", warmup=0.1, grad_ckpt=False,
                   loss="distill", data="mix", score="activation")
# `bundled-quality` reads 16× the tokens: 600 steps of 8 samples drawn from 2,400 (each seen twice). With
# the same `standard` recovery for both and SparseGPT calibrated on the same 2,400 samples, this is the
# first setting measured whose recovered result is ahead of SparseGPT's on most texts (issue 30,
# bench/RESULTS.md); with 300 steps of one sample it was behind on nearly all. Made for a GPU (its
# CPU time per step: bench/RESULTS.md 1i); quick-demo is the CPU demo. `scale-free` (any model) keeps 300
# steps of one sample: on the second architecture measured, this budget helped SparseGPT's 2,400-sample
# calibration more than ProxSparse's recovered result (bench/RESULTS.md 1j).
_LARGE_BUDGET = dict(samples=2400, steps=600, batch=8)

# the preset the app opens on (default_preset): on a GPU the bundled model's best measured setting
# (bench/RESULTS.md), recommended; without one quick-demo, the short version that ends within a
# class period on a CPU (their measured times: bench/measured.json)
DEFAULT_PRESET = "bundled-quality"
CPU_PRESET = "quick-demo"


# The GPU demo (issue 29): a 0.5 B instruct model that still answers after its 2:4 mask and a
# standard recovery (bench/RESULTS.md). Offline it is the local folder bench/demo_model.py writes;
# without that folder, its hub id (a download).
GPU_DEMO = "gpu-demo"
GPU_DEMO_HUB_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
GPU_DEMO_FOLDER = "qwen2.5-coder-0.5b-instruct"        # under the cache folder (paths.cache_dir)


def gpu_demo_model() -> str:
    """The GPU demo's model: its local folder when bench/demo_model.py made it, else its hub id."""
    from proxsparse_core.paths import cache_dir

    local = cache_dir() / GPU_DEMO_FOLDER
    return str(local) if (local / "config.json").is_file() else GPU_DEMO_HUB_ID


def default_preset(gpu: bool | None = None) -> str:
    """The preset the app opens on (`gpu` None: this machine's). With a GPU: the GPU demo when its
    model is on this machine (no download), else DEFAULT_PRESET; without one, CPU_PRESET."""
    if gpu is None:
        gpu = torch.cuda.is_available()
    if not gpu:
        return CPU_PRESET
    return GPU_DEMO if PRESETS[GPU_DEMO]["settings"]["model"] != GPU_DEMO_HUB_ID else DEFAULT_PRESET

PRESETS: dict[str, dict] = {
    # chosen from bench/quality.py (bench/RESULTS.md): per-layer scaling is what makes the
    # bundled model learn at all (its layers differ ~6× in scale, see docs/method.md). Times and
    # quality are not written here: preset_note() adds the measured time from bench/measured.json.
    "quick-demo": _preset(BUNDLED, "bundled SmolLM2-135M, the short version for live demos on a CPU: per-layer "
                                   "scaled λ1/lr, weights ranked by |W|·‖X‖, 45 steps on the built-in text. "
                                   "For a model that still talks, recover it in the Compare tab",
                          samples=150, ctx=128, steps=45, batch=1, lambda1=0.01, lambda2=0.0, lr=0.01,
                          lambda_scale="layer", lr_schedule="constant", warmup=0.1, grad_ckpt=False,
                          loss="lm", data="builtin", score="activation"),
    "bundled-quality": _preset(BUNDLED, "bundled SmolLM2-135M, the best measured recipe, for a GPU: scale-free, "
                                        "ranks weights by |W|·‖X‖, self-distillation on built-in + self-written "
                                        "text, 600 steps of 8 samples (the first run also writes the model's own "
                                        "calibration text, cached after). Recover it in the Compare tab afterwards",
                               **{**_SCALE_FREE, **_LARGE_BUDGET}),
    "scale-free": _preset(None, "any model: λ1, lr, λ2 and ε relative to each layer's weight scale, weights "
                                "ranked by |W|·‖X‖, self-distillation on built-in + self-written text, 300 steps "
                                "of one sample (bundled-quality's recipe at a sixteenth of its tokens, plus a light "
                                "λ2 = 1e-4 that keeps the learned weights near W0)",
                          **{**_SCALE_FREE, "lambda2": 1e-4, "eps": 0.5}),
    GPU_DEMO: _preset(gpu_demo_model(), "GPU: Qwen2.5-Coder-0.5B-Instruct, a 0.5 B instruct model that keeps "
                                        "answering after 2:4: the scale-free recipe, then recover it (standard) "
                                        "in the Compare tab and show dense, mask only and mask + recovery "
                                        "side by side. Offline: the folder `python bench/demo_model.py` makes",
                      gpu=True, **{**_SCALE_FREE, "lambda2": 1e-4, "eps": 0.5}),
    "llama-2-7b": _preset("meta-llama/Llama-2-7b-hf", "paper: λ1=0.25, lr=1e-4", gpu=True,
                          lambda1=0.25, lambda2=0.0, lr=1e-4, **_PAPER),
    "llama-2-13b": _preset("meta-llama/Llama-2-13b-hf", "paper: λ1=0.5, λ2=0.25, ε=0.5, lr=1e-4", gpu=True,
                           lambda1=0.5, lambda2=0.25, eps=0.5, lr=1e-4, **_PAPER),
    "llama-3.1-8b": _preset("meta-llama/Llama-3.1-8B", "paper: λ1=0.85, lr=5e-5", gpu=True,
                            lambda1=0.85, lambda2=0.0, lr=5e-5, **_PAPER),
    "mistral-7b-v0.1": _preset("mistralai/Mistral-7B-v0.1", "paper: λ1=20, lr=5e-5", gpu=True,
                               lambda1=20.0, lambda2=0.0, lr=5e-5, **_PAPER),
    "mistral-7b-v0.3": _preset("mistralai/Mistral-7B-v0.3", "paper: λ1=25, lr=5e-5", gpu=True,
                               lambda1=25.0, lambda2=0.0, lr=5e-5, **_PAPER),
    "openllama-v2-7b": _preset("openlm-research/open_llama_7b_v2", "paper: λ1=1.0, lr=1e-4, ctx 2048", gpu=True,
                               lambda1=1.0, lambda2=0.0, lr=1e-4, **{**_PAPER, "ctx": 2048}),
    "qwen2.5-14b": _preset("Qwen/Qwen2.5-14B", "paper: λ1=0.2, lr=1e-4", gpu=True,
                           lambda1=0.2, lambda2=0.0, lr=1e-4, **_PAPER),
}


def preset_note(name: str, gpu: bool = False, native_bf16: bool | None = None) -> str:
    """A preset's note with its measured time on this kind of machine (bench/measured.json), if any.
    On a CPU without native bf16 (`native_bf16` None: this one's) the figure measured on such a CPU
    (`learn:<preset>:cpu-float32`: float32 products, slower) comes first."""
    from proxsparse_core.measured import describe
    from proxsparse_core.native import cpu_has_native_bf16

    note = PRESETS[name]["note"]
    keys = [f"learn:{name}:gpu"] if gpu else [f"learn:{name}:cpu"]
    if not gpu and not (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        keys.insert(0, f"learn:{name}:cpu-float32")
    when = next((w for w in map(describe, keys) if w), "")
    return f"{note}. Time: {when} (bench/RESULTS.md)" if when else note
