"""proxsparse_core.runs.curves: the run figures the app streams and the export report saves."""
import pytest

from proxsparse_core.runs import curves as plots


def event(step, hist, l2=0.0, layer_share=None):
    total = sum(hist)
    return dict(step=step, total_steps=3, lm_loss=3.0 - 0.1 * step, l2_term=l2, loss=3.0 - 0.1 * step + l2,
                lr=1e-4, share_24=sum(hist[:3]) / total, nnz_hist=hist, layer_share=layer_share)


EVENTS = [event(1, [0, 0, 10, 50, 40]), event(2, [0, 5, 45, 30, 20]), event(3, [1, 9, 70, 15, 5], 0.2)]


def test_empty_runs_draw_a_waiting_figure_not_an_error():
    for fig in (plots.loss_figure([]), plots.sparsity_figure([]), plots.layer_heatmap([], None)):
        assert not fig.data and fig.layout.annotations


def test_loss_figure_plots_lm_loss_and_the_lambda2_term_only_when_on():
    fig = plots.loss_figure(EVENTS)
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].y) == [e["lm_loss"] for e in EVENTS]
    assert [t.name for t in fig.data] == ["training loss, per step", "training loss, smoothed", "λ2 term"]
    assert fig.data[0].opacity < 0.5 and fig.data[1].line.width > fig.data[0].line.width   # raw one faint
    assert [t.name for t in plots.loss_figure(EVENTS[:2]).data] == ["training loss, per step", "training loss, smoothed"]
    assert fig.layout.xaxis.title.text == "training step" and "loss" in fig.layout.yaxis.title.text
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tickformat == "d"                # whole steps


def test_smoothing_follows_the_level_without_a_start_at_zero():
    assert plots.smooth([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])
    out = plots.smooth([4.0] * 20 + [2.0] * 20)
    assert out[0] == pytest.approx(4.0) and 2.0 < out[25] < 4.0 and out[-1] == pytest.approx(2.0, abs=0.1)


def test_loss_figure_shows_held_out_if_stopped_now_against_dense_and_labels_a_distill_run():
    evs = [dict(e, heldout_loss_dense=3.0, heldout_loss_24=(None if e["step"] == 2 else 3.5 - 0.1 * e["step"]))
           for e in EVENTS]
    fig = plots.loss_figure(evs)
    by = {t.name: t for t in fig.data}
    assert list(by["2:4 model if stopped now, held-out"].x) == [1, 3]
    assert list(by["2:4 model if stopped now, held-out"].y) == pytest.approx([3.4, 3.2])
    assert list(by["dense model, held-out"].y) == [3.0, 3.0] and list(by["dense model, held-out"].x) == [1, 3]
    kl = plots.loss_figure([dict(e, objective="distill") for e in evs])
    names = [t.name for t in kl.data]
    assert names[:2] == ["KL to dense (training), per step", "KL to dense (training), smoothed"]
    assert kl.data[0].yaxis == "y2" and "KL divergence" in kl.layout.yaxis2.title.text


def test_sparsity_figure_stacks_to_100_percent_and_its_green_top_is_the_2to4_share():
    fig = plots.sparsity_figure(EVENTS)
    stacked = [t for t in fig.data if t.stackgroup]
    for i, e in enumerate(EVENTS):
        assert sum(t.y[i] for t in stacked) == pytest.approx(100)
        greens = sum(t.y[i] for t in stacked if t.name in plots.NNZ_LABELS[:3])
        assert greens == pytest.approx(100 * e["share_24"])
    assert list(fig.data[-1].y) == pytest.approx([100 * e["share_24"] for e in EVENTS])


def test_layer_heatmap_is_projection_by_block():
    names = [f"model.layers.{i}.{p}" for i in range(3) for p in
             ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    share = [i / len(names) for i in range(len(names))]
    hm = plots.layer_heatmap(names, share).data[0]
    assert list(hm.y) == ["q_proj", "o_proj", "up_proj", "down_proj"] and list(hm.x) == ["0", "1", "2"]
    assert hm.z[3][2] == pytest.approx(100 * share[-1]) and hm.text[0][1] == "model.layers.1.self_attn.q_proj"
    # names without a block index fall back to one row in model order
    odd = plots.layer_heatmap(["a", "b"], [0.25, 0.5]).data[0]
    assert list(odd.z[0]) == [25.0, 50.0]


def test_layer_heatmap_shows_the_experts_of_a_block_as_one_cell_per_projection():
    names = [f"model.layers.{b}.self_attn.q_proj" for b in range(2)] + [
        f"model.layers.{b}.mlp.experts.{p}.{e}" for b in range(2) for p in ("gate_up", "down") for e in range(4)]
    share = [0.5, 0.6] + [i / 20 for i in range(16)]
    hm = plots.layer_heatmap(names, share).data[0]
    assert list(hm.y) == ["q_proj", "gate_up (experts)", "down (experts)"] and list(hm.x) == ["0", "1"]
    assert hm.z[1][0] == pytest.approx(100 * sum(share[2:6]) / 4)       # block 0's four gate_up experts
    assert hm.z[2][1] == pytest.approx(100 * sum(share[14:18]) / 4)
    assert hm.text[2][1] == "model.layers.1.mlp.experts.down.* (mean of 4 experts)"
