"""The app's handlers as plain functions: no server, no browser, a tiny model folder."""
import math
import re
import time

import gradio as gr
import pytest

from proxsparse_core.results import title
from proxsparse_core.config import PRESETS, RunConfig
from proxsparse_core.errors import UserError
from test_ui_tiny_model import save_tiny_model
from ui import compare_tab, explain_tab, learn_tab
from ui.jobs import LEARNED, Busy, JobManager


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def tiny_cfg(tiny_dir, **kw):
    base = dict(model=str(tiny_dir), device="cpu", dtype="float32", samples=8, ctx=32, eval_ctx=32,
                eval_windows=4, steps=3, lambda1=0.5, lr=1e-2, layer_stats_every=1)
    return RunConfig(**{**base, **kw}).validate()


def form_values(cfg: RunConfig) -> list:
    return [getattr(cfg, n) for n in learn_tab.FORM]


def wait(job, timeout=60):
    t0 = time.time()
    while job.active and time.time() - t0 < timeout:
        time.sleep(0.05)
    assert not job.active, f"job still {job.status} after {timeout}s"


@pytest.fixture(scope="module")
def finished(tiny_dir):
    """A JobManager whose tiny run finished (shared by the compare tests)."""
    jobs = JobManager()
    job = jobs.start_learning(tiny_cfg(tiny_dir), evaluate=True)
    wait(job)
    return jobs, job


# ---------------------------------------------------------------------------- the form

def test_form_becomes_a_validated_config(tiny_dir):
    values = dict(zip(learn_tab.FORM, form_values(tiny_cfg(tiny_dir))))
    values["steps"] = 7.0                                   # gr.Number may hand over floats
    cfg = learn_tab.config_from_form(values, "builtin")
    assert cfg.steps == 7 and isinstance(cfg.steps, int) and cfg.model == str(tiny_dir)
    for field, bad in [("lambda1", -1.0), ("lr", float("nan")), ("steps", 0), ("model", " ")]:
        with pytest.raises(UserError):
            learn_tab.config_from_form({**values, field: bad})


def test_data_widgets_map_to_a_data_source(tmp_path):
    assert learn_tab.data_source(learn_tab.DATA_MODES[0], None, "") == "builtin"
    assert learn_tab.data_source(learn_tab.DATA_MODES[3], None, "") == "mix"
    assert learn_tab.data_source(learn_tab.DATA_MODES[2], None, "wikitext:raw") == "hf:wikitext:raw"
    f = tmp_path / "mine.txt"
    assert learn_tab.data_source(learn_tab.DATA_MODES[1], str(f), "") == str(f)
    for mode, upload, hf in [(learn_tab.DATA_MODES[1], None, ""), (learn_tab.DATA_MODES[2], None, "  ")]:
        with pytest.raises(UserError):
            learn_tab.data_source(mode, upload, hf)


def test_preset_sets_method_values_and_keeps_the_environment():
    current = dict(zip(learn_tab.FORM, form_values(RunConfig(device="cpu", dtype="bfloat16", steps=3))))
    values, note = learn_tab.preset_values("llama-2-13b", current)
    got = dict(zip(learn_tab.FORM, values))
    assert (got["lambda1"], got["lambda2"], got["lr"], got["steps"]) == (0.5, 0.25, 1e-4, 400)
    assert (got["device"], got["dtype"]) == ("cpu", "bfloat16")
    assert "λ2=0.25" in note
    with pytest.raises(UserError):
        learn_tab.preset_values("no-such-preset", current)


# ---------------------------------------------------------------------------- learning jobs

def test_finished_run_streams_charts_and_yields_a_verified_mask(finished):
    jobs, job = finished
    assert job.status == "finished", job.message
    assert [e["step"] for e in job.events] == [1, 2, 3]
    assert jobs.verified[LEARNED] is True and LEARNED in jobs.ws.results
    assert set(job.perplexity) == {"dense", LEARNED} and all(math.isfinite(v) for v in job.perplexity.values())
    progress, loss, sparsity, heatmap, log, info = learn_tab.render(job)
    assert "finished" in progress and "3 / 3" in progress
    assert list(loss.data[0].y) == [e["lm_loss"] for e in job.events]
    assert list(sparsity.data[-1].y) == pytest.approx([100 * e["share_24"] for e in job.events])
    assert len(heatmap.data) == 1 and "verified" in info and "Held-out perplexity" in info
    assert log.splitlines()[-1].startswith("$ python -m proxsparse_core learn")   # newest first
    # a page that loads now sees the finished run (re-attach), once, then the stream ends
    assert len(list(learn_tab.attach(jobs))) == 1


