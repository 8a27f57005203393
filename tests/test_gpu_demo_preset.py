"""The GPU demo preset (issue 29): its model is the local folder when bench/demo_model.py made it,
else its hub id; the app opens on it only with a GPU and the folder on disk; the Learn tab says
'GPU' for it wherever it is shown."""
from __future__ import annotations

import pytest

from proxsparse_core import config
from proxsparse_core.config import GPU_DEMO, GPU_DEMO_FOLDER, GPU_DEMO_HUB_ID, PRESETS, RunConfig


def test_gpu_demo_model_is_the_local_folder_when_present(tmp_path, monkeypatch):
    monkeypatch.setenv("PROXSPARSE_CACHE", str(tmp_path))
    assert config.gpu_demo_model() == GPU_DEMO_HUB_ID
    (tmp_path / GPU_DEMO_FOLDER).mkdir()
    assert config.gpu_demo_model() == GPU_DEMO_HUB_ID          # a folder without config.json is no model
    (tmp_path / GPU_DEMO_FOLDER / "config.json").write_text("{}")
    assert config.gpu_demo_model() == str(tmp_path / GPU_DEMO_FOLDER)


@pytest.mark.parametrize("local", [True, False])
def test_default_preset_by_device_and_model_on_disk(tmp_path, monkeypatch, local):
    model = str(tmp_path) if local else GPU_DEMO_HUB_ID
    monkeypatch.setitem(PRESETS[GPU_DEMO]["settings"], "model", model)
    assert config.default_preset(gpu=False) == config.CPU_PRESET
    assert config.default_preset(gpu=True) == (GPU_DEMO if local else config.DEFAULT_PRESET)


def test_gpu_demo_settings_are_valid_and_marked_gpu():
    preset = PRESETS[GPU_DEMO]
    assert preset["gpu"] and not PRESETS["quick-demo"]["gpu"] and not PRESETS["scale-free"]["gpu"]
    cfg = RunConfig(**preset["settings"])
    assert cfg.data == "mix" and cfg.lambda_scale == "layer"


def test_learn_tab_labels_say_gpu(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from ui import learn_tab
    monkeypatch.setitem(PRESETS[GPU_DEMO]["settings"], "model", str(tmp_path))
    assert learn_tab.preset_label(GPU_DEMO) == f"{GPU_DEMO} — GPU"
    assert "Needs a GPU" in learn_tab.preset_note(GPU_DEMO) and "download" not in learn_tab.preset_note(GPU_DEMO)
    monkeypatch.setitem(PRESETS[GPU_DEMO]["settings"], "model", GPU_DEMO_HUB_ID)
    assert learn_tab.preset_label(GPU_DEMO) == f"{GPU_DEMO} — GPU + download"
    assert "Needs a GPU and a download" in learn_tab.preset_note(GPU_DEMO)
