"""One job model for every long task (issue 27 step 2, issue 28 item 3): learning, recovery, the
perplexity table, export and the speed-up are server-side jobs; one busy rule; one Stop for
whatever runs, which every tab's panel reports; a reloaded page re-attaches to any of them; the
page draws typed progress, never the words of a message. Handlers as plain functions, a tiny model."""
import threading
import time

import gradio as gr
import pytest

from proxsparse_core.progress import Progress, as_progress, counting
from proxsparse_core.results import LEARNED, title
from test_ui_handlers import tiny_cfg, wait
from test_ui_tiny_model import save_tiny_model
from ui import compare_tab, export_tab, learn_tab
from ui.jobs import Busy, JobManager, perplexity_phase, watch
from ui.widgets import SKIP, Widgets


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def jobs(tiny_dir):
    """A JobManager with a learned mask on the tiny model (nothing running; 16 held-out windows, so
    a perplexity takes four forward passes)."""
    jobs = JobManager()
    wait(jobs.start_learning(tiny_cfg(tiny_dir, eval_windows=16), evaluate=False))
    assert LEARNED in jobs.ws.results
    return jobs


def slow_forward(model, delay: float):
    """Every forward pass of `model` takes `delay` seconds longer; returns the undo."""
    inner = model.forward

    def forward(*a, **k):
        time.sleep(delay)
        return inner(*a, **k)
    model.forward = forward
    return lambda: setattr(model, "forward", inner)


def until(test, timeout=60.0):
    t0 = time.time()
    while not test():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


def long_recovery(jobs):
    """A fine-tuning recovery far too long to finish in a test (it is stopped)."""
    name, rcfg = compare_tab.recovery_request(jobs, LEARNED, "finetune", 5000, 0, 1)
    return compare_tab.start_recovery(jobs, name, rcfg)


# ---------------------------------------------------------------------------- watching a job

def test_a_page_sees_each_phase_begin_and_the_end_at_once_however_seldom_it_polls(jobs, tiny_dir):
    """A page polls a running job seldom (the Learn tab once a second); a phase shorter than that
    was never drawn running (CI once waited 5 minutes for it). Now a phase's start and the job's end
    wake every watcher at once: with a poll of a minute, the run is followed in seconds."""
    undo = slow_forward(jobs.ws.lm.model, 0.15)      # 16 windows: 4 forward passes, 0.6 s a phase
    try:
        job = jobs.start_learning(tiny_cfg(tiny_dir, eval_windows=16), evaluate=True)
        t0, seen = time.time(), []
        for j in watch(job, poll=60):
            p = j.current_phase
            seen.append((p.name, p.done, p.total) if p else j.status)
        took = time.time() - t0
    finally:
        undo()
    assert job.status == "finished" and seen[-1] == "finished", seen
    assert (perplexity_phase(job.name), 0, 16) in seen, seen       # drawn as it began, with its count
    assert took < 30, (took, seen)


def test_a_start_during_the_preload_waits_for_it_and_loads_nothing_again(tiny_dir, monkeypatch):
    """The app preloads its preselected model at start; a Start meanwhile waits for that load (its
    status says loading) and learns on the same model: one load in all."""
    from proxsparse_core import workspace

    loads, real = [], workspace.load_model

    def slow_load(*a, **k):
        loads.append(a[0])
        time.sleep(0.5)
        return real(*a, **k)
    monkeypatch.setattr(workspace, "load_model", slow_load)
    jobs = JobManager()
    cfg = tiny_cfg(tiny_dir)
    thread = jobs.preload(cfg)
    job = jobs.start_learning(cfg, evaluate=False)
    until(lambda: loads)
    assert thread.is_alive() and job.status in ("starting", "running", "loading")
    wait(job)
    thread.join(5)
    assert job.status == "finished" and loads == [str(tiny_dir)], (job.status, job.message, loads)
    assert LEARNED in jobs.ws.results


def test_the_preload_leaves_writing_the_models_own_text_to_the_first_start(tiny_dir, monkeypatch):
    """A preset on data `mix` (bundled-quality: 2,400 samples, half written by the model) preloads the
    model on the built-in text: writing the rest on a CPU kept the preload going far longer than a
    load, holding the loading lock that every Start waits for (the CI test of app_drive ran out of time)."""
    from proxsparse_core.data import selfgen

    written = []
    monkeypatch.setattr(selfgen, "generated_ids", lambda *a, **k: written.append(k))
    jobs = JobManager()
    jobs.preload(tiny_cfg(tiny_dir, data="mix")).join(60)
    assert jobs.ws.lm is not None and written == []
    assert "wrote itself" not in jobs.ws.data.source, jobs.ws.data.source