def test_reloaded_page_shows_the_settings_of_the_last_run(finished, tmp_path):
    assert all(v is gr.skip() or v == gr.skip() for v in learn_tab.form_of_last_run(JobManager()))
    jobs, job = finished
    out = learn_tab.form_of_last_run(jobs)
    got = dict(zip(learn_tab.FORM + ["mode", "upload", "hf"], out))
    assert got["model"]["value"] == job.cfg.model and (job.cfg.model, job.cfg.model) in got["model"]["choices"]
    assert (got["steps"], got["lambda1"], got["lr"], got["samples"]) == (3, 0.5, 1e-2, 8)
    assert got["mode"] == learn_tab.DATA_MODES[0]
    # the restored values make the same config again
    values = {n: (v["value"] if isinstance(v, dict) else v) for n, v in got.items() if n in learn_tab.FORM}
    assert learn_tab.config_from_form(values, "builtin") == job.cfg
    (tmp_path / "a.txt").write_text("some text")
    for data, mode, idx in [("hf:wikitext:raw", 2, "hf"), (str(tmp_path / "a.txt"), 1, "upload"),
                            (str(tmp_path / "gone.txt"), 1, None)]:
        job.cfg, saved = RunConfig(**{**job.cfg.to_dict(), "data": data}), job.cfg
        try:
            got = dict(zip(learn_tab.FORM + ["mode", "upload", "hf"], learn_tab.form_of_last_run(jobs)))
        finally:
            job.cfg = saved
        assert got["mode"] == learn_tab.DATA_MODES[mode]
        assert got[idx] == data if idx else got["upload"] == gr.skip()      # a vanished upload is not offered


def test_stop_ends_within_a_step_keeps_a_mask_and_second_start_is_refused(tiny_dir):
    jobs = JobManager()
    job = jobs.start_learning(tiny_cfg(tiny_dir, steps=100_000, layer_stats_every=50))
    t0 = time.time()
    while len(job.events) < 2 and time.time() - t0 < 60:
        time.sleep(0.02)
    assert job.status == "running"
    with pytest.raises(Busy, match="busy learning"):
        jobs.start_learning(tiny_cfg(tiny_dir))
    # a second visitor pressing Start is told, and watches the running job instead
    second = learn_tab.start_run(jobs, learn_tab.DATA_MODES[0], None, "", False, *form_values(tiny_cfg(tiny_dir)))
    with pytest.warns(UserWarning, match="busy learning"):          # the toast
        first = next(second)
    assert "already using the machine" in first[0] and "running" in first[0]
    second.close()
    steps_at_stop = len(job.events)
    assert jobs.stop().startswith("stopping")
    wait(job, timeout=30)
    assert job.status == "stopped" and len(job.events) <= steps_at_stop + 1
    assert job.result.steps_done == len(job.events) and LEARNED in jobs.ws.results
    assert jobs.verified[LEARNED] is True
    assert jobs.activity is None                         # the guard is free again
    assert jobs.stop() == "nothing is running"


def test_stop_before_the_first_step_says_stopped_not_failed(tiny_dir, monkeypatch):
    """Stop pressed while the teacher reads the calibration samples (distillation), before any step."""
    from proxsparse_core.method import learner
    from proxsparse_core.errors import Stopped

    def stopped_teacher(*args, **kwargs):
        raise Stopped("stopped while the teacher read the calibration samples")
    monkeypatch.setattr(learner, "teacher_targets", stopped_teacher)
    jobs = JobManager()
    job = jobs.start_learning(tiny_cfg(tiny_dir, loss="distill"))
    wait(job, timeout=60)
    assert job.status == "stopped" and "while the teacher" in job.message
    assert not any(p.state in ("waiting", "running") for p in job.phases)
    assert jobs.activity is None


def test_bad_settings_start_nothing_and_say_why(tiny_dir):
    jobs = JobManager()
    values = form_values(tiny_cfg(tiny_dir, lambda1=2.0))
    values[learn_tab.FORM.index("lambda1")] = -3.0
    with pytest.warns(UserWarning, match="λ1 · 2:4 regulariser must be"):      # the label the page shows
        out = list(learn_tab.start_run(jobs, learn_tab.DATA_MODES[0], None, "", False, *values))
    assert len(out) == 1 and "λ1 · 2:4 regulariser must be" in out[0][0] and jobs.job is None
    assert "lambda1" not in out[0][0]
    assert "λ1 · 2:4 regulariser" not in learn_tab.clear_note(jobs)     # an edited form drops the old message
    # a model that does not exist fails inside the job, with one line and no trace
    job = jobs.start_learning(tiny_cfg(tiny_dir, model=str(tiny_dir / "missing")))
    wait(job)
    assert job.status == "failed" and "does not exist" in job.message and "Traceback" not in job.message
    assert "Error" in learn_tab.info_markdown(job) and jobs.activity is None


