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
