"""The server-side job manager: one workspace (one loaded model) and one long job at a time.

Heavy objects live here, not in `gr.State`, so every visitor and every reload sees the same
model, results and running job.

Every long task — learning a mask, recovering a result, the perplexity table, an export, the 2:4
speed-up — is a `Job`: `JobManager.start` runs its work in a thread of its own, and that thread
alone writes to the job (status, typed progress `proxsparse_core.progress.Progress`, events, log,
result). Pages only read it: `watch(job)` yields the job whenever it changed, and each tab draws
it. So a closed tab never stops or loses a job, and a reloaded page (or a second tab) re-attaches
to the current or last job of each kind (`last(kind)`) and sees its progress, then its result.

One heavy activity at a time (a job, or a short request such as generation or loading a model
held by `claim()`): a second one is refused at once with `Busy`, naming what runs, instead of
queueing behind a long run, which is why those events have no concurrency limit of their own in
Gradio. `stop()` stops the current job whatever its kind (or the short request holding the
machine) and says what it stopped. Inside a job's own thread `claim()` lets the job's work use
functions that claim the machine themselves.

Whether a model's own Python code (`trust_remote_code`) may run is decided by whoever starts
the server (`app.py --allow-remote-code`), never by a request: every configuration is checked
here before a model is loaded. The guard is a plain `threading.Lock`, which may be released by
another thread than the one that took it — Gradio runs each step of a generator handler on
whichever worker thread is free.
"""
from __future__ import annotations

import gc
import itertools
import logging
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Callable

from proxsparse_core.config import RunConfig
from proxsparse_core.data.text import GENERATED_SOURCES
from proxsparse_core.errors import Stopped, UserError
from proxsparse_core.progress import Progress
from proxsparse_core.results import DENSE, LEARNED, method_of, title
from proxsparse_core.workspace import Workspace

log = logging.getLogger("proxsparse.ui")

ACTIVE = ("starting", "loading", "running", "finishing", "evaluating")
MAX_LOG_LINES = 400
POLL_S = 0.25                # how often a page looks at a running job (it is drawn only when it changed)


REMOTE_CODE_OFF = ("Trust remote code is off: this server was started without --allow-remote-code, "
                   "so a model's own Python code never runs here")


class Busy(UserError):
    """Another heavy activity holds the model."""


# ---------------------------------------------------------------------------- jobs