def test_follow_yields_until_the_job_ends(tiny_dir):
    jobs = JobManager()
    job = jobs.start_learning(tiny_cfg(tiny_dir, steps=4), evaluate=False)
    frames = list(learn_tab.follow(job, poll=0.05))
    assert "finished" in frames[-1][0] and len(frames[-1][1].data[0].y) == 4
    assert not job.perplexity                                 # evaluation was switched off


# ---------------------------------------------------------------------------- compare

def test_render_pair_marks_the_first_divergence():
    dense, pruned, summary = compare_tab.render_pair("The capital is Paris.", "The capital is Rome.", LEARNED)
    assert '<mark class="ps-diff">Paris.</mark>' in dense and '<mark class="ps-diff">Rome.</mark>' in pruned
    assert "15 characters" in summary
    assert "Identical" in compare_tab.render_pair("same", "same", LEARNED)[2]
    # different from the first character: only the pruned side is marked
    dense, pruned, summary = compare_tab.render_pair("Paris.", "Rome.", LEARNED)
    assert "ps-diff" not in dense and '<mark class="ps-diff">Rome.</mark>' in pruned and "first character" in summary
    # while the pruned side is still growing, a matching prefix is not marked as different
    assert "ps-diff" not in compare_tab.render_pair("The capital", "The", LEARNED, streaming="pruned")[0]
    assert "Learn" in compare_tab.render_pair("text", "", None)[2]


def test_render_pair_says_when_the_2to4_model_wrote_nothing():
    """A 2:4 model can end its answer at once (measured: a 20-step quick-demo mask on "Write a Python
    function that adds two numbers."); the page must say so, not show an empty summary."""
    dense, pruned, summary = compare_tab.render_pair("def add(a, b): ...", "", LEARNED)
    assert "wrote nothing" in summary and "(no text)" in pruned
    assert "(no text)" not in compare_tab.render_pair("def add", "", LEARNED, streaming="pruned")[1]
    assert compare_tab.render_pair("def add", "", LEARNED, streaming="pruned")[2] == ""


def test_generation_streams_dense_then_pruned_with_the_same_settings(finished):
    jobs, _ = finished
    frames = list(compare_tab.generate_pair(jobs, LEARNED, "What is the capital of France?",
                                            False, 0.7, 0.9, 12, True))
    assert len(frames) >= 3                                   # streamed, not one block
    dense, pruned, summary = frames[-1]
    want_dense = jobs.ws.generate("dense", "What is the capital of France?",
                                  compare_tab.settings_from_form(False, 0.7, 0.9, 12, True))
    assert compare_tab._panel(want_dense, None, False) == dense.replace('<mark class="ps-diff">', "").replace("</mark>", "")
    assert summary and jobs.activity is None
    with pytest.raises(UserError):
        list(compare_tab.generate_pair(jobs, LEARNED, "   ", False, 0.7, 0.9, 12, True))
    with pytest.raises(UserError):
        compare_tab.settings_from_form(True, 0.0, 0.9, 12, True)


def test_block_repeats_reaches_both_generations(finished):
    """The tab's Block repeats box: both panels are generated with the loop guard (the tiny random
    model loops under plain greedy, so the guarded answers differ from the plain ones)."""
    jobs, _ = finished
    prompt = "What is the capital of France?"
    guarded = compare_tab.settings_from_form(False, 0.7, 0.9, 48, True, True)
    plain = compare_tab.settings_from_form(False, 0.7, 0.9, 48, True)
    dense, pruned, _ = list(compare_tab.generate_pair(jobs, LEARNED, prompt, False, 0.7, 0.9, 48, True, True))[-1]
    def shown(html):
        return html.replace('<mark class="ps-diff">', "").replace("</mark>", "")
    for name, panel in (("dense", dense), (LEARNED, pruned)):
        want = jobs.ws.generate(name, prompt, guarded)
        assert shown(panel) == compare_tab._panel(want, None, False)
        assert want != jobs.ws.generate(name, prompt, plain)


def test_generation_is_refused_while_learning(tiny_dir):
    jobs = JobManager()
    job = jobs.start_learning(tiny_cfg(tiny_dir, steps=100_000, layer_stats_every=50))
    try:
        with pytest.raises(Busy):
            list(compare_tab.generate_pair(jobs, LEARNED, "hello", False, 0.7, 0.9, 4, False))
    finally:
        jobs.stop()
        wait(job)


def test_perplexity_table_has_dense_learned_and_a_baseline(finished):
    jobs, _ = finished
    if "magnitude" not in compare_tab.baseline_methods():
        pytest.skip("baselines module not installed")
    table, note = compare_tab.compute_perplexities(jobs, ["magnitude"])
    rows = {r["method"]: r for _, r in table.iterrows()}
    assert list(rows)[:3] == [title(n) for n in ("dense", LEARNED, "magnitude")]
    assert rows[title("dense")]["× dense"] == "1.00×"
    assert rows[title("magnitude")]["2:4 verified"] == "✓"
    assert all(math.isfinite(v) and v > 1 for v in table["held-out perplexity"])
    assert "held-out windows" in note


