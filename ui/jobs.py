"""The server-side job manager: one workspace (one loaded model) and one learning job at a time.

Heavy objects live here, not in `gr.State`, so every visitor and every reload sees the same
model, results and running job. The learning job runs in its own thread and only appends plain
event dicts to a list; pages stream from that list, so a closed tab never stops or loses a run,
and a reloaded page simply re-attaches to it.

One heavy activity at a time (learning, perplexity, baselines, generation, export, loading a
model): `claim()` refuses a second one with a clear message instead of queueing behind a long
run, which is why those events have no concurrency limit of their own in Gradio.

Whether a model's own Python code (`trust_remote_code`) may run is decided by whoever starts
the server (`app.py --allow-remote-code`), never by a request: every configuration is checked
here before a model is loaded. The guard is a plain
`threading.Lock`, which may be released by another thread than the one that took it — Gradio
runs each step of a generator handler on whichever worker thread is free.
"""
from __future__ import annotations

import gc
import itertools
import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from proxsparse_core.config import RunConfig
from proxsparse_core.errors import Stopped, UserError
from proxsparse_core.method.learner import LearnResult
from proxsparse_core.results import DENSE, LEARNED, title
from proxsparse_core.workspace import Workspace

log = logging.getLogger("proxsparse.ui")

ACTIVE = ("starting", "loading", "running", "finishing", "evaluating")
MAX_LOG_LINES = 400


REMOTE_CODE_OFF = ("Trust remote code is off: this server was started without --allow-remote-code, "
                   "so a model's own Python code never runs here")


class Busy(UserError):
    """Another heavy activity holds the model."""


@dataclass
class Phase:
    """One part of a job after the steps, shown with its own progress."""
    name: str
    unit: str = ""                 # what `done` / `total` count ("windows"), if anything
    state: str = "waiting"         # waiting → running → done | skipped
    done: int = 0
    total: int = 0
    seconds: float = 0.0
    started: float = 0.0

    def start(self):
        self.state, self.started = "running", time.time()

    def progress(self, done: int, total: int):
        self.done, self.total = max(self.done, done), total      # never goes back

    def end(self, state: str = "done"):
        if self.state == "running":
            self.seconds = time.time() - self.started
        self.state = state


EXTRACT, VERIFY = "extracting the mask", "verifying the 2:4 pattern"


def perplexity_phase(name: str) -> str:
    return f"held-out perplexity · {title(name)}"


@dataclass
class LearnJob:
    id: int
    cfg: RunConfig
    evaluate: bool = True
    stop: threading.Event = field(default_factory=threading.Event)
    eval_stop: threading.Event = field(default_factory=threading.Event)   # a second Stop: skip perplexity
    events: list[dict] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    status: str = "starting"         # starting → loading → running → finishing → evaluating → finished|stopped|failed
    message: str = ""
    model_info: str = ""
    data_info: str = ""
    layer_names: list[str] = field(default_factory=list)
    result: LearnResult | None = None
    verification: str = ""
    perplexity: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    phases: list[Phase] = field(default_factory=list)

    def __post_init__(self):
        self.phases = [Phase(EXTRACT), Phase(VERIFY)]
        if self.evaluate:
            self.phases += [Phase(perplexity_phase(n), "windows") for n in (DENSE, LEARNED)]

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    @property
    def current_phase(self) -> Phase | None:
        return next((p for p in self.phases if p.state == "running"), None)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def say(self, line: str):
        self.log.append(line)
        del self.log[:-MAX_LOG_LINES]

    def version(self) -> tuple:
        """Changes whenever something a page shows changes (cheap to compare while polling)."""
        return (self.status, len(self.events), len(self.log), len(self.perplexity),
                tuple((p.state, p.done) for p in self.phases))


_DONE = object()