@dataclass(eq=False)
class Job:
    """One long task, run by the JobManager in a thread of its own. Only that thread writes to it."""
    id: int
    _: KW_ONLY
    kind: str = "task"               # learn | recover | perplexity | export | speedup
    what: str = "running a task"     # how a busy message and Stop name it: "recovering weights"
    stop_note: str = ""              # what Stop does to it: "after the current step; …"
    status: str = "starting"         # starting → running → finished | stopped | failed
    progress: Progress | None = None
    events: list = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    result: Any = None
    message: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    state: dict = field(default_factory=dict)        # what else a kind's page shows (e.g. per-row tasks)
    changes: int = field(default=0, repr=False)
    milestones: int = field(default=0, repr=False)   # parts begun: each is drawn at once (watch)
    wake: threading.Condition = field(default_factory=threading.Condition, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def touch(self):
        """Mark a change a page should draw."""
        self.changes += 1

    def milestone(self):
        """Mark a change every page draws at once rather than at its next poll (a phase begins, the
        job ends): a phase shorter than the poll would otherwise never be seen running."""
        with self.wake:
            self.milestones += 1
            self.changes += 1
            self.wake.notify_all()

    def report(self, progress: Progress):
        self.progress = progress
        self.touch()

    def say(self, line: str):
        self.log.append(line)
        del self.log[:-MAX_LOG_LINES]
        self.touch()

    def ended(self, status: str):
        """Called in the job's thread once its work returned or raised (status: the final one)."""

    def version(self) -> tuple:
        """Changes whenever something a page shows changes (cheap to compare while polling)."""
        return (self.status, len(self.events), len(self.log), self.changes)


def watch(job: Job, poll: float = POLL_S):
    """Yield `job` whenever it changed, until it ends (its final state included): at most once per
    `poll` seconds, and at once when a part of it begins (`Job.milestone`)."""
    seen = None
    while True:
        active, began = job.active, job.milestones
        version = job.version()
        if version != seen:
            seen = version
            yield job
        if not active:
            return
        with job.wake:
            job.wake.wait_for(lambda: job.milestones != began, timeout=poll)


@dataclass
class Phase:
    """One part of a learning job after the steps, shown with its own progress."""
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


@dataclass(eq=False)
class LearnJob(Job):
    """Learning a mask: its steps' events, then the phases after the steps."""
    cfg: RunConfig = None
    evaluate: bool = True
    eval_stop: threading.Event = field(default_factory=threading.Event)   # a second Stop: skip perplexity
    model_info: str = ""
    data_info: str = ""
    layer_names: list[str] = field(default_factory=list)
    verification: str = ""
    perplexity: dict = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)
    name: str = LEARNED              # the result it makes: "proxsparse", or "proxsparse#2" when that is taken
    previous: "LearnJob | None" = field(default=None, repr=False)   # the last run with curves (shown while
    #                                                                this one has none: a failed Start)

    def __post_init__(self):
        self.kind, self.what = "learn", "learning a mask"
        self.phases = [Phase(EXTRACT), Phase(VERIFY)]
        if self.evaluate:
            self.phases += [Phase(perplexity_phase(n), "windows") for n in (DENSE, self.name)]

    def named(self, name: str):
        """The result this run makes is `name` (its perplexity phase says so)."""
        if self.evaluate and name != self.name:
            self.phase(perplexity_phase(self.name)).name = perplexity_phase(name)
        self.name = name

    @property
    def shown(self) -> "LearnJob":
        """The run whose curves the Learn tab draws: this one, or — while this one has none and has
        ended (it failed or stopped before a step) — the last run that has curves."""
        if not self.events and not self.active and self.previous is not None:
            return self.previous
        return self

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def begin(self, name: str, total: int = 0) -> Phase:
        """Start the phase `name` (with its count when known) and have every page draw it at once."""
        phase = self.phase(name)
        if total:
            phase.progress(0, total)
        phase.start()
        self.milestone()
        return phase

    @property
    def current_phase(self) -> Phase | None:
        return next((p for p in self.phases if p.state == "running"), None)

    def ended(self, status: str):
        if status != "failed":             # a failed run keeps its phases as they were
            for p in self.phases:
                if p.state in ("waiting", "running"):
                    p.end("skipped")

    def version(self) -> tuple:
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


