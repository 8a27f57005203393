"""Issue 28, the classroom frictions of the app: the teaching tab's λ path, the preset a machine
opens on, a run's headline and its honest ETA, and the lecture mode of the Compare tab."""
import pytest
import torch

from ui import explain_tab


# ---------------------------------------------------------------------------- How 2:4 works

def _paths(fig):
    """The four "prox output as λ grows" curves: weight i → its values over the slider's λ."""
    lines = [t for t in fig.data if t.type == "scatter" and t.mode == "lines"]
    assert len(lines) == 4
    return [list(t.y) for t in lines]


@pytest.mark.parametrize("value", [0.5, 0.3, 1.0, -0.7])
def test_the_lambda_path_of_four_equal_weights_does_not_zigzag(value):
    """The prox treats equal weights alike and the solver used to settle the tie differently from
    one λ to the next: w2 and w4 took turns at zero. Now a weight at zero stays at zero as λ grows,
    and among equals the first keeps the most."""
    fig, _ = explain_tab.prox_demo(value, value, value, value, 2.0)
    paths = _paths(fig)
    for w in paths:
        zero = [v == 0 for v in w]
        first = zero.index(True) if True in zero else len(w)
        assert all(zero[first:]), f"a weight left zero again as λ grew: {w}"
    for at in zip(*paths):
        mags = [abs(v) for v in at]
        assert mags == sorted(mags, reverse=True), at
    assert [w[-1] != 0 for w in paths] == [True, True, False, False]       # w1, w2 survive at the end


def test_the_text_never_speaks_of_red_bars_of_zero_height():
    _, text = explain_tab.prox_demo(0.5, 0.5, 0.5, 0.5, 3.0)              # w3, w4 are exactly 0
    assert "red bars" not in text and "w3, w4 are exactly zero already" in text and "**w1, w2**" in text
    fig, text = explain_tab.prox_demo(0.9, -0.7, 0.5, 0.3, 0.0)           # λ = 0: w3, w4 dropped by the mask
    assert "the red bars (w3, w4) are dropped by the mask" in text
    dropped = next(t for t in fig.data if "dropped" in (t.name or ""))
    assert [v for v in dropped.y if v is not None] == pytest.approx([0.5, 0.3])


def test_ties_are_settled_without_changing_the_prox_cost():
    from proxsparse_core.method.prox import objective, prox_groups

    z = torch.tensor([[0.5, -0.5, 0.5, 0.2]])
    for lam in (0.5, 1.7, 1.8, 3.0):
        ours, solver = explain_tab.prox_one(z, lam), prox_groups(z, lam, mode="reference")
        assert float(objective(ours, z, lam)) == pytest.approx(float(objective(solver, z, lam)), rel=1e-6)


# ---------------------------------------------------------------------------- the preset a machine opens on

def test_the_app_opens_on_quick_demo_without_a_gpu_and_bundled_quality_with_one(monkeypatch):
    import gradio as gr

    from proxsparse_core.config import CPU_PRESET, DEFAULT_PRESET, PRESETS, RunConfig, default_preset
    from ui.jobs import JobManager
    from ui.layout import build_app

    assert default_preset(gpu=False) == CPU_PRESET == "quick-demo"
    on_gpu = default_preset(gpu=True)                # bundled-quality, or a GPU demo whose model is here
    assert on_gpu in PRESETS and on_gpu != CPU_PRESET and DEFAULT_PRESET == "bundled-quality"

    def opened_on():
        demo = build_app(JobManager())
        box = next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.elem_id == "ps-preset")
        steps = next(b for b in demo.blocks.values() if isinstance(b, gr.Number) and b.label == "Steps")
        return box.value, steps.value

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert opened_on() == ("quick-demo", 45)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert opened_on() == (on_gpu, RunConfig().with_preset(on_gpu).steps)


def test_preset_labels_are_short_enough_to_show_whole():
    from ui import learn_tab

    labels = [label for label, _ in learn_tab.preset_choices()]
    assert max(len(t) for t in labels) <= 36, labels          # "quick-demo — SmolLM2-135M · CPU, of…" was cut
    assert any(t.startswith("quick-demo") and "CPU, offline" in t for t in labels)
    assert any(t.startswith("llama-2-7b") and "GPU + download" in t for t in labels)


# ---------------------------------------------------------------------------- the Learn tab's card