def release_free_memory():
    """Hand the heap memory a finished run freed back to the operating system (glibc keeps it
    otherwise, and each run's thread gets an arena of its own, so a process grows run by run)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def in_worker(work):
    """Run `work(emit)` in a daemon thread and yield whatever it emits; its exception is
    re-raised here. Gradio may run each step of a generator handler on a different thread, so
    anything that holds a lock across steps runs in one worker thread instead; and a page that
    goes away mid-stream leaves the worker to finish and free the lock."""
    updates: queue.Queue = queue.Queue()
    failure: list[BaseException] = []

    def run():
        try:
            work(updates.put)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            failure.append(exc)
        finally:
            updates.put(_DONE)

    threading.Thread(target=run, daemon=True, name="ui-worker").start()
    while (item := updates.get()) is not _DONE:
        yield item
    if failure:
        raise failure[0]


class JobManager:
    def __init__(self, workspace: Workspace | None = None, allow_remote_code: bool = False):
        if allow_remote_code is not True and allow_remote_code is not False:
            raise TypeError(f"allow_remote_code takes True or False, got {allow_remote_code!r}")
        self.ws = workspace or Workspace()
        self.allow_remote_code = allow_remote_code
        self.job: LearnJob | None = None
        self.cfg: RunConfig | None = None      # the configuration the workspace was last loaded with
        self.activity: str | None = None
        self.eval_stop = threading.Event()     # Stop in the Compare tab: generation, perplexity, baselines
        self.verified: dict[str, bool] = {}    # result name → passed the 2:4 verification
        self.warned: dict[str, float] = {}     # model → when Start warned it needs a GPU (Start again goes ahead)
        self._busy = threading.Lock()
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ the one-at-a-time guard
    def _busy_error(self) -> Busy:
        return Busy(f"the machine is busy {self.activity or 'with another task'}; "
                    f"wait for it to finish (or stop it) and try again")

    def _acquire(self, what: str):
        if not self._busy.acquire(blocking=False):
            raise self._busy_error()
        self.activity = what

    def refuse_if_busy(self):
        """Raise Busy at once while another heavy activity holds the model: a handler that checks
        names against the results first calls this, so a long job is answered "busy" rather than
        "no such result" (the claim itself still comes later, and is what guarantees one at a time)."""
        if self._busy.locked():
            raise self._busy_error()

    def _release(self):
        self.activity = None
        self._busy.release()

    @contextmanager
    def claim(self, what: str):
        """Hold the model for one heavy activity, or raise Busy at once."""
        self._acquire(what)
        try:
            yield self.ws
        finally:
            self._release()

    @property
    def learning(self) -> bool:
        return self.job is not None and self.job.active

    # ------------------------------------------------------------------ workspace loading
    def check_remote_code(self, cfg: RunConfig) -> RunConfig:
        """Refuse trust_remote_code unless it is exactly True and this server allows it."""
        v = cfg.trust_remote_code
        if v is not True and v is not False:
            raise UserError(f"Trust remote code must be true or false, got {v!r}")
        if v and not self.allow_remote_code:
            raise UserError(REMOTE_CODE_OFF)
        return cfg

    def ensure_loaded(self, cfg: RunConfig | None = None):
        """Load the model and data (of `cfg`, else of the last run, else the defaults). Call it
        while holding the guard."""
        cfg = self.check_remote_code(cfg or self.cfg or RunConfig())
        before = self.ws.lm
        lm = self.ws.load(cfg)
        if lm is not before:
            self.verified = {}                 # a new model starts without results
        self.cfg = cfg
        return lm

    # ------------------------------------------------------------------ learning
    def start_learning(self, cfg: RunConfig, evaluate: bool = True) -> LearnJob:
        self.check_remote_code(cfg).validate()
        self._acquire("learning a mask")
        job = LearnJob(next(self._ids), cfg, evaluate)
        self.job = job
        try:
            threading.Thread(target=self._run_job, args=(job,), daemon=True, name=f"learn-{job.id}").start()
        except BaseException:
            job.status, job.finished = "failed", time.time()
            self._release()
            raise
        return job

    def stop(self) -> str:
        """Stop learning after the current step (held-out perplexity is still measured when the
        run asked for it); pressed again, or while perplexity is measured, skip that too."""
        job = self.job
        if job is None or not job.active:
            return "nothing is running"
        if job.stop.is_set() or job.status in ("finishing", "evaluating"):
            job.stop.set()
            job.eval_stop.set()
            job.say("stop requested: held-out perplexity is skipped")
            return "stopping: held-out perplexity is skipped …"
        job.stop.set()
        then = (", then held-out perplexity is measured (press Stop again to skip it)"
                if job.evaluate else "")
        job.say(f"stop requested: the run ends after the current step{then}")
        return f"stopping after the current step{then} …"

    def _on_event(self, job: LearnJob, ev):
        job.events.append(ev.to_dict())
        job.say(ev.line())
        if ev.step >= ev.total_steps:          # the learner reads the mask out right after the last step
            job.status = "finishing"
            job.phase(EXTRACT).start()

    def _run_job(self, job: LearnJob):
        self._learn(job)
        # Some objects of a finished run sit in reference cycles (e.g. frames kept by an exception
        # caught while a model loaded) and would hold the run's tensors until Python's next full
        # collection, which may come only after the next run has allocated its own: collect now.
        gc.collect()
        release_free_memory()

    def _learn(self, job: LearnJob):
        try:
            job.status = "loading"
            job.say(f"$ {job.cfg.cli_command()}")
            job.say(f"loading {job.cfg.model} and tokenising the calibration data …")
            lm = self.ensure_loaded(job.cfg)
            data = self.ws.data
            job.layer_names = list(lm.prunable.names)
            job.model_info = lm.describe()
            job.data_info = (f"{data.source}: {data.calibration.shape[0]} calibration samples × "
                             f"{data.calibration.shape[1]} tokens; {data.held_out.shape[0]} held-out "
                             f"windows × {data.held_out.shape[1]} tokens")
            job.say(job.model_info)
            job.say(job.data_info)
            job.status = "running"
            result = self.ws.learn(job.cfg, lambda ev: self._on_event(job, ev), job.stop, name=LEARNED)
            job.result = result
            job.say(result.message)
            extract = job.phase(EXTRACT)
            if extract.state == "waiting":     # stopped early: the mask was read out all the same
                extract.start()
            extract.end("done" if result.steps_done else "skipped")
            if result.steps_done:
                job.status = "finishing"
                verify = job.phase(VERIFY)
                verify.start()
                check = self.ws.verify(LEARNED)
                verify.end()
                self.verified[LEARNED] = check.ok
                job.verification = str(check)
                job.say(job.verification)
                if job.evaluate:
                    job.status = "evaluating"
                    self._evaluate(job)
            job.message = result.message
            if result.status == "stopped" and result.steps_done:
                job.message += f": its mask was learned in {result.steps_done} of {job.cfg.steps} steps"
            for p in job.phases:
                if p.state in ("waiting", "running"):
                    p.end("skipped")
            job.status = result.status
        except Stopped as exc:      # Stop before the first step (while the teacher reads the samples)
            job.message, job.status = str(exc), "stopped"
            job.say(str(exc))
            for phase in job.phases:
                if phase.state in ("waiting", "running"):
                    phase.end("skipped")
        except UserError as exc:
            job.message, job.status = str(exc), "failed"
            job.say(f"error: {exc}")
        except Exception as exc:  # noqa: BLE001 - the page shows one line; the server log has the trace
            log.exception("learning job %s failed", job.id)
            job.message, job.status = f"unexpected error: {type(exc).__name__}: {exc}", "failed"
            job.say(f"error: {job.message}")
        finally:
            job.finished = time.time()
            self._release()

    def _evaluate(self, job: LearnJob):
        try:
            for name in (DENSE, LEARNED):
                phase = job.phase(perplexity_phase(name))
                phase.start()
                job.say(f"held-out perplexity of {name} …")
                job.perplexity[name] = self.ws.perplexity(name, stop=job.eval_stop, progress=phase.progress)
                phase.end()
            job.say("held-out perplexity: " + "  ".join(f"{k} {v:.3f}" for k, v in job.perplexity.items()))
        except Stopped:
            job.say("perplexity skipped (stopped); compute it in the Compare tab")
