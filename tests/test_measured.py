"""Measured figures live in one file (bench/measured.json); presets and labels only cite it."""
import json
import re

from proxsparse_core import measured
from proxsparse_core.config import PRESETS, preset_note
from proxsparse_core.recovery.recover import RECOVERY_LENGTHS

TIME_OR_SCORE = re.compile(r"\d+(\.\d+)?\s*(s|sec|min|h|%)\b|ppl \d|measured: \d")


def test_no_measured_number_is_written_in_a_preset_note():
    for name, preset in PRESETS.items():
        assert not TIME_OR_SCORE.search(preset["note"]), (name, preset["note"])


def test_every_recorded_figure_names_a_preset_or_recovery_length(tmp_path):
    data = json.loads(measured.FILE.read_text())
    for key, fig in data["figures"].items():
        kind, name, where = key.split(":")
        assert where in ("cpu", "gpu") or (kind == "learn" and where == "cpu-float32"), key
        if kind == "eval":                  # the held-out perplexity of one model, with the size it read
            assert name == "bundled" and fig["windows"] > 0 and fig["tokens"] > 0, key
        else:
            assert name in (PRESETS if kind == "learn" else RECOVERY_LENGTHS), key
        for field in ("seconds", "date", "machine", "command"):
            assert field in fig, (key, field)


def test_a_note_shows_the_recorded_time_and_nothing_when_there_is_none(tmp_path, monkeypatch):
    f = tmp_path / "measured.json"
    f.write_text(json.dumps({"figures": {"learn:quick-demo:cpu": {"seconds": 95, "date": "2030-01-02",
                                                                  "machine": "a laptop", "command": "x"}}}))
    monkeypatch.setattr(measured, "FILE", f)
    measured.figures.cache_clear()
    try:
        assert preset_note("quick-demo", native_bf16=True).endswith(
            "Time: measured 95 s on a laptop, 2030-01-02 (bench/RESULTS.md)")
        assert preset_note("quick-demo", native_bf16=False).endswith("measured 95 s on a laptop, 2030-01-02 "
                                                                     "(bench/RESULTS.md)")  # no float32 figure
        assert preset_note("quick-demo", gpu=True) == PRESETS["quick-demo"]["note"]
        f.write_text("[not json")
        measured.figures.cache_clear()
        assert measured.describe("learn:quick-demo:cpu") == ""
    finally:
        measured.figures.cache_clear()


def test_a_cpu_without_native_bf16_is_shown_the_time_measured_on_such_a_cpu(tmp_path, monkeypatch):
    f = tmp_path / "measured.json"
    f.write_text(json.dumps({"figures": {
        "learn:quick-demo:cpu": {"seconds": 50, "date": "2030-01-02", "machine": "a bf16 laptop", "command": "x"},
        "learn:quick-demo:cpu-float32": {"seconds": 125, "date": "2030-01-03", "machine": "an AVX2 laptop",
                                         "command": "x"}}}))
    monkeypatch.setattr(measured, "FILE", f)
    measured.figures.cache_clear()
    try:
        assert preset_note("quick-demo", native_bf16=True).endswith("measured 50 s on a bf16 laptop, 2030-01-02 "
                                                                    "(bench/RESULTS.md)")
        assert preset_note("quick-demo", native_bf16=False).endswith("measured 2.1 min on an AVX2 laptop, "
                                                                     "2030-01-03 (bench/RESULTS.md)")
        assert "bf16 laptop" not in preset_note("quick-demo", native_bf16=False)
    finally:
        measured.figures.cache_clear()


def test_a_recovery_figure_names_the_part_a_first_use_spends_writing_text(tmp_path, monkeypatch):
    f = tmp_path / "measured.json"
    f.write_text(json.dumps({"figures": {"recover:standard:cpu": {
        "seconds": 3000, "date": "2030-01-02", "machine": "2 CPU cores, shared (load average 4.1–7.9)",
        "command": "x", "note_seconds": 900, "note": "the model writing its chat turns, the first time only"}}}))
    monkeypatch.setattr(measured, "FILE", f)
    measured.figures.cache_clear()
    try:
        assert measured.describe("recover:standard:cpu") == (
            "measured 50.0 min on 2 CPU cores, shared (load average 4.1–7.9), 2030-01-02; 15.0 min of it the "
            "model writing its chat turns, the first time only")
    finally:
        measured.figures.cache_clear()


def test_record_writes_one_figure_and_keeps_the_others(tmp_path, monkeypatch):
    """measured.record (the bench scripts' --record): the new figure is read back, with a date, and
    every other figure and the file's one-figure-per-line format stay."""
    import json
    from proxsparse_core import measured
    f = tmp_path / "measured.json"
    f.write_text('{\n  "about": "x",\n  "figures": {\n    "a": {"seconds": 1}\n  }\n}\n')
    monkeypatch.setattr(measured, "FILE", f)
    measured.figures.cache_clear()
    measured.record("b", {"seconds": 2.5, "machine": "2 CPU cores"})
    data = json.loads(f.read_text())
    assert data["figures"]["a"] == {"seconds": 1} and data["figures"]["b"]["seconds"] == 2.5
    assert len(data["figures"]["b"]["date"]) == 10 and measured.seconds("b") == 2.5
    assert f.read_text().count("\n") == 7                   # one line per figure
    measured.figures.cache_clear()