def _event(step, total, eta):
    return dict(step=step, total_steps=total, lm_loss=3.0, l2_term=0.0, loss=3.0, lr=1e-4, share_24=0.2,
                nnz_hist=[0, 0, 2, 4, 4], layer_share=None, t_fwd_bwd=1.0, t_opt=0.1, t_prox=0.1, t_step=1.2,
                tokens_per_s=100.0, mem_bytes=2**30, elapsed=12.0, eta=eta)


def _job(**cfg):
    from proxsparse_core.config import RunConfig
    from ui.jobs import LearnJob

    job = LearnJob(1, cfg=RunConfig(**{"device": "cpu", **cfg}), evaluate=True)
    job.status = "running"
    return job


def test_the_eta_covers_the_held_out_perplexity_after_the_steps():
    """Issue 28 (7): the ETA said the steps only, not the ~100 s of evaluation after them. The
    evaluation is estimated from the run's own pace, for any model: a forward pass per token at a
    third of a step's forward + backward (progress.scoring_seconds), times the windows × tokens."""
    from ui.learn_tab import progress_html

    def paced(**cfg):      # 1.5 s per step of 1 × 128 tokens: 20 windows × 256 tokens take 20 s per model
        job = _job(eval_windows=20, eval_ctx=256, batch=1, ctx=128, **cfg)
        job.events.append({**_event(1, 45, eta=200.0), "t_fwd_bwd": 9.0})     # the first step: left out
        job.events.append({**_event(5, 45, eta=100.0), "t_fwd_bwd": 1.5})
        return job

    job = paced()
    text = progress_html(job)
    assert "ETA 2:20: steps 1:40 + held-out perplexity ≈ 0:40" in text        # dense and 2:4 still to measure
    dense = job.phases[2]
    dense.start()
    dense.end()                                             # the dense score was read from the memo
    assert "ETA 2:00: steps 1:40 + held-out perplexity ≈ 0:20" in progress_html(job)
    again = paced()                                         # the app measured the dense model before
    again.state["dense_measured"] = True
    assert "ETA 2:00: steps 1:40 + held-out perplexity ≈ 0:20" in progress_html(again)
    other = paced(model="some/model")                       # any model: the same pace, the same estimate
    assert "ETA 2:20: steps 1:40 + held-out perplexity ≈ 0:40" in progress_html(other)
    slower = paced()
    slower.events.append({**_event(6, 45, eta=100.0), "t_fwd_bwd": 3.0})       # median 2.25 s: 30 s per model
    assert "steps 1:40 + held-out perplexity ≈ 1:00" in progress_html(slower)
    unknown = _job(eval_windows=0)                          # all windows: their number is known when scored
    unknown.events.append(_event(5, 45, eta=100.0))
    assert "ETA 1:40 for the steps, then held-out perplexity" in progress_html(unknown)


def test_a_run_far_longer_than_a_lecture_says_so_and_steps_have_bounds():
    """Issue 28 (8): 1,000,000 steps were accepted silently (ETA 469 h). The number is refused by
    the bound RunConfig declares; an ETA of hours within the bounds is said plainly."""
    from proxsparse_core.config import RunConfig
    from proxsparse_core.errors import UserError
    from ui import learn_tab

    values = {n: getattr(RunConfig(), n) for n in learn_tab.FORM}
    lo, hi, _ = RunConfig.bounds("steps")
    with pytest.raises(UserError, match=f"Steps must be between {lo} and {hi}, got 1000000"):
        learn_tab.config_from_form({**values, "steps": 1_000_000})
    job = _job(steps=hi)
    job.events.append(_event(5, hi, eta=469 * 3600.0))
    text = learn_tab.progress_html(job)
    assert 'class="ps-warn"' in text and "469:" in text and "longer than a class period" in text
    job.events.append(_event(6, hi, eta=600.0))
    assert "ps-warn" not in learn_tab.progress_html(job)