def test_perplexity_stop_keeps_finished_rows(finished):
    jobs, _ = finished
    jobs.ws.ppl.pop(LEARNED, None)

    def progress(frac, desc=""):                              # press Stop as the learned row starts
        if desc.startswith(f"perplexity of {LEARNED}"):
            jobs.eval_stop.set()
    table, note = compare_tab.compute_perplexities(jobs, [], progress)
    assert note.startswith("stopped") and title("dense") in set(table["method"])
    assert title(LEARNED) not in set(table["method"])


# ---------------------------------------------------------------------------- how 2:4 works

def test_prox_demo_shows_the_prox_output_and_survivors():
    def prox_out(fig):          # kept (green) and dropped (red) bars share one slot per weight
        kept, dropped = fig.data[1].y, fig.data[2].y
        return [k if k is not None else d for k, d in zip(kept, dropped)]
    fig, text = explain_tab.prox_demo(0.9, -0.7, 0.5, 0.3, 0.0)
    assert prox_out(fig) == pytest.approx([0.9, -0.7, 0.5, 0.3])            # λ = 0: nothing moves
    assert list(fig.data[2].y)[2:] == pytest.approx([0.5, 0.3]) and "dropped" in fig.data[2].name   # in the legend
    assert fig.data[1].offsetgroup == fig.data[2].offsetgroup
    fig, text = explain_tab.prox_demo(0.9, -0.7, 0.5, 0.3, 3.0)
    out = prox_out(fig)
    assert sum(v != 0 for v in out) <= 2 and "already 2:4" in text
    assert "w1, w2" in text                                              # the two largest survive
    assert len(fig.data) == 3 + 4                                        # bars + one path per weight
    path_x = fig.data[3].x
    assert path_x[0] == explain_tab.LAMBDA_RANGE[0] and path_x[-1] == explain_tab.LAMBDA_RANGE[1]   # the slider's range
    labels = sorted(a.y for a in fig.layout.annotations if a.text in ("w1", "w2", "w3", "w4"))
    assert all(b - a > 0.05 for a, b in zip(labels, labels[1:]))        # w3 and w4 end at 0: labels apart


def test_explain_tab_opens_on_a_lambda_that_reaches_2to4():
    lam = explain_tab.DEFAULT_LAMBDA
    assert lam is not None and explain_tab.LAMBDA_RANGE[0] < lam <= explain_tab.LAMBDA_RANGE[1]
    fig, text = explain_tab.prox_demo(*explain_tab.DEFAULT_GROUP, lam)
    assert "already 2:4" in text and f"from λ = **{lam:.2f}**" in text
    _, below = explain_tab.prox_demo(*explain_tab.DEFAULT_GROUP, lam - explain_tab.LAMBDA_STEP)
    assert "not 2:4 yet" in below                                        # one step lower is not


def test_weight_block_shows_a_real_2to4_pattern(tiny_dir, monkeypatch):
    monkeypatch.setattr(explain_tab, "bundled_folder", lambda: tiny_dir)
    names = explain_tab.layer_choices()
    assert "model.layers.0.self_attn.q_proj.weight" in names and len(names) == 14
    fig, text = explain_tab.weight_block(JobManager(), names[0])
    original, pruned = fig.data[0].z, fig.data[1].z
    for row_o, row_p in zip(original, pruned):
        for g in range(0, len(row_p), 4):
            kept = [v for v in row_p[g:g + 4] if v is not None]      # pruned cells are blank
            assert len(kept) == 2 and all(v in row_o[g:g + 4] for v in kept)
    assert "After a run" in text
    with pytest.raises(UserError):
        explain_tab.weight_block(JobManager(), "model.no.such.weight")


