"""Saved runs (issue 28, "Saved runs in the app"; item 4): every result is saved as a run folder in
the CLI's format, listed and opened again — the app's own folders, the CLI's, export folders and
zips of them — and a workspace keeps several results side by side, none replacing another.
Core only (no Gradio): runs/library.py, reopen.open_saved, Workspace naming. A tiny model folder."""
import errno
import json
import os
import stat
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from proxsparse_core import cli
from proxsparse_core.config import RunConfig
from proxsparse_core.errors import UserError
from proxsparse_core.recovery.recover import RecoveryConfig
from proxsparse_core.reopen import open_saved, restore_scores
from proxsparse_core.results import DENSE, LEARNED, method_of, title
from proxsparse_core.runs import library
from proxsparse_core.runs.export import bundle, export_result
from proxsparse_core.runs.library import extract_zip, list_runs, read_saved, save_run
from proxsparse_core.workspace import Workspace
from test_ui_tiny_model import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def tiny_cfg(tiny_dir, **kw):
    base = dict(model=str(tiny_dir), device="cpu", dtype="float32", samples=8, ctx=32, eval_ctx=32,
                eval_windows=4, steps=3, lambda1=0.5, lr=1e-2, layer_stats_every=1)
    return RunConfig(**{**base, **kw}).validate()


@pytest.fixture(scope="module")
def learned(tiny_dir):
    """A workspace with a learned mask, measured."""
    ws = Workspace()
    res = ws.learn(tiny_cfg(tiny_dir))
    ws.perplexity(DENSE)
    ws.perplexity(res.name)
    return ws, res