def test_a_failed_preload_is_said_by_the_job_that_needs_the_model(tmp_path):
    jobs = JobManager()
    cfg = tiny_cfg(tmp_path)                              # an empty folder: no model there
    jobs.preload(cfg).join(30)
    assert jobs.ws.lm is None
    job = jobs.start_learning(cfg, evaluate=False)
    wait(job)
    assert job.status == "failed" and str(tmp_path) in job.message, job.message


def _in_a_long_lived_thread(fn) -> int:
    """Run fn in a thread that stays alive afterwards, as Gradio's worker threads do; how many native
    threads (not started by Python) have appeared since and stay while it lives: the pools of threads
    fn started and ended go within moments, the pool of a thread that lives stays."""
    import os

    def tids() -> set:
        return {int(t) for t in os.listdir("/proc/self/task")}

    before, ran, hold = tids(), threading.Event(), threading.Event()
    failure = []

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)
        ran.set()
        hold.wait()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    ran.wait(60)

    def new() -> int:
        return len(tids() - before - {th.native_id for th in threading.enumerate()})
    stays, t0 = new(), time.time()
    while stays and time.time() - t0 < 3:
        time.sleep(0.05)
        stays = min(stays, new())
    hold.set()
    t.join()
    if failure:
        raise failure[0]
    return stays


def _parallel_work():
    import torch
    torch.ones(1 << 22).add_(1)          # far above ATen's grain size: an OpenMP parallel region


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_model_work_of_a_handler_leaves_no_openmp_pool_in_gradios_long_lived_threads(monkeypatch):
    """OpenMP keeps a pool of worker threads for every thread that ran parallel work while that thread
    lives; with more pool threads than cores it stops spinning between parallel regions, and every
    later learning step was slower after "Inspect model" ran in a Gradio worker thread. Handlers that
    load a model or read whole layers run that work in a thread of their own (off_thread)."""
    import torch

    from ui import explain_tab
    from ui.jobs import off_thread

    if torch.get_num_threads() < 2:
        pytest.skip("one OpenMP thread: no pool to keep")
    assert _in_a_long_lived_thread(_parallel_work) >= 1          # the control: a pool while it lives
    assert _in_a_long_lived_thread(lambda: off_thread(_parallel_work)) == 0

    class Loaded:
        def describe(self):
            return "a model"

    jobs = JobManager()
    monkeypatch.setattr(jobs, "ensure_loaded", lambda cfg: (_parallel_work(), Loaded())[1])
    said = []
    assert _in_a_long_lived_thread(lambda: said.append(
        learn_tab.inspect_model(jobs, "bundled:smollm2-135m", "cpu", "float32", False, ""))) == 0
    assert said == ["**Model** · a model"]
    monkeypatch.setattr(explain_tab, "_read", lambda name, jobs=None: (_parallel_work(), torch.randn(64, 64))[1])
    monkeypatch.setattr(explain_tab, "_learned", lambda jobs: None)
    assert _in_a_long_lived_thread(lambda: explain_tab.weight_block(jobs, "any.weight")) == 0


# ---------------------------------------------------------------------------- typed progress

def test_progress_is_its_message_and_carries_typed_fields():
    p = Progress("obs", 3, 12, "weight update (OBS): block 3/12", "blocks")
    assert p == "weight update (OBS): block 3/12" and p.startswith("weight update") and str(p) == p.message
    assert (p.stage, p.done, p.total, p.unit, p.fraction) == ("obs", 3, 12, "blocks", 0.25)
    assert Progress("samples").fraction is None
    with pytest.raises(AttributeError):
        p.done = 4
    import pickle
    assert pickle.loads(pickle.dumps(p)).to_dict() == p.to_dict()
    assert as_progress("plain words").stage == "" and as_progress(p) is p
    heard = []
    counting(heard.append, "perplexity", "windows", lambda d, t: f"{d} of {t}")(2, 4)
    assert heard[0].to_dict() == {"stage": "perplexity", "done": 2, "total": 4, "message": "2 of 4",
                                  "unit": "windows"}


# ---------------------------------------------------------------------------- one busy rule