def test_weight_block_after_a_run_shows_learned_next_to_magnitude_and_counts_the_difference(finished):
    jobs, _ = finished
    names = explain_tab.layer_choices(jobs)                  # the layers of the model the mask was learned for
    assert names == [f"{n}.weight" for n in jobs.ws.lm.prunable.names]
    name = names[-1]
    fig, text = explain_tab.weight_block(jobs, name)
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 3 and "learned" in fig.layout.annotations[2].text
    layer = name.removesuffix(".weight")
    learned, w0 = jobs.ws.results[LEARNED].masks[layer], jobs.ws.originals[layer]
    magnitude = explain_tab.mask_2to4(w0)
    block = (learned != magnitude)[:explain_tab.BLOCK_ROWS, :explain_tab.BLOCK_COLS]
    rows, cols = block.shape
    assert f"choose {int(block.sum())} of its {rows * cols} weights differently" in text
    ringed = [t for t in fig.data if t.type == "scatter"]
    assert len(ringed) == 1 and len(ringed[0].x) == int(block.sum())
    # opened after a run, the tab shows the layer where learning changed magnitude's choice most
    share = {n: float((jobs.ws.results[LEARNED].masks[n] != explain_tab.mask_2to4(jobs.ws.originals[n]))
                      .view(-1, 4).any(1).float().mean()) for n in jobs.ws.lm.prunable.names}
    update = explain_tab.select_layer(jobs, None)[0]
    assert update["value"] == max(share, key=share.get) + ".weight"
    assert explain_tab.select_layer(jobs, names[0])[0]["value"] == names[0]      # a chosen layer stays


def test_perplexity_rows_stream_one_at_a_time(finished):
    jobs, _ = finished
    jobs.ws.ppl.clear()
    frames = list(compare_tab.stream_perplexities(jobs, []))
    sizes = [len(table) for table, _ in frames]
    assert sizes == sorted(sizes) and set(range(1, sizes[-1] + 1)) <= set(sizes) and sizes[-1] >= 2   # row by row
    assert frames[-1][1].startswith("all rows computed")
    assert f"✓ **{title('dense')}** — done" in frames[-1][1]          # each row's own line
    # each task's progress never goes back (it is per task, not a share of the whole)
    seen = {}
    import re
    for _, note in frames:
        for name, done in re.findall(r"\*\*(.+?)\*\* — perplexity (\d+) /", note):
            assert int(done) >= seen.get(name, 0)
            seen[name] = int(done)
    assert jobs.activity is None


def test_per_task_progress_lines():
    text = compare_tab.tasks_markdown({"dense": ("done", 4, 4), LEARNED: ("perplexity", 1, 4),
                                       "wanda": ("pruning", 2, 30), "magnitude": ("waiting", 0, 0)})
    lines = text.split("  \n")
    assert lines[0] == f"✓ **{title('dense')}** — done"
    assert lines[1] == f"▶ **{title(LEARNED)}** — perplexity 1 / 4 windows (25%)"
    assert "pruning 2 / 30 blocks" in lines[2] and lines[3].endswith("— waiting")


def test_inspect_model_shows_device_precision_and_prunable_layers(tiny_dir):
    jobs = JobManager()
    text = learn_tab.inspect_model(jobs, str(tiny_dir), "cpu", "float32", False, "")
    assert "on cpu in float32" in text and "14 prunable linear layers" in text
    with pytest.warns(UserWarning, match="does not exist"):       # a toast, not a trace
        out = learn_tab.inspect_model(jobs, str(tiny_dir / "nope"), "cpu", "float32", False, "")
    assert out == gr.skip() and jobs.activity is None


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU message")
def test_speedup_panel_explains_why_not_on_cpu(finished):
    text = compare_tab.measure_speedup(finished)
    assert "needs a CUDA GPU" in text and "mask is still valid" in text
    text = compare_tab.measure_speedup(JobManager())
    assert "needs a CUDA GPU" in text


# ---------------------------------------------------------------------------- teaching details

def test_finished_run_shows_each_phase_after_the_steps_and_the_held_out_curve(finished):
    jobs, job = finished
    assert [p.name for p in job.phases] == ["extracting the mask", "verifying the 2:4 pattern",
                                            f"held-out perplexity · {title('dense')}",
                                            f"held-out perplexity · {title(LEARNED)}"]
    assert all(p.state == "done" for p in job.phases)
    dense = job.phases[2]
    assert dense.done == dense.total == jobs.ws.data.held_out.shape[0] and dense.unit == "windows"
    html = learn_tab.progress_html(job)
    assert html.count("ps-ph-done") == 4 and "after the steps" in html
    assert job.events[-1]["heldout_loss_24"] is not None and job.events[0]["heldout_loss_dense"] is not None
    loss = learn_tab.render(job)[1]
    names = [t.name for t in loss.data]
    assert "2:4 model if stopped now, same probe" in names and "dense model, held-out probe (2 windows × 16 tokens)" in names
    assert any(n.startswith("final 2:4: perplexity") and "4 windows × 32 tokens" in n for n in names)
    assert "learned in 3 of 3 steps" in learn_tab.info_markdown(job)
    assert "groups with 0/1/2/3/4 non-zeros" in "\n".join(job.log)