def off_thread(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a short-lived thread of its own: its result, or its exception raised
    here. For a handler that runs model work (loading a model, reading every layer's weights) in
    Gradio's long-lived worker threads otherwise: torch on the CPU parallelises through OpenMP,
    which keeps a pool of worker threads for every thread that ran parallel work, for as long as
    that thread lives, and once the pools hold more threads than there are cores it stops spinning
    between parallel regions: every later learning step was slower after "Inspect model" (bench/
    RESULTS.md 3e). A thread that ends takes its pool with it, as job threads and `in_worker` do."""
    return list(in_worker(lambda emit: emit(fn(*args, **kwargs))))[0]


def in_worker(work):
    """Run `work(emit)` in a daemon thread and yield whatever it emits; its exception is
    re-raised here. For a short streamed request (generation): Gradio may run each step of a
    generator handler on a different thread, so anything that holds a lock across steps runs in
    one worker thread instead; and a page that goes away mid-stream leaves the worker to finish
    and free the lock."""
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
    def __init__(self, workspace: Workspace | None = None, allow_remote_code: bool = False, runs_dir=None):
        if allow_remote_code is not True and allow_remote_code is not False:
            raise TypeError(f"allow_remote_code takes True or False, got {allow_remote_code!r}")
        self.ws = workspace or Workspace()
        self.allow_remote_code = allow_remote_code
        self._runs_dir = Path(runs_dir).expanduser() if runs_dir else None
        self.curves: dict[str, list] = {}      # result name → its learning or fine-tuning curve (event dicts)
        self.saved: dict[str, Path] = {}       # result name → the run folder it was saved in or opened from
        self.own: set[str] = set()             # results whose folder this app wrote (their metrics grow)
        self.current: Job | None = None        # the job holding the machine, if one does
        self.jobs: dict[str, Job] = {}         # kind → its current or last job
        self.cfg: RunConfig | None = None      # the configuration the workspace was last loaded with
        self.activity: str | None = None
        self.verified: dict[str, bool] = {}    # result name → passed the 2:4 verification
        self.warned: dict[str, float] = {}     # model → when Start warned it needs a GPU (Start again goes ahead)
        self._short_stop = threading.Event()   # Stop for a short request (generation) that holds the machine
        self._busy = threading.Lock()
        self._loading = threading.Lock()       # one model load at a time (a preload, then whoever needs it)
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ the one-at-a-time guard
    def _busy_error(self) -> Busy:
        return Busy(f"the machine is busy {self.activity or 'with another task'}; "
                    f"wait for it to finish (or stop it) and try again")

    def _acquire(self, what: str):
        if not self._busy.acquire(blocking=False):
            raise self._busy_error()
        self.activity = what

    def _in_job(self) -> bool:
        """True in the current job's own thread (which holds the machine already)."""
        job = self.current
        return job is not None and job.thread is threading.current_thread()

    def refuse_if_busy(self):
        """Raise Busy at once while another heavy activity holds the model: a handler that checks
        names against the results first calls this, so a long job is answered "busy" rather than
        "no such result" (the claim itself still comes later, and is what guarantees one at a time)."""
        if self._busy.locked() and not self._in_job():
            raise self._busy_error()

    def _release(self):
        self.activity = None
        self._busy.release()

    @contextmanager
    def claim(self, what: str):
        """Hold the model for one heavy activity, or raise Busy at once. In a job's own thread the
        job holds it already: its work may call functions that claim."""
        if self._in_job():
            yield self.ws
            return
        self._acquire(what)
        self._short_stop = threading.Event()      # a Stop meant for an earlier request does not carry over
        try:
            yield self.ws
        finally:
            self._release()

    @property
    def eval_stop(self) -> threading.Event:
        """The event Stop sets for the work holding the machine now: the current job's (learning
        has its own two), else the short request's."""
        job = self.current
        return job.stop if job is not None and not isinstance(job, LearnJob) else self._short_stop

    # ------------------------------------------------------------------ jobs
    @property
    def job(self) -> LearnJob | None:
        """The current or last learning job."""
        return self.jobs.get("learn")

    def last(self, kind: str) -> Job | None:
        """The current or last job of `kind` (what a reloaded page shows)."""
        return self.jobs.get(kind)

    @property
    def learning(self) -> bool:
        return self.job is not None and self.job.active

    def start(self, kind: str, what: str, work: Callable[[Job], str | None], stop_note: str = "",
              job: Job | None = None) -> Job:
        """Run `work(job)` in a thread of its own as the one heavy job, or raise Busy at once.
        `work` returns the final status (None: finished); Stopped ends it as stopped, UserError
        or any other exception as failed with one line in `job.message`."""
        job = job or Job(next(self._ids), kind=kind, what=what, stop_note=stop_note)
        self._acquire(job.what)
        self.current = job
        self.jobs[job.kind] = job
        job.thread = threading.Thread(target=self._run, args=(job, work), daemon=True,
                                      name=f"{job.kind}-{job.id}")
        try:
            job.thread.start()
        except BaseException:
            job.status, job.finished, self.current = "failed", time.time(), None
            self._release()
            raise
        return job

    def _run(self, job: Job, work):
        final = "failed"
        try:
            if job.status == "starting":
                job.status = "running"
            final = work(job) or "finished"
        except Stopped as exc:
            final, job.message = "stopped", str(exc)
            job.say(str(exc))
        except UserError as exc:
            job.message = str(exc)
            job.say(f"error: {exc}")
        except Exception as exc:  # noqa: BLE001 - the page shows one line; the server log has the trace
            log.exception("%s job %s failed", job.kind, job.id)
            job.message = f"unexpected error: {type(exc).__name__}: {exc}"
            job.say(f"error: {job.message}")
        finally:
            try:
                job.ended(final)
            finally:
                job.finished = time.time()
                if self.current is job:
                    self.current = None
                self._release()
                job.status = final          # only now: a page that sees it ended finds the machine free
                job.milestone()             # drawn at once
        # Some objects of a finished job sit in reference cycles (e.g. frames kept by an exception
        # caught while a model loaded) and would hold its tensors until Python's next full
        # collection, which may come only after the next job has allocated its own: collect now.
        gc.collect()
        release_free_memory()

    def stop(self) -> str:
        """Stop the current job, whatever its kind (or the short request holding the machine);
        the answer says what is stopped and how."""
        job = self.current
        if job is None or not job.active:
            if self._busy.locked() and self.activity:
                self._short_stop.set()
                return f"stopping {self.activity} …"
            return "nothing is running"
        if isinstance(job, LearnJob):
            return self._stop_learning(job)
        if not job.stop.is_set():
            job.stop.set()
            job.say("stop requested")
        return f"stopping {job.what}" + (f" {job.stop_note}" if job.stop_note else "") + " …"

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
        lm = self._load(cfg)
        self.cfg = cfg
        return lm

    def _load(self, cfg: RunConfig):
        with self._loading:                    # waits for a preload still under way
            before = self.ws.lm
            lm = self.ws.load(cfg)
            if lm is not before:               # a new model starts without results
                self.verified, self.curves, self.saved, self.own = {}, {}, {}, set()
            return lm

    def preload(self, cfg: RunConfig) -> threading.Thread:
        """Load `cfg`'s model and data in a thread of their own, holding nothing but the loading lock:
        the app does so at start for the preselected bundled model, so that the first Start learns at
        once instead of loading first. Whatever needs the model meanwhile (a Start, a generation)
        waits for it. A failure is only logged: the first job that needs the model loads it again and
        says what went wrong. Calibration text the model must write itself (data mix or generated) is
        not written here: on a CPU that can take far longer than loading (bundled-quality reads 2,400
        samples), so the preload takes the built-in text and the first Start writes the rest."""
        cfg = self.check_remote_code(cfg)
        if cfg.data in GENERATED_SOURCES:
            cfg = RunConfig(**{**cfg.to_dict(), "data": "builtin"})

        def work():
            try:
                self._load(cfg)
            except Exception:  # noqa: BLE001 - said again, to the page, by the job that needs the model
                log.warning("preloading %s failed", cfg.model, exc_info=True)
        thread = threading.Thread(target=work, daemon=True, name="preload")
        thread.start()
        return thread

    # ------------------------------------------------------------------ saved runs
    @property
    def runs_dir(self) -> Path:
        """Where every result is saved as a run folder: `app.py --runs-dir`, else $PROXSPARSE_RUNS,
        else <cache>/runs (proxsparse_core.paths.runs_dir)."""
        from proxsparse_core.paths import runs_dir
        return self._runs_dir or runs_dir()

    def save_result(self, name: str, events=None) -> str:
        """Save the result `name` as a run folder under runs_dir in the CLI's format (runs.library):
        once; later calls add its newest perplexities to the metrics of a folder this app wrote (a
        folder it opened is never changed). Never raises: a full disk or any other failure is the
        one line returned (the result stays in the app), as is where it was saved."""
        from proxsparse_core.runs import library

        try:
            if name not in self.ws.results:
                return f"not saved: there is no result named {name!r}"
            if name in self.saved:
                if name in self.own:
                    library.update_metrics(self.saved[name], library.scores(self.ws, name))
                return f"saved in {self.saved[name]}"
            info = self.ws.results[name].info
            base = info.get("base") if isinstance(info.get("base"), str) else None
            metrics = {"verified": self.verified[name]} if name in self.verified else {}
            path = library.save_run(self.runs_dir, self.ws, name, cfg=self.cfg, events=events, metrics=metrics,
                                    base_run=self.saved.get(base) if base else None)
        except UserError as exc:
            log.warning("result %s not saved: %s", name, exc)
            return f"⚠ not saved: {exc}"
        except Exception as exc:  # noqa: BLE001 - saving never ends the job; the server log has the trace
            log.exception("result %s not saved", name)
            return f"⚠ not saved: {type(exc).__name__}: {exc}"
        self.saved[name], self.own = path, self.own | {name}
        return f"saved as {path}"

    def record(self, job: Job) -> Job:
        """Make `job` — one that never ran here, e.g. an opened run's curves as a finished learning
        run — the last job of its kind, as a reloaded page shows it."""
        job.id = next(self._ids)
        if isinstance(job, LearnJob):
            job.previous = None
        self.jobs[job.kind] = job
        job.touch()
        return job

    def default_result(self) -> str | None:
        """The result a list shows first: the newest learned mask, else the newest result."""
        names = list(self.ws.results)
        learned = [n for n in names if method_of(n) == LEARNED]
        return (learned or names or [None])[-1]

    # ------------------------------------------------------------------ learning
    def start_learning(self, cfg: RunConfig, evaluate: bool = True) -> LearnJob:
        self.check_remote_code(cfg).validate()
        job = LearnJob(next(self._ids), cfg=cfg, evaluate=evaluate)
        job.previous = self._with_curves(self.job)
        return self.start(job.kind, job.what, self._learn, job=job)

    @staticmethod
    def _with_curves(job: "LearnJob | None") -> "LearnJob | None":
        """The last learning run that has curves, starting at `job` (and only it is kept)."""
        if job is not None and not job.events:
            job = job.previous
        if job is not None:
            job.previous = None
        return job

    def _stop_learning(self, job: LearnJob) -> str:
        """Stop learning after the current step (held-out perplexity is still measured when the
        run asked for it); pressed again, or while perplexity is measured, skip that too."""
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
            job.begin(EXTRACT)

    def _learn(self, job: LearnJob) -> str:
        """The learning job's work (its thread): load, learn, verify, measure; returns its status."""
        job.status = "loading"
        job.say(f"$ {job.cfg.cli_command()}")
        job.say(f"loading {job.cfg.model} and tokenising the calibration data …"
                + (" (the first run of a model and seed also has the model write its own calibration text: "
                   "minutes on a GPU, longer on a CPU; cached after)" if job.cfg.data in GENERATED_SOURCES else ""))
        lm = self.ensure_loaded(job.cfg)
        job.named(self.ws.unique_name(LEARNED))       # a new run never replaces an earlier result
        job.state["dense_measured"] = self.ws.dense_score_known()    # then its perplexity phase takes no time (ETA)
        data = self.ws.data
        job.layer_names = list(lm.prunable.names)
        job.model_info = lm.describe()
        job.data_info = (f"{data.source}: {data.calibration.shape[0]} calibration samples × "
                         f"{data.calibration.shape[1]} tokens; {data.held_out.shape[0]} held-out "
                         f"windows × {data.held_out.shape[1]} tokens")
        job.say(job.model_info)
        job.say(job.data_info)
        job.status = "running"
        result = self.ws.learn(job.cfg, lambda ev: self._on_event(job, ev), job.stop, name=job.name)
        job.result = result
        job.say(result.message)
        extract = job.phase(EXTRACT)
        if extract.state == "waiting":     # stopped early: the mask was read out all the same
            job.begin(EXTRACT)
        extract.end("done" if result.steps_done else "skipped")
        if result.steps_done:
            job.status = "finishing"
            verify = job.begin(VERIFY)
            check = self.ws.verify(job.name)
            verify.end()
            self.verified[job.name] = check.ok
            job.verification = str(check)
            job.say(job.verification)
            self.curves[job.name] = list(job.events)
            try:
                if job.evaluate:
                    job.status = "evaluating"
                    self._evaluate(job)
            finally:                       # saved whatever happens while it is measured
                job.state["saved"] = self.save_result(job.name, events=job.events)
                job.say(job.state["saved"])
        job.message = result.message
        if result.status == "stopped" and result.steps_done:
            job.message += f": its mask was learned in {result.steps_done} of {job.cfg.steps} steps"
        return result.status

    def _evaluate(self, job: LearnJob):
        try:
            for name in (DENSE, job.name):
                phase = job.begin(perplexity_phase(name), total=self.ws.data.held_out.shape[0])
                job.say(f"held-out perplexity of {name} …")
                job.perplexity[name] = self.ws.perplexity(name, stop=job.eval_stop, progress=phase.progress)
                phase.end()
            job.say("held-out perplexity: " + "  ".join(f"{k} {v:.3f}" for k, v in job.perplexity.items()))
        except Stopped:
            job.say("perplexity skipped (stopped); compute it in the Compare tab")
