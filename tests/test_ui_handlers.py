"""The app's handlers as plain functions: no server, no browser, a tiny model folder."""
import math
import time

import gradio as gr
import pytest

from proxsparse_core.results import title
from proxsparse_core.config import RunConfig
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
    assert "Another run" in first[0] and "running" in first[0]
    second.close()
    steps_at_stop = len(job.events)
    assert jobs.stop().startswith("stopping")
    wait(job, timeout=30)
    assert job.status == "stopped" and len(job.events) <= steps_at_stop + 1
    assert job.result.steps_done == len(job.events) and LEARNED in jobs.ws.results
    assert jobs.verified[LEARNED] is True
    assert jobs.activity is None                         # the guard is free again
    assert jobs.stop() == "nothing is running"


def test_bad_settings_start_nothing_and_say_why(tiny_dir):
    jobs = JobManager()
    values = form_values(tiny_cfg(tiny_dir, lambda1=2.0))
    values[learn_tab.FORM.index("lambda1")] = -3.0
    with pytest.warns(UserWarning, match="lambda1"):
        out = list(learn_tab.start_run(jobs, learn_tab.DATA_MODES[0], None, "", False, *values))
    assert len(out) == 1 and "lambda1" in out[0][0] and jobs.job is None
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
    # while the pruned side is still growing, a matching prefix is not marked as different
    assert "ps-diff" not in compare_tab.render_pair("The capital", "The", LEARNED, streaming="pruned")[0]
    assert "Learn" in compare_tab.render_pair("text", "", None)[2]


def test_generation_streams_dense_then_pruned_with_the_same_settings(finished):
    jobs, _ = finished
    frames = list(compare_tab.generate_pair(jobs, LEARNED, "What is the capital of France?",
                                            False, 0.7, 0.9, 12, True))
    assert len(frames) >= 3                                   # streamed, not one block
    dense, pruned, summary = frames[-1]
    want_dense = jobs.ws.generate("dense", "What is the capital of France?",
                                  compare_tab.settings_from_form(False, 0.7, 0.9, 12, True))
    assert compare_tab.esc(want_dense) in dense.replace('<mark class="ps-diff">', "").replace("</mark>", "")
    assert summary and jobs.activity is None
    with pytest.raises(UserError):
        list(compare_tab.generate_pair(jobs, LEARNED, "   ", False, 0.7, 0.9, 12, True))
    with pytest.raises(UserError):
        compare_tab.settings_from_form(True, 0.0, 0.9, 12, True)


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
        if LEARNED in desc:
            jobs.eval_stop.set()
    table, note = compare_tab.compute_perplexities(jobs, [], progress)
    assert note.startswith("stopped") and title("dense") in set(table["method"])
    assert title(LEARNED) not in set(table["method"])


# ---------------------------------------------------------------------------- how 2:4 works

def test_prox_demo_shows_the_prox_output_and_survivors():
    fig, text = explain_tab.prox_demo(0.9, -0.7, 0.5, 0.3, 0.0)
    assert list(fig.data[1].y) == pytest.approx([0.9, -0.7, 0.5, 0.3])     # λ = 0: nothing moves
    fig, text = explain_tab.prox_demo(0.9, -0.7, 0.5, 0.3, 3.0)
    out = list(fig.data[1].y)
    assert sum(v != 0 for v in out) <= 2 and "already 2:4" in text
    assert "w1, w2" in text                                              # the two largest survive
    assert len(fig.data) == 2 + 4                                        # bars + one path per weight


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
    assert "Finish a run" in text
    with pytest.raises(UserError):
        explain_tab.weight_block(JobManager(), "model.no.such.weight")


def test_perplexity_rows_stream_one_at_a_time(finished):
    jobs, _ = finished
    jobs.ws.ppl.clear()
    frames = list(compare_tab.stream_perplexities(jobs, []))
    sizes = [len(table) for table, _ in frames]
    assert sizes[:-1] == list(range(1, len(sizes))) and sizes[-1] == sizes[-2] >= 2
    assert "done; computing the next row" in frames[0][1] and frames[-1][1].startswith("all rows computed")
    assert jobs.activity is None


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