def test_live_frames_send_only_what_changed_and_the_last_frame_whole(finished):
    """A page following a run is sent a chart, the log or the info only when it changed (each redraw
    takes a 2-core machine's time from the learning): the heatmap when new per-layer shares arrive,
    no chart while the perplexity is measured; the first frame and the last (an API client reads
    it) carry everything."""
    from ui.jobs import LearnJob
    from ui.widgets import SKIP

    _, done = finished
    assert all(e.get("layer_share") for e in done.events)          # layer_stats_every=1
    job = LearnJob(99, cfg=done.cfg, evaluate=True)
    job.status, job.layer_names = "running", done.layer_names
    job.events = [dict(done.events[0])]
    job.say("step 1")
    parts = ("loss_plot", "sparsity_plot", "heatmap", "log", "info")
    sent = {}
    first = learn_tab.render(job, sent=sent)
    assert not any(v is SKIP for v in first)
    again = learn_tab.render(job, sent=sent)
    assert again.progress is not SKIP and all(getattr(again, n) is SKIP for n in parts)
    job.events.append(dict(done.events[1], layer_share=None))     # a step without per-layer shares
    job.say("step 2")
    step = learn_tab.render(job, sent=sent)
    assert step.heatmap is SKIP and step.info is SKIP
    assert all(getattr(step, n) is not SKIP for n in ("loss_plot", "sparsity_plot", "log"))
    job.events.append(dict(done.events[2]))                       # with shares: the heatmap too
    assert learn_tab.render(job, sent=sent).heatmap is not SKIP
    job.status = "evaluating"                                     # measuring: the phases move, no chart
    job.begin(job.phases[2].name, total=4)
    learn_tab.render(job, sent=sent)                              # (its window count names the probe)
    job.phases[2].progress(2, 4)
    measuring = learn_tab.render(job, sent=sent)
    assert "2 / 4 windows" in measuring.progress
    assert all(getattr(measuring, n) is SKIP for n in ("loss_plot", "sparsity_plot", "heatmap"))
    job.perplexity = dict(done.perplexity)                        # the ◆ final perplexities: the loss chart
    assert learn_tab.render(job, sent=sent).loss_plot is not SKIP
    # follow(): the frame after the job has ended is whole, even when nothing changed
    job.status = "finished"
    frames = list(learn_tab.follow(job, poll=0.01))
    assert frames and not any(v is SKIP for v in frames[-1])


def test_a_running_phase_shows_its_own_progress(tiny_dir):
    from ui.jobs import LearnJob

    job = LearnJob(1, tiny_cfg(tiny_dir), evaluate=True)
    job.status = "evaluating"
    for p in job.phases[:3]:
        p.start()
        p.end()
    last = job.phases[3]
    last.start()
    last.progress(3, 40)
    last.progress(2, 40)                                  # a late, smaller report does not go back
    html = learn_tab.progress_html(job)
    assert "3 / 40 windows" in html and f"held-out perplexity · {title(LEARNED)} …" in html
    assert "ETA" not in html


def test_stopped_run_still_gets_its_held_out_perplexity_and_says_how_many_steps(tiny_dir):
    jobs = JobManager()
    job = jobs.start_learning(tiny_cfg(tiny_dir, steps=100_000, layer_stats_every=50), evaluate=True)
    t0 = time.time()
    while len(job.events) < 2 and time.time() - t0 < 60:
        time.sleep(0.02)
    assert "then held-out perplexity is measured" in jobs.stop()
    wait(job)
    n = job.result.steps_done
    assert job.status == "stopped" and set(job.perplexity) == {"dense", LEARNED}
    assert f"its mask was learned in {n} of 100000 steps" in job.message
    assert f"learned in {n} of 100000 steps" in learn_tab.info_markdown(job)
    assert "Held-out perplexity" in learn_tab.info_markdown(job)


def test_second_stop_skips_the_perplexity(tiny_dir):
    jobs = JobManager()
    job = jobs.start_learning(tiny_cfg(tiny_dir, steps=100_000, layer_stats_every=50), evaluate=True)
    t0 = time.time()
    while len(job.events) < 2 and time.time() - t0 < 60:
        time.sleep(0.02)
    jobs.stop()
    assert "skipped" in jobs.stop()
    wait(job)
    assert job.status == "stopped" and not job.perplexity
    assert job.phases[2].state == "skipped" and LEARNED in jobs.ws.results