def test_a_second_heavy_job_is_refused_at_once_naming_the_running_job(jobs, tiny_dir):
    job = long_recovery(jobs)
    try:
        until(lambda: job.events)                         # fine-tuning is under way
        assert jobs.current is job and jobs.activity == "recovering weights"
        for start in (lambda: list(compare_tab.stream_perplexities(jobs, [])),
                      lambda: compare_tab.start_perplexities(jobs, []),
                      lambda: export_tab.start_export(jobs, LEARNED, "x", False, False),
                      lambda: jobs.start_learning(tiny_cfg(tiny_dir)),
                      lambda: list(compare_tab.recover_result(jobs, LEARNED, "obs", 5)),
                      lambda: list(compare_tab.generate_pair(jobs, LEARNED, "hello", False, 0.7, 0.9, 4, False))):
            t0 = time.time()
            with pytest.raises(Busy, match="the machine is busy recovering weights"):
                start()
            assert time.time() - t0 < 2
        # the Learn tab's Start says so on its card and keeps its own panel
        frames = list(learn_tab.start_run(jobs, learn_tab.DATA_MODES[0], None, "", False,
                                          *[getattr(tiny_cfg(tiny_dir), n) for n in learn_tab.FORM]))
        assert len(frames) == 1 and "busy recovering weights" in frames[0].progress
        assert frames[0].loss_plot is SKIP
        assert jobs.last("perplexity") is None and jobs.last("export") is None     # nothing else started
    finally:
        jobs.stop()
        wait(job)
    assert job.status == "stopped" and jobs.activity is None and jobs.current is None


# ---------------------------------------------------------------------------- one Stop, said in every tab

def test_stop_from_the_learn_tab_stops_a_recovery_and_its_panel_says_stopped(jobs):
    job = long_recovery(jobs)
    until(lambda: job.events)
    said = learn_tab.stop_run(jobs)                      # the Learn tab's Stop button
    assert said.startswith("stopping recovering weights after the current step")
    wait(job)
    assert job.status == "stopped" and 1 <= len(job.events) < 5000
    view = compare_tab.recovery_view(jobs, job)
    assert "ps-badge ps-stopped" in view.rec_progress and "perplexity skipped" in view.rec_progress
    assert view.variant["value"] == LEARNED + "+recovery"          # the weights so far are kept
    assert learn_tab.stop_run(jobs) == "nothing is running"


def test_stop_during_the_perplexity_table_ends_that_job_and_the_note_says_stopped(jobs):
    jobs.ws.ppl.clear()
    undo = slow_forward(jobs.ws.lm.model, 0.2)
    try:
        job = compare_tab.start_perplexities(jobs, [])
        until(lambda: any(t.stage == "perplexity" and t.done for t in job.state.get("tasks", {}).values()))
        assert isinstance(next(iter(job.state["tasks"].values())), Progress)
        said = jobs.stop()                                          # any tab's Stop: the same call
        assert said.startswith("stopping computing perplexities after the current window")
        wait(job)
    finally:
        undo()
    assert job.status == "stopped" and jobs.activity is None
    table, note = compare_tab.table_view(jobs, job)
    assert note.startswith("stopped; the rows already computed are kept")
    assert title(LEARNED) not in set(table["method"])


def test_stop_during_an_export_ends_it_and_leaves_nothing(jobs, tmp_path, monkeypatch):
    monkeypatch.setenv("PROXSPARSE_EXPORTS", str(tmp_path / "exports"))
    jobs.ws.ppl.clear()
    undo = slow_forward(jobs.ws.lm.model, 0.2)
    try:
        job = export_tab.start_export(jobs, LEARNED, "mine", False, True)
        until(lambda: job.progress is not None and job.progress.stage == "perplexity")
        assert "nothing will be left half-written" in jobs.stop()
        assert "stopping" in export_tab.export_view(job).status or not job.active
        wait(job)
    finally:
        undo()
    assert job.status == "stopped"
    view = export_tab.export_view(job)
    assert view.status.startswith("⏹ **Stopped**") and "nothing was written" in view.status
    assert not (tmp_path / "exports" / "mine").exists()
    # the next export goes ahead (its Stop is its own)
    summary, zip_path = list(export_tab.stream_export(jobs, LEARNED, "mine", False, False))[-1]
    assert "Exported" in summary and zip_path.endswith("mine-artefacts.zip")


def test_stop_ends_a_generation_when_nothing_else_runs(jobs):
    undo = slow_forward(jobs.ws.lm.model, 0.05)
    try:
        frames = []
        gen = threading.Thread(target=lambda: frames.extend(
            compare_tab.generate_pair(jobs, LEARNED, "hello", False, 0.7, 0.9, 200, False)))
        gen.start()
        until(lambda: frames)
        assert jobs.activity == "generating text" and jobs.stop() == "stopping generating text …"
        gen.join(30)
    finally:
        undo()
    assert not gen.is_alive() and "Stopped" in frames[-1].summary


# ---------------------------------------------------------------------------- typed progress on the page