def _plain(html: str) -> str:
    import re

    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def test_the_finished_card_shows_the_headline_first_and_explains_the_extraction():
    """Issue 28 (5, 6): the card showed timings; the result — dense vs ProxSparse held-out
    perplexity and their ratio — was ~1,000 px down. The numbers come from the run."""
    from types import SimpleNamespace

    from ui.learn_tab import progress_html

    job = _job(score="activation")
    job.events.append(_event(45, 45, eta=0.0))
    job.perplexity = {"dense": 16.981, "proxsparse": 41.392}
    job.result = SimpleNamespace(steps_done=45, learned_share_24=0.318)
    job.status, job.message = "finished", "finished 45 steps"
    text = _plain(progress_html(job))
    assert text.startswith("held-out perplexity dense 16.98 · ProxSparse 41.39 (×2.44)"), text
    assert text.index("41.39") < text.index("steps/s")                          # before the timings
    assert ("31.8% of groups were 2:4 by the last step; the other 68.2% were forced to 2:4 at extraction "
            "(each keeps its two largest |w|·‖x‖)") in text
    job.perplexity = {"dense": 20.5, "proxsparse#2": 30.75}                     # another run's numbers
    assert _plain(progress_html(job)).startswith("held-out perplexity dense 20.50 · ProxSparse 30.75 (×1.50)")


# ---------------------------------------------------------------------------- the charts

def test_the_loss_chart_names_its_probe_and_shows_the_final_numbers():
    """Issue 28 (6): the dashed dense line (2 short windows) and the final perplexity (40 windows)
    disagreed without a word; the recovery chart reused the learn chart's title."""
    import math

    from proxsparse_core.runs import curves as plots

    events = [dict(_event(s, 3, 0.0), heldout_loss_dense=4.03, heldout_loss_24=4.5 - 0.1 * s) for s in (1, 2, 3)]
    fig = plots.loss_figure(events, probe=(2, 64), final=dict(dense=16.98, pruned=41.39, windows=40, tokens=256))
    by = {t.name: t for t in fig.data}
    assert "dense model, held-out probe (2 windows × 64 tokens)" in by
    assert "2:4 model if stopped now, same probe" in by
    dense = next(t for n, t in by.items() if n.startswith("final dense"))
    pruned = next(t for n, t in by.items() if n.startswith("final 2:4"))
    assert "40 windows × 256 tokens" in dense.name and "×2.44" in pruned.name
    assert list(dense.x) == [3] and dense.y[0] == pytest.approx(math.log(16.98))
    assert pruned.y[0] == pytest.approx(math.log(41.39))
    assert plots.loss_figure(events).layout.title.text == plots.LOSS_TITLE


def test_the_recovery_chart_has_its_own_title():
    from ui import compare_tab
    from ui.jobs import Job, JobManager

    job = Job(1, kind="recover")
    job.status = "running"
    view = compare_tab.recovery_view(JobManager(), job)
    title = view.rec_loss.layout.title.text
    assert title.startswith("Recovery") and "fine-tuning" in title


def test_the_probe_size_the_chart_names_is_the_learners(tiny_lm):
    from proxsparse_core.config import RunConfig
    from proxsparse_core.method.learner import ProxSparseLearner
    from ui.learn_tab import probe_size

    for ctx, eval_ctx, windows in ((128, 256, 40), (32, 256, 1), (16, 8, 5)):
        cfg = RunConfig(ctx=ctx, eval_ctx=eval_ctx)
        held = torch.zeros(windows, eval_ctx, dtype=torch.long)
        learner = ProxSparseLearner(tiny_lm, cfg, torch.zeros(4, ctx, dtype=torch.long), held_out=held)
        assert tuple(learner.held_out.shape) == probe_size(cfg, windows), (ctx, eval_ctx, windows)


# ---------------------------------------------------------------------------- lecture mode

@pytest.fixture(scope="module")
def lecture_jobs(tmp_path_factory):
    """A JobManager with a finished tiny run (its held-out perplexities measured)."""
    import time

    from proxsparse_core.config import RunConfig
    from test_ui_tiny_model import save_tiny_model
    from ui.jobs import JobManager

    folder = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    jobs = JobManager()
    cfg = RunConfig(model=str(folder), device="cpu", dtype="float32", samples=8, ctx=32, eval_ctx=32,
                    eval_windows=4, steps=3, lambda1=0.5, lr=1e-2, layer_stats_every=1).validate()
    job = jobs.start_learning(cfg, evaluate=True)
    t0 = time.time()
    while job.active and time.time() - t0 < 120:
        time.sleep(0.05)
    assert job.status == "finished"
    return jobs


def _last(frames):
    frames = list(frames)
    assert frames
    return frames, frames[-1]