def test_presets_fit_the_model_say_gpu_and_held_out_share():
    from proxsparse_core.config import PRESETS
    from proxsparse_core.models.loading import BUNDLED

    labels = dict((v, k) for k, v in learn_tab.preset_choices())
    assert "GPU + download" in labels["llama-2-7b"] and "GPU + download" in labels["qwen2.5-14b"]
    assert "CPU, offline" in labels["quick-demo"] and labels[learn_tab.CUSTOM].startswith("custom")
    assert "Needs a GPU and a download" in learn_tab.preset_note("llama-2-13b")
    # a preset is shown only for its own model
    assert learn_tab.preset_for(RunConfig(model=BUNDLED), "quick-demo") == "quick-demo"
    assert learn_tab.preset_for(RunConfig(model="./other-model"), "quick-demo") == learn_tab.CUSTOM
    assert learn_tab.model_changed("./other-model", "quick-demo")[0] == learn_tab.CUSTOM
    assert learn_tab.model_changed(BUNDLED, "quick-demo")[0] == gr.skip()
    assert learn_tab.matching_preset(RunConfig().with_preset("quick-demo")) == "quick-demo"
    assert learn_tab.matching_preset(RunConfig(model="./other")) == learn_tab.CUSTOM
    values, note = learn_tab.preset_values(learn_tab.CUSTOM, {})
    assert all(v == gr.skip() for v in values) and "custom" in note
    assert set(learn_tab.GPU_PRESETS) == {k for k, v in PRESETS.items() if v["settings"].get("model", BUNDLED) != BUNDLED}
    from proxsparse_core.data.text import HELD_OUT_SHARE
    assert HELD_OUT_SHARE == 0.2 and learn_tab.held_out_words() == "⅕ of it (20%)"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only warning")
def test_a_gpu_preset_is_held_back_once_on_a_cpu_only_machine():
    jobs = JobManager()
    cfg = RunConfig().with_preset("llama-2-7b")
    first = learn_tab.gpu_warning(jobs, cfg)
    assert "made for a GPU" in first and "Start again" in first
    assert learn_tab.gpu_warning(jobs, cfg) is None                     # pressed again: go ahead
    assert learn_tab.gpu_warning(JobManager(), RunConfig().with_preset("quick-demo")) is None


def test_the_2to4_kernels_measured_before_an_answer_are_said_and_left_out_of_its_speed(finished, monkeypatch):
    """On a GPU, the first 2:4 answer waits while the kernels are measured for each layer shape:
    the Compare tab and the lecture mode say so with a count, and the 2:4 side's tokens/s (counted
    from its first streamed piece) does not include that wait."""
    from proxsparse_core.inference import decode24
    from ui import lecture

    jobs, _ = finished
    monkeypatch.setattr(jobs.ws.lm, "device", "cuda:0")       # said to be on a GPU
    monkeypatch.setattr(decode24, "triton_available", lambda: True)
    monkeypatch.setattr(decode24, "use_24_kernels", lambda model, prunable=None: (["a", "b"], []))

    def measure(model, tokens=1, progress=None):              # three shapes, 0.5 s each
        for k in range(3):
            time.sleep(0.5)
            progress(k + 1, 3)
        return 3
    monkeypatch.setattr(decode24, "measure", measure)
    monkeypatch.setattr(decode24, "restore_dense", lambda model: 0)
    frames = list(compare_tab.generate_pair(jobs, LEARNED, "hello", False, 0.7, 0.9, 24, False))
    notes = [f[2] for f in frames if isinstance(f[2], str) and "Measuring the 2:4 kernels" in f[2]]
    assert ["1 of 3" in notes[0], "3 of 3" in notes[-1], len(notes)] == [True, True, 3]
    summary = frames[-1][2]
    assert "Measuring" not in summary
    rate = float(re.search(r"2:4 ([0-9.]+) tokens/s", summary).group(1))
    assert rate > 16, summary          # 1.5 s of measuring in it would put 24 tokens under 16 tokens/s
    views = list(lecture.generate_three(jobs, LEARNED, "hello", 24, False))
    said = [v.lec_status for v in views if isinstance(v.lec_status, str) and "Measuring" in v.lec_status]
    assert said and "3 of 3" in said[-1] and "Measuring" not in views[-1].lec_status


def test_two_runs_in_a_row_do_not_keep_the_first_runs_tensors(tiny_dir):
    """What a finished run no longer needs is freed at once: its optimizer moments, its copies of
    W0; only its result's masks stay (a second run is a result of its own, issue 28 item 4).
    Garbage collection is off, so tensors that only reference cycles hold would stay, and be counted."""
    import gc
    import weakref

    import torch

    def live() -> dict:
        return {id(t): t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t._base is None}

    jobs = JobManager()
    gc.collect()
    gc.disable()
    try:
        before = {i: weakref.ref(t) for i, t in live().items()}   # other tests' tensors (fixtures) stay out
        wait(jobs.start_learning(tiny_cfg(tiny_dir, steps=4), evaluate=True))
        after_first = live()
        first_run = [weakref.ref(t) for i, t in after_first.items() if i not in before or before[i]() is not t]
        first_bytes = sum(t.untyped_storage().nbytes() for t in after_first.values())
        del after_first
        wait(jobs.start_learning(tiny_cfg(tiny_dir, steps=4, seed=1), evaluate=True))
        time.sleep(0.2)
        now = live()
        kept = [r() for r in first_run if r() is not None]
        now_bytes = sum(t.untyped_storage().nbytes() for t in now.values())
        result = list(jobs.ws.results[LEARNED].masks.values())       # the first run's result stays
        first_masks = [t for t in kept if t.dtype == torch.bool and not any(t is m for m in result)]
        assert not first_masks, f"{len(first_masks)} masks of the first run are still alive besides its result's"
        second = sum(m.untyped_storage().nbytes() for m in jobs.ws.results["proxsparse#2"].masks.values())
        assert now_bytes <= first_bytes * 1.02 + second, (now_bytes, first_bytes, second)
        del now, kept, first_masks
    finally:
        gc.enable()