def same_masks(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def reopened(path) -> tuple[Workspace, str, object]:
    opened = read_saved(path)
    ws = Workspace()
    ws.load(opened.folder.cfg)
    name, _ = open_saved(ws, opened)
    return ws, name, opened


# ---------------------------------------------------------------------------- saving, listing, opening

def test_a_saved_run_is_the_clis_format_and_opens_with_its_mask_curve_and_rows(learned, tmp_path):
    ws, res = learned
    path = save_run(tmp_path, ws, res.name, events=res.events, metrics={"verified": True})
    assert path.parent == tmp_path and not path.name.startswith(".")
    assert sorted(p.name for p in path.iterdir()) == ["events.jsonl", "masks.npz", "metrics.json", "recipe.json"]
    recipe = json.loads((path / "recipe.json").read_text())
    assert recipe["method"] == LEARNED and recipe["command"].startswith("python -m proxsparse_core learn")
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["perplexity"] == {DENSE: ws.ppl[DENSE], LEARNED: ws.ppl[res.name]}
    assert metrics["steps"] == 3 and metrics["status"] == "finished" and metrics["verified"] is True

    [entry] = list_runs(tmp_path)
    assert (entry.path, entry.method, entry.steps, entry.perplexity, entry.dense) == (
        path, LEARNED, 3, ws.ppl[res.name], ws.ppl[DENSE])

    ws2, name, opened = reopened(path)
    assert name == f"{LEARNED}#{path.name}" and title(name).endswith(path.name)
    assert same_masks(ws2.results[name].masks, res.masks) and ws2.results[name].weights is None
    assert [e["step"] for e in opened.events] == [1, 2, 3]
    assert "restored" in restore_scores(ws2, opened, name)
    assert ws2.ppl[name] == ws.ppl[res.name] and ws2.ppl[DENSE] == ws.ppl[DENSE]
    # the CLI reads the app's folder as its own
    assert cli.main(["eval", "--masks", str(path), "--no-eval"]) == 0


def test_saving_never_replaces_a_folder_and_a_full_disk_is_one_line_leaving_nothing(learned, tmp_path, monkeypatch):
    ws, res = learned
    monkeypatch.setattr(library.time, "strftime", lambda fmt, *a: "20250101-000000")
    first = save_run(tmp_path, ws, res.name, events=res.events)
    before = (first / "masks.npz").read_bytes()
    taken = tmp_path / "20250101-000000-proxsparse-2"          # a folder someone else made, with the next name
    taken.mkdir()
    (taken / "note.txt").write_text("mine")
    second = save_run(tmp_path, ws, res.name)
    assert second not in (first, taken) and (first / "masks.npz").read_bytes() == before
    assert (taken / "note.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 3

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(library, "save_masks", full)
    with pytest.raises(UserError, match="disk is full") as err:
        save_run(tmp_path, ws, res.name)
    assert "\n" not in str(err.value) and len(list(tmp_path.iterdir())) == 3      # no half-written folder
    monkeypatch.undo()
    monkeypatch.setattr(library.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="the disk is full: saving"):
        save_run(tmp_path, ws, res.name)
    assert len(list(tmp_path.iterdir())) == 3


def test_a_recovered_result_round_trips_and_an_export_folder_opens_with_its_weights(learned, tmp_path):
    ws, res = learned
    rec = ws.recover(res.name, RecoveryConfig(method="obs"))
    assert rec.name == f"{res.name}+recovery" and ws.results[rec.name].info["base"] == res.name
    base_run = save_run(tmp_path / "runs", ws, res.name, events=res.events)
    path = save_run(tmp_path / "runs", ws, rec.name, base_run=base_run)
    assert (path / "weights.safetensors").is_file()
    recipe = json.loads((path / "recipe.json").read_text())
    assert recipe["method"] == "proxsparse+recovery" and recipe["base_method"] == LEARNED
    assert "recover --run" in recipe["command"] and str(base_run) in recipe["command"]
    ws2, name, _ = reopened(path)
    assert name == f"proxsparse+recovery#{path.name}"
    assert all(torch.equal(ws2.results[name].weights[n], ws.results[rec.name].weights[n]) for n in res.masks)

    out = export_result(ws, rec.name, tmp_path / "exports" / "recovered", evaluate=False).folder
    ws3, name3, opened = reopened(out)
    assert opened.kind == "export" and opened.weights_from == out and name3 == "proxsparse+recovery#recovered"
    assert all(torch.equal(ws3.results[name3].weights[n], ws.results[rec.name].weights[n]) for n in res.masks)
    assert ws3.verify(name3).ok
    # the zip the Export tab offers (masks, recipe, report) has no model files: one clear line
    with pytest.raises(UserError, match="not its recovered weights"):
        extract_zip(bundle(out, tmp_path / "a.zip"), tmp_path / "unzipped")
    assert list((tmp_path / "unzipped").iterdir()) == []


def test_a_run_folder_the_cli_wrote_opens_with_its_curve_and_perplexity_rows(tiny_dir, tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["learn", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--samples", "8",
                     "--ctx", "32", "--eval-ctx", "32", "--eval-windows", "4", "--steps", "4", "--lambda1", "0.5",
                     "--lr", "0.01", "--out", str(out)]) == 0
    ws, name, opened = reopened(out)
    assert name == "proxsparse#demo" and len(opened.events) == 4
    restore_scores(ws, opened, name)
    recorded = json.loads((out / "metrics.json").read_text())["perplexity"]
    assert ws.ppl[name] == recorded[LEARNED] and ws.ppl[DENSE] == recorded[DENSE]
    again, _ = open_saved(ws, opened)                # opened twice: a second result, never a replacement
    assert again == "proxsparse#demo#2" and set(ws.results) == {name, again}


def test_a_run_from_a_gpu_machine_opens_on_this_one(tiny_dir, learned, tmp_path):
    ws, res = learned
    path = save_run(tmp_path, ws, res.name)
    recipe = json.loads((path / "recipe.json").read_text())
    recipe["config"].update(device="cuda:3" if not torch.cuda.is_available() else "cuda:999", dtype="bfloat16",
                            data=str(tmp_path / "gone.txt"))
    (path / "recipe.json").write_text(json.dumps(recipe))
    opened = read_saved(path)
    assert opened.folder.cfg.device == "auto" and opened.folder.cfg.data == "builtin"
    assert len(opened.notes) == 2 and "lacks" in opened.notes[0] and "not on this machine" in opened.notes[1]


def test_a_folder_that_is_neither_is_one_line(tmp_path):
    with pytest.raises(UserError, match="neither a run folder"):
        read_saved(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        read_saved(tmp_path / "missing")


# ---------------------------------------------------------------------------- zips

def zip_of(path: Path, members: dict, links: tuple = ()) -> Path:
    """A zip with `members` (name → bytes) and symbolic links `links` (name → target)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name, target in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return path


@pytest.fixture(scope="module")
def run_files(learned, tmp_path_factory):
    ws, res = learned
    path = save_run(tmp_path_factory.mktemp("runs"), ws, res.name, events=res.events)
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_a_zipped_run_and_an_export_zip_open(run_files, learned, tmp_path):
    ws, res = learned
    root = tmp_path / "runs"
    good = zip_of(tmp_path / "demo.zip", {f"demo/{k}": v for k, v in run_files.items()}
                  | {"__MACOSX/demo/._recipe.json": b"mac", "demo/.DS_Store": b"x"})
    folder = extract_zip(good, root)
    assert folder.parent == root and folder.name.endswith("unzipped-demo")
    assert sorted(p.name for p in folder.iterdir()) == sorted(run_files)
    ws2, name, _ = reopened(folder)
    assert same_masks(ws2.results[name].masks, res.masks)

    out = export_result(ws, res.name, tmp_path / "exports" / "learned", evaluate=False).folder
    unzipped = extract_zip(bundle(out, tmp_path / "learned-artefacts.zip"), root)
    assert unzipped.name.endswith("unzipped-learned") and "report.html" not in os.listdir(unzipped)
    ws3, name3, opened = reopened(unzipped)
    assert opened.kind == "run" and same_masks(ws3.results[name3].masks, res.masks)


@pytest.mark.parametrize("case", ["traversal", "absolute", "symlink", "junk", "two runs", "oversized", "total",
                                  "many", "no masks", "not a zip", "broken masks"])
def test_a_hostile_zip_is_refused_in_one_line_and_leaves_nothing(case, run_files, tmp_path):
    root = tmp_path / "runs"
    files = {f"demo/{k}": v for k, v in run_files.items()}
    kw, links = {}, ()
    if case == "traversal":
        files["demo/../../evil/recipe.json"] = files.pop("demo/recipe.json")
    elif case == "absolute":
        files["/tmp/evil.json"] = b"{}"
    elif case == "symlink":
        links = (("demo/events.jsonl", "/etc/passwd"),)
        files.pop("demo/events.jsonl")
    elif case == "junk":
        files["demo/evil.py"] = b"import os"
    elif case == "two runs":
        files.update({f"other/{k}": v for k, v in run_files.items()})
    elif case == "oversized":
        files["demo/recipe.json"] = b"{" + b" " * (2**20 + 10) + b"}"       # a recipe over its 1 MiB cap
    elif case == "total":
        kw = {"max_total": 1000}
    elif case == "many":
        files.update({f"demo/d{i}/": b"" for i in range(70)})
    elif case == "no masks":
        files.pop("demo/masks.npz")
    elif case == "broken masks":
        files["demo/masks.npz"] = b"not a zip"
    path = tmp_path / "hostile.zip"
    if case == "not a zip":
        path.write_bytes(b"PK\x03\x04 this is not a zip")
    else:
        zip_of(path, files, links)
    with pytest.raises(UserError) as err:
        extract_zip(path, root, **kw)
    assert "\n" not in str(err.value)
    assert not root.exists() or list(root.iterdir()) == []          # nothing unpacked, no temporary folder
    assert not (tmp_path / "evil").exists()


# ---------------------------------------------------------------------------- several results

def test_a_workspace_keeps_two_runs_and_a_stopped_third_and_two_recoveries_side_by_side(tiny_dir):
    ws = Workspace()
    cfg = tiny_cfg(tiny_dir)
    first = ws.learn(cfg)
    masks = {n: m.clone() for n, m in first.masks.items()}
    second = ws.learn(tiny_cfg(tiny_dir, seed=1, steps=5))
    stop = threading.Event()
    third = ws.learn(tiny_cfg(tiny_dir, steps=1000), on_event=lambda ev: stop.set(), stop=stop)
    assert (first.name, second.name, third.name) == ("proxsparse", "proxsparse#2", "proxsparse#3")
    assert third.status == "stopped" and list(ws.results) == ["proxsparse", "proxsparse#2", "proxsparse#3"]
    assert same_masks(ws.results["proxsparse"].masks, masks)                  # the first is untouched
    assert [ws.results[n].info["steps"] for n in ws.results] == [3, 5, third.steps_done]
    assert len({title(n) for n in ws.results}) == 3

    a = ws.recover("proxsparse", RecoveryConfig(method="obs"))
    fourth = ws.learn(cfg)                           # a new run after a recovery
    b = ws.recover("proxsparse", RecoveryConfig(method="obs"))
    assert (a.name, fourth.name, b.name) == ("proxsparse+recovery", "proxsparse#4", "proxsparse+recovery#2")
    assert ws.results["proxsparse+recovery"].info["base"] == "proxsparse"       # it names what it recovered
    assert same_masks(ws.results["proxsparse+recovery"].masks, masks)
    assert title("proxsparse#2+recovery") == "ProxSparse · run 2 + recovery (weights updated)"
    assert method_of("proxsparse#2+recovery#2") == "proxsparse+recovery"
