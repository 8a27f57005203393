"""One source for every bound: each numeric widget of the app shows exactly the limits its setting
declares (RunConfig, RecoveryConfig, GenerationSettings), which the checks and the CLI read too."""
import gradio as gr
import pytest

from proxsparse_core.config import RunConfig
from proxsparse_core.inference.evaluate import GenerationSettings
from proxsparse_core.recovery.recover import RecoveryConfig
from ui import learn_tab
from ui.jobs import JobManager
from ui.layout import build_app

RECOVERY = {"ps-recover-steps": "steps", "ps-recover-samples": "samples", "ps-recover-batch": "batch",
            "ps-recover-text": "text", "ps-recover-lr": "lr"}
GENERATION = {"Temperature": "temperature", "Top-p": "top_p", "Max new tokens": "max_new_tokens"}


@pytest.fixture(scope="module")
def widgets():
    demo = build_app(JobManager())
    return [b for b in demo.blocks.values() if isinstance(b, (gr.Number, gr.Slider))]


def _limits(w):
    return (w.minimum, w.maximum)


def test_every_numeric_setting_widget_shows_its_fields_bounds(widgets):
    by_label = {learn_tab.LABELS.get(n, n): n for n in learn_tab.FORM}
    checked = set()
    for w in widgets:
        if w.elem_id in RECOVERY:
            name = RECOVERY[w.elem_id]
            assert _limits(w) == RecoveryConfig.bounds(name)[:2], (w.elem_id, _limits(w))
        elif w.label in GENERATION:
            name = GENERATION[w.label]
            assert _limits(w) == GenerationSettings.LIMITS[name], (w.label, _limits(w))
        elif w.label in by_label and isinstance(getattr(RunConfig, by_label[w.label]), (int, float)):
            name = by_label[w.label]
            assert _limits(w) == RunConfig.bounds(name)[:2], (name, _limits(w))
        else:
            continue
        checked.add(name)
    numeric = {n for n in learn_tab.FORM if isinstance(getattr(RunConfig, n), (int, float))
               and not isinstance(getattr(RunConfig, n), bool)}
    assert numeric <= checked, numeric - checked
    assert set(RECOVERY.values()) | set(GENERATION.values()) <= checked


def test_the_checks_use_the_same_bounds():
    lo, hi, _ = RunConfig.bounds("steps")
    RunConfig(steps=hi).validate()
    with pytest.raises(Exception, match=f"steps must be between {lo} and {hi}"):
        RunConfig(steps=hi + 1).validate()
    lo, hi, _ = RecoveryConfig.bounds("batch")
    RecoveryConfig(batch=hi).validate()
    with pytest.raises(Exception, match=f"from {lo} to {hi}"):
        RecoveryConfig(batch=hi + 1).validate()
    lo, hi = GenerationSettings.LIMITS["max_new_tokens"]
    with pytest.raises(Exception, match=f"from {lo} to {hi}"):
        GenerationSettings(max_new_tokens=hi + 1).validate()