def test_a_preset_sets_its_data_mode_so_the_app_learns_what_the_cli_learns():
    """bundled-quality (data mix: built-in + the model's own text) sets the data mode the CLI preset
    uses; quick-demo sets the built-in text; the form's config then has the preset's data."""
    values = {n: getattr(RunConfig(), n) for n in learn_tab.FORM}
    form = learn_tab.preset_form("bundled-quality", values)
    assert form["mode"] == learn_tab.DATA_MODES[3]
    cfg = learn_tab.config_from_form({n: form[n] for n in learn_tab.FORM}, learn_tab.data_source(form["mode"], None, ""))
    assert cfg == RunConfig(**{**cfg.to_dict(), **PRESETS["bundled-quality"]["settings"]})
    assert learn_tab.matching_preset(cfg) == "bundled-quality"
    assert learn_tab.preset_form("quick-demo", values)["mode"] == learn_tab.DATA_MODES[0]
    assert learn_tab.preset_form(learn_tab.CUSTOM, values)["mode"] is learn_tab.SKIP


def test_a_generation_ends_with_the_tokens_per_second_of_both_sides_on_a_gpu(finished, monkeypatch):
    """Issue 31: on a GPU the Compare tab says how fast dense and 2:4 decoded (tokens after the first
    streamed piece over the seconds since), counted with the model's tokenizer; on a CPU, where other work
    on the same cores skews one side, it says nothing."""
    jobs, _ = finished
    ask = lambda: list(compare_tab.generate_pair(jobs, LEARNED, "hello", False, 0.7, 0.9, 24, False))[-1][2]  # noqa: E731
    assert "tokens/s" not in ask()                            # the tiny model is on the CPU
    monkeypatch.setattr(jobs.ws.lm, "device", "cuda:0")       # said to be on a GPU: the same text, with speeds
    summary = ask()
    rates = re.findall(r"(dense|2:4) ([0-9.]+) tokens/s", summary)
    assert [side for side, _ in rates] == ["dense", "2:4"] and all(float(r) > 0 for _, r in rates)
    assert "the 2:4 model generated as a dense one" in summary   # CPU weights: no layer took the kernel
    assert compare_tab.speed_line({}) == "" and compare_tab.speed_line({"dense": (0, 1.0)}) == ""
    assert "dense 5.0 tokens/s" in compare_tab.speed_line({"dense": (10, 2.0)})
    from proxsparse_core.inference.decode24 import FastGeneration
    both = {"dense": (10, 2.0), "pruned": (10, 1.0)}
    ran = FastGeneration(triton=True, converted=["a", "b", "c"], skipped=["d"], kernel_layers=3)
    assert "2:4 10.0 tokens/s" in compare_tab.speed_line(both, ran) and "ran 3 of its 4 pruned layers on the 2:4 kernel" \
        in compare_tab.speed_line(both, ran)
    assert "not installed" in compare_tab.speed_line(both, FastGeneration(triton=False))
    assert "takes bf16/fp16" in compare_tab.speed_line(both, FastGeneration(triton=True, skipped=["a"]))
    assert "no layer was faster" in compare_tab.speed_line(both, FastGeneration(triton=True, converted=["a"]))
    assert "kernel" not in compare_tab.speed_line(both, None)      # an answer cut short: nothing claimed


def test_an_export_of_updated_weights_says_the_zip_cannot_carry_them(tmp_path):
    """The download zip holds masks, recipe and report; a recovered (or SparseGPT) result's weights
    travel only with the export folder, and the summary says so (reopening the zip elsewhere names
    the missing weights)."""
    from types import SimpleNamespace

    from ui.export_tab import summary_markdown

    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    base = {"result": "ProxSparse + recovery", "verified": True, "verification": "all groups are 2:4"}
    said = {}
    for updated in (True, False):
        res = SimpleNamespace(folder=tmp_path, files=["model.safetensors"], metrics={**base, "weights_updated": updated})
        said[updated] = summary_markdown(res)
    assert "copy the whole folder" in said[True] and "not the updated weights" in said[True]
    assert "copy the whole folder" not in said[False]
