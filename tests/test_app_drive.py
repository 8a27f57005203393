"""bench/app_drive.py (the studio driven tab by tab through its HTTP API) on a tiny random model, CPU,
--smoke: so the script that times the app on a GPU cannot rot where CI has no GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

from test_ui_tiny_model import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PHASES = ["app start", "load model", "learn: live events", "re-attach", "stop", "learn", "perplexity table",
          "generate", "recover", "answers", "speed-up", "export", "reload export"]


def test_app_drive_smoke_every_phase_succeeds_and_the_export_reloads_as_2to4(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "drive.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.run([sys.executable, "bench/app_drive.py", "--model", str(model), "--device", "cpu", "--smoke",
                           "--out", str(out), "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    phases = {p["phase"]: p for p in summary["phases"]}
    assert list(phases) == PHASES
    assert all(p["ok"] and p["seconds"] >= 0 for p in phases.values()), summary["phases"]
    assert summary["ok"] and "partial" not in summary
    assert summary["torch"] and summary["transformers"] and summary["device_name"]

    # live events, re-attach and Stop really happened
    assert phases["learn: live events"]["live"]["status"] == "running"
    assert all(phases["learn: live events"]["live"]["charts"])
    assert phases["re-attach"]["attached_at_step"] > phases["re-attach"]["first_seen_step"]
    assert 0 < phases["stop"]["stopped_at_step"] < 100_000
    assert phases["learn"]["steps"] == phases["learn"]["of"] == 6

    # every baseline has a row, the stopped run's mask kept its own beside the finished run's, and the
    # recovered result (of the finished run's mask) joined the table
    table = summary["perplexity_table"]
    assert len(table) == 8 and all(row["ppl"] > 1 for row in table.values())
    assert "ProxSparse (learned 2:4)" in table and "ProxSparse (learned 2:4) · run 2" in table
    assert "ProxSparse · run 2 + recovery (weights updated)" in table
    assert phases["recover"]["verified"] == "✓"
    assert phases["speed-up"]["measured"] is False and "CUDA" in phases["speed-up"]["note"]

    # the exported folder reloads with plain transformers and every decoder linear layer is 2:4
    assert phases["export"]["result"] == "proxsparse#2+recovery" and phases["export"]["zip"]
    answers = summary["answers"]
    assert len(answers) == 4 and all(a["dense"] and a["proxsparse#2"] and a["proxsparse#2+recovery"] for a in answers)
    reload = phases["reload export"]
    assert reload["layers_2to4"] == 14 and reload["zero_weights"] > 0
    assert (Path(phases["export"]["folder"]) / "config.json").is_file()


def test_app_drive_smoke_on_the_bundled_model(tmp_path):
    """The same driver on the real bundled model (SmolLM2-135M) on the CPU, a few steps (--smoke): every
    phase succeeds, every baseline gets a row, and the recovered export reloads with its 210 layers 2:4."""
    out = tmp_path / "drive.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.run([sys.executable, "bench/app_drive.py", "--device", "cpu", "--smoke", "--out", str(out),
                           "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert [p["phase"] for p in summary["phases"]] == PHASES and summary["ok"]
    assert "SmolLM2-135M" in summary["model"] and summary["settings"]["model"].startswith("bundled")
    assert len(summary["perplexity_table"]) == 8
    reload = {p["phase"]: p for p in summary["phases"]}["reload export"]
    assert reload["layers_2to4"] == 210 and reload["zero_weights"] > 0