def test_the_typed_progress_of_an_export_reaches_the_page_without_reading_its_words(jobs, tmp_path, monkeypatch):
    """The export's progress is drawn from its stage and count: a message in words the page has
    never seen still shows the right step and bar."""
    monkeypatch.setenv("PROXSPARSE_EXPORTS", str(tmp_path / "exports"))
    real, gate, seen = export_tab.export_result, threading.Event(), []

    def export_result(*a, progress=None, **k):
        progress(Progress("artefacts", 2, 4, "zz unheard-of words zz", "steps"))
        gate.wait(30)
        return real(*a, progress=lambda p: seen.append(p) or progress(p), **k)
    monkeypatch.setattr(export_tab, "export_result", export_result)
    job = export_tab.start_export(jobs, LEARNED, "typed", False, False)
    until(lambda: job.progress is not None and job.progress.stage == "artefacts")
    status = export_tab.export_view(job).status
    assert "zz unheard-of words zz" in status and "step 3 of 4" in status and "█" * 10 + "░" * 10 in status
    assert export_tab.export_view(job).download is None           # no zip of an earlier export meanwhile
    gate.set()
    wait(job)
    assert [p.stage for p in seen] == ["model", "artefacts", "exported"] and all(isinstance(p, Progress) for p in seen)
    assert [(p.done, p.total) for p in seen] == [(0, 2), (1, 2), (2, 2)]
    summary, zip_path = export_tab.export_view(job)
    assert "Exported" in summary and zip_path.endswith("typed-artefacts.zip")


def test_recovery_progress_is_typed_from_obs_blocks_to_fine_tuning_steps(jobs, monkeypatch):
    """Every report, not only those a page happens to poll (3 fine-tuning steps of a tiny model
    can pass between two polls)."""
    from ui.jobs import Job

    stages = []
    real = Job.report

    def report(self, progress):
        if not stages or stages[-1] != progress.stage:
            stages.append(progress.stage)
        real(self, progress)
    monkeypatch.setattr(Job, "report", report)
    job = compare_tab.start_recovery(jobs, *compare_tab.recovery_request(jobs, LEARNED, "both", 3, 0, 1))
    frames = list(compare_tab.follow_recovery(jobs, job, poll=0.01))
    assert frames and job.status == "finished" and stages[-1] == "done"
    assert {"obs", "finetune"} <= set(stages) and stages.index("obs") < stages.index("finetune")
    assert job.result == LEARNED + "+recovery" and job.state["share"] == 1.0


# ---------------------------------------------------------------------------- a reloaded page re-attaches

def test_a_reloaded_page_re_attaches_to_a_running_recovery_then_shows_its_result(jobs):
    assert list(compare_tab.attach_recovery(JobManager())) == [compare_tab.RecoveryView()]     # nothing yet
    job = long_recovery(jobs)
    until(lambda: len(job.events) >= 2)
    page = compare_tab.attach_recovery(jobs)             # the page loads while the recovery runs
    first = next(page)
    assert "ps-badge ps-running" in first.rec_progress and "fine-tuning: step" in first.rec_progress
    assert "ready" not in first.rec_progress and len(first.rec_loss.data[0].x) >= 2
    assert first.table is SKIP and first.variant is SKIP
    jobs.stop()
    last = list(page)[-1]
    assert "ps-badge ps-stopped" in last.rec_progress and title(LEARNED + "+recovery") in last.rec_progress
    assert "value" not in last.variant and (title(LEARNED + "+recovery"), LEARNED + "+recovery") in last.variant["choices"]
    # a page loading afterwards sees the finished result at once
    again = list(compare_tab.attach_recovery(jobs))
    assert len(again) == 1 and "ps-badge ps-stopped" in again[0].rec_progress


def test_a_reloaded_page_re_attaches_to_the_perplexity_table_and_the_export(jobs, tmp_path, monkeypatch):
    monkeypatch.setenv("PROXSPARSE_EXPORTS", str(tmp_path / "exports"))
    jobs.ws.ppl.clear()
    job = compare_tab.start_perplexities(jobs, [])
    frames = list(compare_tab.attach_perplexities(jobs))
    assert job.status == "finished" and frames[-1].table_note.startswith("all rows computed")
    assert list(compare_tab.attach_perplexities(jobs))[-1].table_note == frames[-1].table_note
    export = export_tab.start_export(jobs, LEARNED, "again", False, False)
    summary, zip_path = list(export_tab.attach_export(jobs))[-1]
    assert export.status == "finished" and "Exported" in summary and zip_path.endswith("again-artefacts.zip")


# ---------------------------------------------------------------------------- widgets by name

def test_handlers_answer_by_widget_name():
    with gr.Blocks():
        a, b, c = gr.Textbox(), gr.Textbox(), gr.Textbox()
    w = Widgets(a=a, b=b, c=c)
    assert w(["c", "a"]) == [c, a]
    assert w.updates({"b": "x"}, ["a", "b", "c"]) == {b: "x"}               # the others stay as they are
    assert w.updates({"a": SKIP}, ["a", "b"]) == SKIP
    assert w.updates({"a": 1}, ["a"]) == 1                                   # one output: its value
    assert w.updates(None, []) is None
    with pytest.raises(ValueError, match="not its outputs"):
        w.updates({"c": 1}, ["a", "b"])