def test_lecture_mode_answers_in_three_columns_with_their_scores(lecture_jobs):
    """Issue 28 (lecture mode): dense, the 2:4 mask alone and the mask after recovery answer the
    same prompt; over each column its perplexity and top-1 agreement as the table holds them; the
    recovery column says when there is no recovered result and how to make one."""
    import re
    import time

    from proxsparse_core.recovery.recover import RecoveryConfig
    from proxsparse_core.results import DENSE, LEARNED, title
    from ui import compare_tab, lecture

    jobs = lecture_jobs
    ws = jobs.ws
    prompt = "What is the capital of France?"
    frames, view = _last(lecture.generate_three(jobs, None, prompt, 12, True))
    assert len(frames) > 3                                                   # streamed
    dense_text = _plain(view.lec_dense)
    assert dense_text and _plain(view.lec_mask) and "nothing to ask here" in view.lec_recovered
    head = _plain(view.lec_head_recovered)
    assert head.startswith("2:4 + recovery Not recovered yet: press Recover under Recover the surviving weights "
                           "below (standard length"), head
    assert f"perplexity {ws.ppl[DENSE]:.2f}" in _plain(view.lec_head_dense)        # from the table's values
    ratio = ws.ppl[LEARNED] / ws.ppl[DENSE]
    assert (f"perplexity {ws.ppl[LEARNED]:.2f} ({ratio:.2f}×) · same top-1 as dense "
            f"{100 * ws.agreement(LEARNED):.1f}%") in _plain(view.lec_head_mask)

    # the same dense answer as the Compare tab's pair (same generation code and settings)
    pair = list(compare_tab.generate_pair(jobs, LEARNED, prompt, False, 0.7, 0.9, 12, True))[-1]
    untagged = lambda html: re.sub(r"<[^>]+>", "", html)      # noqa: E731 - the Compare tab marks its own cut
    assert untagged(pair.dense) == untagged(view.lec_dense)

    # a recovered version of the mask answers in the third column; before its perplexity is known
    # its head says "not measured yet"
    job = compare_tab.start_recovery(jobs, LEARNED, RecoveryConfig(method="obs"))
    t0 = time.time()
    while job.active and time.time() - t0 < 120:
        time.sleep(0.05)
    assert job.status == "finished", job.message
    new = lecture.recovered_of(jobs, LEARNED)
    assert new is not None and new in ws.results
    ws.ppl.pop(new, None)
    ws.top1.pop(new, None)
    getattr(ws, "agreed", {}).pop(new, None)
    _, view = _last(lecture.generate_three(jobs, LEARNED, prompt, 12, True))
    assert _plain(view.lec_recovered) and "nothing to ask" not in view.lec_recovered
    head = _plain(view.lec_head_recovered)
    assert head.startswith(title(new)) and "perplexity not measured yet · top-1 agreement not measured yet" in head
    assert "Highlighted: where a 2:4 answer departs from the dense one" in view.lec_status


def test_lecture_mode_is_refused_while_a_job_holds_the_machine(lecture_jobs, monkeypatch):
    from ui import lecture
    from ui.jobs import Busy

    jobs = lecture_jobs
    with jobs.claim("a test job"):
        with pytest.raises(Busy, match="busy a test job"):
            list(lecture.generate_three(jobs, None, "Hello", 4, True))
    from proxsparse_core.errors import UserError
    with pytest.raises(UserError, match="type a question"):
        list(lecture.generate_three(jobs, None, "  ", 4, True))
    with pytest.raises(UserError, match="no result named"):
        list(lecture.generate_three(jobs, "nonsense", "Hello", 4, True))


def test_lecture_mode_sits_at_the_top_of_the_compare_tab():
    import gradio as gr

    from ui.jobs import JobManager
    from ui.layout import build_app

    demo = build_app(JobManager())
    ids = [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)]
    assert {"ps-lecture", "ps-lec-dense", "ps-lec-mask", "ps-lec-recovered", "ps-lec-head-recovered"} <= set(ids)
    compare = next(b for b in demo.blocks.values() if isinstance(b, gr.Tab) and b.elem_id == "ps-tab-compare")
    assert compare.children[0].elem_id == "ps-lecture"
    assert "/lecture" in {f"/{d.api_name}" for d in demo.fns.values() if d.api_name}
