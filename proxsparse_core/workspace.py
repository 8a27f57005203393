"""A workspace holds one loaded model, its data, and every pruning result made from it.

It is the single entry point the CLI and the app share: load → learn (or a one-shot method) →
evaluate / generate / verify → save. The model always rests with its dense weights W0; a pruned
variant is swapped in only while it is evaluated.
"""
from __future__ import annotations

import contextlib
import gc
import threading

import torch

from proxsparse_core.models.budget import check_learning_memory
from proxsparse_core.config import RunConfig
from proxsparse_core.data.text import Data, prepare_data
from proxsparse_core.errors import Stopped, UserError
from proxsparse_core.inference.evaluate import GenerationSettings, Score, agreement, generate, generate_stream, score
from proxsparse_core.inference import evaluate
from proxsparse_core.memo import ModelMemo, source_of
from proxsparse_core.method.learner import LearnResult, ProxSparseLearner
from proxsparse_core.method.training import autocast_context, autocast_mode
from proxsparse_core.sparsity.masks import Verification, masked, pruned_weights, snapshot, swapped, verify
from proxsparse_core.models.loading import LoadedModel, load_model
from proxsparse_core.progress import Progress, Timeline
from proxsparse_core.results import DENSE, LEARNED, Pruning, unique


class Workspace:
    def __init__(self):
        self.lm: LoadedModel | None = None
        self.data: Data | None = None
        self.originals: dict | None = None       # W0 of the prunable layers, on the CPU
        self.results: dict[str, Pruning] = {}
        self.ppl: dict[str, float] = {}
        self.top1: dict = {}                     # name → held-out top-1 predictions (for agreement)
        self.agreed: dict[str, float] = {}       # name → top-1 agreement a saved run recorded (reopen.py)
        self._model_key = None
        self._data_key = None
        self._tuning = None                      # (count, samples) drawn for recovery's fine-tuning
        self.memo: ModelMemo | None = None       # the loaded model's dense results kept on disk (memo.py)
        self.lock = threading.RLock()            # one heavy job at a time on this model
        self.scoring = "off"                     # "bf16": held-out scores with bf16 products (cpu_autocast)
        self.last_decoding = None                # the last 2:4 generation's use of the kernels (decoding)

    # ------------------------------------------------------------------ loading
    def load(self, cfg: RunConfig) -> LoadedModel:
        """Make `cfg`'s model and data the current ones. Nothing changes until both are ready: a
        bad setting, an unknown model or unusable data raises UserError and leaves the loaded
        model, its data and every result as they were. A new model replaces the results."""
        cfg.validate()                     # types, device, dtype: before anything is touched
        key = (cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code, cfg.device_map, cfg.max_memory)
        new_model = self.lm is None or key != self._model_key
        lm = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code,
                        cfg.device_map or None, cfg.max_memory) if new_model else self.lm
        cfg.validate(lm.max_positions)
        dkey = (cfg.data, cfg.data_field, cfg.samples, cfg.ctx, cfg.seed, cfg.eval_ctx, cfg.eval_windows)
        data = self.data
        if new_model or data is None or dkey != self._data_key:
            data = prepare_data(lm.tokenizer, cfg.data, cfg.samples, cfg.ctx, cfg.seed,
                                cfg.eval_ctx, cfg.eval_windows or None, cfg.data_field, lm.model)
        if new_model:                      # the new model is ready: only now drop the old one
            self.lm, self.originals, self.results, self.ppl, self.top1 = lm, snapshot(lm.prunable), {}, {}, {}
            self.agreed = {}
            self.memo = ModelMemo(lm.model)
            self._model_key = key
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        scoring = autocast_mode(cfg.cpu_autocast, str(lm.model.get_input_embeddings().weight.device), lm.dtype)
        if data is not self.data or scoring != self.scoring:    # scores of another precision are not kept
            self.data, self.ppl, self.top1, self._data_key, self._tuning = data, {}, {}, dkey, None
            self.agreed = {}
            self.scoring = scoring
        return self.lm

    def _need(self):
        if self.lm is None or self.data is None:
            raise UserError("load a model first")

    # ------------------------------------------------------------------ pruning
    def learn(self, cfg: RunConfig, on_event=None, stop: threading.Event | None = None,
              name: str | None = None) -> LearnResult:
        """Learn a mask; it becomes the result `name` (default: "proxsparse", or "proxsparse#2", … when
        that is taken: a new run never replaces an earlier one). `result.name` says which."""
        self.load(cfg)
        name = name or self.unique_name(LEARNED)
        check_learning_memory(self.lm, cfg)     # refuse settings that cannot fit, before any step
        with self.lock:
            result = ProxSparseLearner(self.lm, cfg, self.data.calibration, on_event, stop,
                                       held_out=self.data.held_out, originals=self.originals, memo=self.memo).run()
        if result.steps_done > 0:
            self.results[name] = Pruning(LEARNED, result.masks, None,
                                         {"status": result.status, "steps": result.steps_done,
                                          "message": result.message, "config": cfg.to_dict()})
            self.ppl.pop(name, None)
            self.top1.pop(name, None)
            self.agreed.pop(name, None)
            result.name = name
        return result

    def prune(self, method: str, cfg: RunConfig, progress=None, stop: threading.Event | None = None) -> Pruning:
        """A one-shot baseline (baselines.METHODS) on this workspace's calibration samples,
        stored as `results[method]`."""
        from proxsparse_core.baselines.oneshot import METHODS
        if method not in METHODS:
            raise UserError(f"unknown pruning method {method!r}; choose from: {', '.join(METHODS)}")
        self.load(cfg)
        with self.lock:
            pruning = METHODS[method].prune(self.lm, self.data.calibration, progress, stop)
        pruning.info["config"] = cfg.to_dict()
        self.add_result(method, pruning)
        return pruning

    def recover(self, name: str, rcfg, on_event=None, stop: threading.Event | None = None, progress=None,
                on_phase=None, timeline: Timeline | None = None):
        """Recover the survivors of result `name` (recovery.py); the recovered model is stored as
        `name + "+recovery"` when anything was recovered. Returns the RecoveryResult. Every stage —
        the dense model writing fresh text or its chat turns, drawing the fine-tuning samples, the OBS
        update, the teacher pass, fine-tuning — reports through `timeline` (recovery_timeline: each
        report a progress.Progress with its count and ETAs); without one, through one made here that
        tells `on_phase`. `progress(done, total)` hears of the OBS update's blocks too."""
        from proxsparse_core.recovery.recover import RecoveryResult, recover, recovered_name
        self._need()
        if name not in self.results:
            raise UserError(f"no pruning result named {name!r} to recover")
        if timeline is None:
            timeline = self.recovery_timeline(name, rcfg, on_phase)
        with self.lock:
            try:
                tuning = (self.tuning_samples(rcfg.samples, None, rcfg.text, stop, timeline)
                          if rcfg.method != "obs" else None)
            except Stopped:
                return RecoveryResult("stopped", "stopped while the fine-tuning text was prepared; nothing was "
                                      "recovered", None, [])
            res = recover(self.lm, self.data.calibration, self.results[name], name, self.originals, rcfg,
                          on_event, stop, progress, tuning, timeline)
        if res.pruning is not None:     # a second recovery of one result never replaces the first
            if isinstance(self.results[name].info.get("config"), dict):      # the settings that made its mask
                res.pruning.info.setdefault("config", self.results[name].info["config"])
            res.name = self.unique_name(recovered_name(name))
            self.add_result(res.name, res.pruning)
        return res

    def recovery_timeline(self, name: str, rcfg, tell=None, evaluate=()) -> Timeline:
        """The stages a recovery of result `name` with `rcfg` will go through, with the work each is
        expected to take (recover.recovery_stages), as a progress.Timeline that tells `tell` every
        report with its ETAs: writing text, drawing samples, the OBS update, the teacher pass, fine-tuning,
        and the held-out perplexity of the results named in `evaluate` that are not scored yet (the caller
        reports that stage, "perplexity", through the timeline: see `unscored`)."""
        from proxsparse_core.data.selfgen import MAX_NEW
        from proxsparse_core.recovery.recover import recovery_stages
        self._need()
        ctx = int(self.data.calibration.shape[1])
        n = rcfg.samples or int(self.data.calibration.shape[0])
        drawn = self._tuning is not None and self._tuning[0] == (rcfg.samples, rcfg.text)
        turns = 0 if drawn else self._turns(rcfg.samples, rcfg.text)
        held = self.data.held_out
        windows = int(held.shape[0]) * len(self.unscored(evaluate))
        stages = recovery_stages(self.lm, rcfg, tuple(self.data.calibration.shape), n, ctx,
                                 turns * (MAX_NEW + ctx // 2) + ctx if turns else 0, 0 if drawn else rcfg.text,
                                 windows, int(held.shape[1]) if held.dim() == 2 else 0)
        return Timeline(stages, tell)

    def score_recovery(self, names, timeline: Timeline | None = None, stop=None) -> dict:
        """Held-out perplexity of `names` after a recovery (name → perplexity): those not scored yet
        report stage "perplexity" (windows, over all of them) through the recovery's `timeline`, whose
        ETA counted them from the start (recovery_timeline's `evaluate`)."""
        todo = self.unscored(names)
        for i, n in enumerate(todo):
            progress = None
            if timeline is not None:
                progress = (lambda d, t, i=i, n=n: timeline.report(
                    "perplexity", i * t + d, len(todo) * t,
                    f"held-out perplexity of {n}: window {d}/{t} (result {i + 1} of {len(todo)})", "windows"))
                progress(0, int(self.data.held_out.shape[0]))
            self.perplexity(n, progress=progress, stop=stop)
        return {n: self.perplexity(n, stop=stop) for n in names}

    def unscored(self, names) -> list:
        """Those of `names` whose held-out perplexity is not known yet (the dense model's: neither here
        nor kept on disk), in order: the ones an evaluation will have to run."""
        out = []
        for n in dict.fromkeys(names):
            if n in self.ppl:
                continue
            if n == DENSE and self.memo is not None and self._dense_score() is not None:
                continue
            out.append(n)
        return out

    def _turns(self, n: int, text: int = 0) -> int:
        """How many of n fine-tuning samples are the model's own chat turns (tuning_samples)."""
        from proxsparse_core.data.text import GENERATED_SOURCES
        from proxsparse_core.chat.template import has_template
        source = (self._data_key[0] or "builtin").strip()
        return n // 2 if n and not text and source not in GENERATED_SOURCES and has_template(self.lm.tokenizer) else 0

    def tuning_samples(self, n: int, on_phase=None, text: int = 0, stop=None, timeline: Timeline | None = None):
        """n calibration samples for recovery's fine-tuning, drawn from this run's calibration source
        and seed exactly as the run's own (0 or the run's count: the run's own samples). With `text`
        > 0, the dense model first writes that many tokens of fresh text (selfgen.fresh_ids, cached)
        and the samples are drawn over it and the source's text together (data.with_fresh_text). For a chat
        model whose samples would hold no chat turn (a file, the built-in text; n > 0, no fresh text), half of
        the n are the model's own chat turns (selfgen.chat_turns, cached; issue 28: without them it recited
        its system prompt). Each stage reports through `timeline` when given (with ETAs), else to
        `on_phase` (a progress.Progress)."""
        from proxsparse_core.data.text import calibration_only, special_prefix, with_fresh_text
        own = self.data.calibration.shape[0]
        source = (self._data_key[0] or "builtin").strip()
        turns = self._turns(n, text)

        def say(stage, done, total, message, unit=""):
            if timeline is not None:
                timeline.report(stage, done, total, message, unit)
            elif on_phase:
                on_phase(Progress(stage, done, total, message, unit))
        if n in (0, own) and not text and not turns:
            return self.data.calibration
        key = (n, text)
        if self._tuning is None or self._tuning[0] != key:
            _, field, _, ctx, seed = self._data_key[:5]
            n = n or own
            fresh = None

            def writing(stage: str, what: str):
                """A (done, total) callback for text the dense model writes: it reports the tokens
                written so far and ends the writing (Stopped) when Stop was pressed."""
                def tell(done, total):
                    if stop is not None and stop.is_set():
                        raise Stopped(f"stopped while the dense model wrote {what.split(':')[0]}")
                    say(stage, min(done, total), total, f"the dense model writes {what}: {min(done, total):,} "
                        f"of {total:,} tokens (cached for this model and seed) …", "tokens")
                return tell
            if text:
                from proxsparse_core.data.selfgen import fresh_ids

                tell = writing("fresh-text", "fresh text for fine-tuning")
                tell(0, text)
                fresh = fresh_ids(self.lm.model, self.lm.tokenizer, text, seed, tell)
            say("samples", 0, n, f"drawing {n:,} fine-tuning samples (for self-written text, the first time "
                f"the model writes more of it) …", "samples")
            try:
                samples = (calibration_only(self.lm.tokenizer, source, n - turns, ctx, seed, field, self.lm.model)
                           if fresh is None else with_fresh_text(self.lm.tokenizer, source, n, ctx, seed, field, fresh))
            except UserError as exc:      # e.g. the uploaded calibration file is gone since the run
                raise UserError(f"could not draw {n} fine-tuning samples ({exc}); set the fine-tuning "
                                f"samples to 0 to fine-tune on the run's own samples") from None
            if turns:
                from proxsparse_core.data.selfgen import chat_turns

                written = writing("chat-turns", f"its chat turns: answers to instructions for {turns:,} of the samples")
                say("chat-turns", 0, 0, f"the dense model answers instructions for {turns:,} of the samples "
                    f"(cached for this model and seed) …", "tokens")
                samples = torch.cat([samples, chat_turns(self.lm.model, self.lm.tokenizer, turns, ctx, seed,
                                                         special_prefix(self.lm.tokenizer), written)])
            self._tuning = (key, samples)
        return self._tuning[1]

    def add_result(self, name: str, pruning: Pruning):
        self.results[name] = pruning
        self.ppl.pop(name, None)
        self.top1.pop(name, None)
        self.agreed.pop(name, None)

    def unique_name(self, name: str) -> str:
        """`name` if no result has it, else `name#2`, `name#3`, … (results.unique)."""
        return unique(name, self.results)

    def restore_score(self, name: str, ppl: float, agreement: float | None = None):
        """A held-out perplexity (and top-1 agreement with dense) that a saved run recorded on these
        very windows (reopen.py), kept until the data or the result changes; a perplexity measured
        here is never replaced."""
        if name not in self.ppl:
            self.ppl[name] = float(ppl)
            if agreement is not None:
                self.agreed[name] = float(agreement)

    def weights_of(self, name: str) -> dict:
        r = self.results.get(name)
        if r is None:
            raise UserError(f"no pruning result named {name!r} yet")
        return r.weights if r.weights is not None else pruned_weights(self.originals, r.masks)

    def variant(self, name: str):
        """Context manager: the model with `name`'s weights ('dense' = unchanged)."""
        self._need()
        if name == DENSE:
            from contextlib import nullcontext
            return nullcontext()
        r = self.results.get(name)
        if r is not None and r.weights is None:    # W0 · mask, written in place (no copy of the model)
            return masked(self.lm.prunable, r.masks, self.originals)
        return swapped(self.lm.prunable, self.weights_of(name), self.originals)

    # ------------------------------------------------------------------ evaluation
    def perplexity(self, name: str = DENSE, progress=None, stop=None) -> float:
        """Held-out perplexity of a result (cached until the data or the result changes). The dense
        model's, with its top-1 predictions, is also kept on disk for this model and these windows
        (memo.py): measured once, then read."""
        self._need()
        if name not in self.ppl:
            with self.lock:
                s = self._dense_score(progress) if name == DENSE else None
                if s is None:
                    with self.variant(name), self.scoring_products():
                        s = score(self.lm.model, self.data.held_out, progress=progress, stop=stop)
                    if name == DENSE and self.memo is not None:
                        self.memo.store("dense-score", {"ppl": s.ppl, "top1": s.top1}, *self._score_inputs())
            self.ppl[name], self.top1[name] = s.ppl, s.top1
        return self.ppl[name]

    def scoring_products(self):
        """The context every held-out score runs in: bfloat16 matrix products on a CPU that has them
        (RunConfig.cpu_autocast; the same perplexity to about 0.1 %, several times faster), else float32."""
        return autocast_context(self.scoring)

    def _score_inputs(self) -> tuple:
        bf16 = ("bf16 products",) if self.scoring == "bf16" else ()
        return (self.data.held_out, source_of(evaluate.score, Score)) + bf16

    def dense_score_known(self) -> bool:
        """The dense model's held-out score is known without measuring it: measured in this session, or
        kept on disk for this model and these windows (then its perplexity phase takes no time)."""
        if self.lm is None or self.data is None:
            return False
        return DENSE in self.ppl or self._dense_score() is not None

    def _dense_score(self, progress=None) -> Score | None:
        """The dense model's score on these windows as kept on disk, or None."""
        if self.memo is None:
            return None
        kept = self.memo.lookup("dense-score", *self._score_inputs())
        if not (isinstance(kept, dict) and isinstance(kept.get("top1"), torch.Tensor)
                and isinstance(kept.get("ppl"), float)):
            return None
        if progress:
            progress(self.data.held_out.shape[0], self.data.held_out.shape[0])
        return Score(kept["ppl"], kept["top1"])

    def agreement(self, name: str, stop=None) -> float:
        """Share of held-out positions where `name` picks the same next token as the dense model."""
        for n in (DENSE, name):
            if n in self.ppl and n not in self.top1:    # a recorded score (restore_score): measured here
                self.ppl.pop(n)
        self.perplexity(DENSE, stop=stop)
        self.perplexity(name, stop=stop)
        return agreement(self.top1[name], self.top1[DENSE])

    def verify(self, name: str) -> Verification:
        self._need()
        r = self.results[name]
        with self.lock, self.variant(name):
            return verify(self.lm.prunable, r.masks, self.originals, updated_ok=r.weights is not None)

    @property
    def on_cuda(self) -> bool:
        """The loaded model is on a CUDA device (where 2:4 generation runs through the 2:4 kernels)."""
        return self.lm is not None and str(self.lm.device).startswith("cuda")

    def generate(self, name: str, prompt: str, settings: GenerationSettings | None = None,
                 measuring=None) -> str:
        """`measuring(done, total)` hears of the 2:4 kernels measured first on a GPU (decoding)."""
        self._need()
        with self.lock, self.variant(name), self.decoding(name, measuring):
            return generate(self.lm.model, self.lm.tokenizer, prompt, settings)

    def generate_stream(self, name: str, prompt: str, settings: GenerationSettings | None = None,
                        measuring=None):
        self._need()
        with self.lock, self.variant(name), self.decoding(name, measuring):
            yield from generate_stream(self.lm.model, self.lm.tokenizer, prompt, settings)

    @contextlib.contextmanager
    def decoding(self, name: str, measuring=None):
        """Around a generation with `name`'s weights: a 2:4 result on a CUDA model generates through
        the 2:4 kernels (decode24.fast_generation: the one-token kernel where it was measured faster
        than dense, dense elsewhere; layer shapes this GPU has not measured yet are measured first,
        `measuring(done, total)` after each); the dense model, or any model off CUDA, as it is. What a
        generation that ran to its end did is kept in `last_decoding` (a FastGeneration, or None)."""
        self.last_decoding = None
        if name == DENSE or not self.on_cuda:
            yield None
            return
        from proxsparse_core.inference.decode24 import fast_generation
        with fast_generation(self.lm.model, self.lm.prunable, measuring) as fast:
            yield fast
        self.last_decoding = fast
