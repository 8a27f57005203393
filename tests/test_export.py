"""Export: the Hugging Face folder round-trips, the mask file re-creates it bit for bit, and the
writes are atomic, sanitised and never overwrite silently."""
import errno
import json
import re
import shutil
import threading
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from proxsparse_core.errors import Stopped
import torch

from proxsparse_core.runs import export as ex
from proxsparse_core.runs.files import load_masks, load_recipe
from proxsparse_core.config import RunConfig
from proxsparse_core.errors import UserError
from proxsparse_core.inference.evaluate import perplexity
from proxsparse_core.sparsity.prunable import find_prunable
from proxsparse_core.results import DENSE
from proxsparse_core.workspace import Workspace
from test_app_e2e import app  # noqa: F401 - the launched-app fixture (python app.py on a tiny model)


def word_tokenizer(vocab_size: int = 256):
    """A real (saveable, AutoTokenizer-loadable) word-level tokenizer built offline from the
    built-in text, small enough for a tiny model."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = " ".join(topics[k] for k in sorted(topics))
    special = ["[PAD]", "[EOS]", "[UNK]"]
    words = [w for w, _ in Counter(re.findall(r"\w+|[^\w\s]", text)).most_common(vocab_size - len(special))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def save_tiny_model(folder: Path, hidden: int = 64, heads: int = 4, kv_heads: int = 2, inter: int = 128,
                    max_pos: int = 512) -> Path:
    """A tiny random Llama with a real tokenizer, saved as a normal model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=256,
                      max_position_embeddings=max_pos, tie_word_embeddings=False,
                      head_dim=hidden // heads)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def tiny_cfg(folder, **kw) -> RunConfig:
    base = dict(model=str(folder), device="cpu", dtype="float32", samples=8, ctx=32, eval_ctx=32,
                eval_windows=4, steps=3, lambda1=0.5, lr=1e-3, layer_stats_every=1)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def learned(tiny_folder):
    """A workspace with a 3-step ProxSparse result and its events."""
    cfg = tiny_cfg(tiny_folder)
    ws = Workspace()
    events = []
    res = ws.learn(cfg, events.append)
    assert res.status == "finished"
    return ws, cfg, events


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_export_round_trips_with_transformers(learned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws, cfg, events = learned
    res = ex.export_result(ws, "proxsparse", tmp_path / "exports" / "run1", events=events)
    folder = res.folder
    assert folder == tmp_path / "exports" / "run1" and folder.is_dir()
    for f in ("config.json", "README.md", "proxsparse/masks.npz", "proxsparse/recipe.json",
              "proxsparse/report.html", "proxsparse/loss.svg", "proxsparse/sparsity.svg",
              "proxsparse/metrics.json", "proxsparse/events.jsonl"):
        assert (folder / f).is_file(), f
    assert list(folder.glob("*.safetensors"))
    assert [p.name for p in folder.parent.iterdir()] == ["run1"]       # no temporary leftovers
    assert folder.stat().st_mode & 0o777 == 0o755                        # not the private temp mode
    assert (folder / "proxsparse/masks.npz").stat().st_mode & 0o777 == 0o644

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("the object").input_ids == ws.lm.tokenizer("the object").input_ids
    prunable = find_prunable(model)
    assert prunable.names == ws.lm.prunable.names
    masks = ws.results["proxsparse"].masks
    for n in prunable.names:
        w = prunable.modules[n].weight.detach()
        assert int(((w.reshape(-1, 4) != 0).sum(1) > 2).sum()) == 0, n
        assert torch.equal(w, ws.originals[n] * masks[n]), n
    # the same perplexity as the workspace measured, on the same windows with the same products
    with ws.scoring_products():
        assert perplexity(model, ws.data.held_out) == pytest.approx(ws.ppl["proxsparse"], rel=1e-5)
    assert ws.ppl["proxsparse"] != pytest.approx(ws.ppl[DENSE], rel=1e-3)
    # the workspace model is still dense afterwards
    for n in ws.lm.prunable.names:
        assert torch.equal(ws.lm.prunable.modules[n].weight.detach(), ws.originals[n])

    metrics = json.loads((folder / "proxsparse/metrics.json").read_text())
    assert metrics["verified"] and metrics["method"] == "proxsparse"
    assert metrics["perplexity"]["proxsparse"] == pytest.approx(ws.ppl["proxsparse"])
    assert metrics["environment"]["packages"]["torch"] == torch.__version__
    assert load_recipe(folder / "proxsparse").to_dict() == cfg.to_dict()
    recipe = json.loads((folder / "proxsparse/recipe.json").read_text())
    assert recipe["command"] == cfg.cli_command()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and cfg.cli_command() in card
    html = (folder / "proxsparse/report.html").read_text()
    assert "<svg" in html and "plotly" in html.lower() and "Held-out perplexity" in html
    svg = (folder / "proxsparse/loss.svg").read_text()
    assert svg.strip().endswith("</svg>") and "training loss, smoothed" in svg
    assert "2:4 if stopped now (held-out)" in svg and "dense (held-out)" in svg   # measured at the last step
    assert "<pre>" not in html and "recipe" in html.lower() and "<td class=\"k\">lambda1</td>" in html  # tables, not JSON
    from proxsparse_core.runs.curves import NNZ_COLOURS
    assert NNZ_COLOURS[3] in (folder / "proxsparse/sparsity.svg").read_text()     # the app's colour for 3 non-zeros


def test_mask_file_recreates_the_export_bit_for_bit(learned, tmp_path, tiny_folder):
    ws, cfg, events = learned
    folder = ex.export_result(ws, "proxsparse", tmp_path / "e", events=events, evaluate=False).folder
    exported = _weights(folder)
    masks_file = folder / "proxsparse/masks.npz"
    lm = ex.load_with_masks(str(tiny_folder), masks_file, device="cpu", dtype="float32")
    for n in lm.prunable.names:
        ours = lm.prunable.modules[n].weight.detach()
        theirs = exported[n + ".weight"]
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), n   # bits, -0.0 included
    prunable_bytes = sum(w.numel() * w.element_size() for w in ws.originals.values())
    assert masks_file.stat().st_size < prunable_bytes / 16
    # the masks loaded back are the workspace's masks
    assert all(torch.equal(load_masks(masks_file)[n], m) for n, m in ws.results["proxsparse"].masks.items())


def test_weight_updating_method_exports_its_weights(learned, tmp_path):
    ws, cfg, _ = learned
    pruning = ws.prune("sparsegpt", cfg)
    folder = ex.export_result(ws, "sparsegpt", tmp_path / "sgpt", evaluate=False).folder
    exported = _weights(folder)
    changed = 0
    for n, w in pruning.weights.items():
        assert torch.equal(exported[n + ".weight"], w), n
        assert int(((w.reshape(-1, 4) != 0).sum(1) > 2).sum()) == 0
        changed += int((w != ws.originals[n] * pruning.masks[n]).sum())
    assert changed > 0                                     # really the updated weights, not W0·mask
    metrics = json.loads((folder / "proxsparse/metrics.json").read_text())
    assert metrics["weights_updated"] and metrics["verified"]
    assert "not the updated values" in (folder / "README.md").read_text()


def test_existing_folder_is_never_overwritten_silently(learned, tmp_path):
    ws, _, events = learned
    out = tmp_path / "x"
    ex.export_result(ws, "proxsparse", out, evaluate=False)
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        ex.export_result(ws, "proxsparse", out, evaluate=False)
    assert (out / "mine.txt").read_text() == "keep me"
    ex.export_result(ws, "proxsparse", out, evaluate=False, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]          # old copy cleaned up
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="is a file"):
        ex.export_result(ws, "proxsparse", tmp_path / "afile", evaluate=False, overwrite=True)


@pytest.mark.parametrize("name,expected", [("my run", "my-run"), ("../../etc/passwd", "etc-passwd"),
                                           ("/abs/olute", "abs-olute"), ("a..b", "a.b"),
                                           (".hidden", "hidden"), ("ok_name-1.0", "ok_name-1.0")])
def test_names_are_sanitised_and_stay_under_the_root(tmp_path, name, expected):
    target = ex.target_in(tmp_path, name)
    assert target.name == expected and target.parent == tmp_path.resolve()


@pytest.mark.parametrize("name", ["", "..", "///", "../..", " . "])
def test_unusable_names_are_refused(tmp_path, name):
    with pytest.raises(UserError, match="not usable as a folder name"):
        ex.target_in(tmp_path, name)


def test_stop_during_export_leaves_nothing(learned, tmp_path):
    ws, _, _ = learned
    stop = threading.Event()

    def progress(text):
        if text.startswith("writing masks"):   # after the model files were written
            stop.set()
    with pytest.raises(Stopped, match="nothing was written"):
        ex.export_result(ws, "proxsparse", tmp_path / "out" / "s", evaluate=False, stop=stop, progress=progress)
    assert list((tmp_path / "out").iterdir()) == []
    for n in ws.lm.prunable.names:                            # the model is dense again
        assert torch.equal(ws.lm.prunable.modules[n].weight.detach(), ws.originals[n])
    # stop during the evaluation that precedes the export
    ws.ppl.pop("proxsparse", None)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped, match="during evaluation"):
        ex.export_result(ws, "proxsparse", tmp_path / "out" / "s", stop=stop)
    assert list((tmp_path / "out").iterdir()) == [] and "proxsparse" not in ws.ppl
    ex.export_result(ws, "proxsparse", tmp_path / "out" / "s")              # still usable
    assert (tmp_path / "out" / "s" / "config.json").exists()


def test_disk_full_midway_leaves_nothing_and_says_so(learned, tmp_path, monkeypatch):
    ws, _, _ = learned

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ex, "save_masks", full)
    with pytest.raises(UserError, match="disk is full.*nothing was written"):
        ex.export_result(ws, "proxsparse", tmp_path / "d" / "full", evaluate=False)
    assert list((tmp_path / "d").iterdir()) == []


def test_not_enough_space_is_caught_before_writing(learned, tmp_path, monkeypatch):
    ws, _, _ = learned
    real = shutil.disk_usage
    monkeypatch.setattr(ex.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    with pytest.raises(UserError, match="not enough disk space"):
        ex.export_result(ws, "proxsparse", tmp_path / "d" / "x", evaluate=False)
    assert list((tmp_path / "d").iterdir()) == []


def test_unwritable_export_folder(learned, tmp_path, monkeypatch):
    ws, _, _ = learned
    (tmp_path / "plainfile").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        ex.export_result(ws, "proxsparse", tmp_path / "plainfile" / "x", evaluate=False)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(ex.tempfile, "mkdtemp", denied)
    with pytest.raises(UserError, match="permission denied"):
        ex.export_result(ws, "proxsparse", tmp_path / "ro" / "x", evaluate=False)


def test_bundle_zip_holds_the_small_artefacts(learned, tmp_path):
    ws, _, events = learned
    folder = ex.export_result(ws, "proxsparse", tmp_path / "b", events=events, evaluate=False).folder
    z = ex.bundle(folder, tmp_path / "dl" / "b.zip")
    names = zipfile.ZipFile(z).namelist()
    assert "b/README.md" in names and "b/proxsparse/masks.npz" in names
    assert "b/proxsparse/recipe.json" in names and "b/proxsparse/report.html" in names
    assert not any(n.endswith(".safetensors") for n in names)
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["b.zip"]


def test_cli_learn_then_export(tiny_folder, tmp_path, capsys):
    from proxsparse_core.cli import main

    run = tmp_path / "run"
    flags = ["--model", str(tiny_folder), "--device", "cpu", "--dtype", "float32", "--samples", "8",
             "--ctx", "32", "--eval-ctx", "32", "--eval-windows", "2", "--steps", "2", "--lr", "1e-3"]
    assert main(["learn", *flags, "--out", str(run), "--no-eval"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp")]) == 0
    out = capsys.readouterr().out
    assert "exported proxsparse to" in out and "verified" in out
    assert (tmp_path / "exp" / "proxsparse" / "masks.npz").exists()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- in the browser
@pytest.fixture(scope="module", autouse=True)
def exports_root(tmp_path_factory):
    """Exports of the launched app go to a temporary root. Autouse, so it is set before the
    module-scoped `app` fixture starts the server (the app reads it at export time)."""
    import os
    root = tmp_path_factory.mktemp("app-exports")
    old = os.environ.get("PROXSPARSE_EXPORTS")
    os.environ["PROXSPARSE_EXPORTS"] = str(root)
    yield root
    if old is None:
        os.environ.pop("PROXSPARSE_EXPORTS")
    else:
        os.environ["PROXSPARSE_EXPORTS"] = old


def test_browser_exports_a_run_and_downloads_the_zip(app, exports_root, tmp_path):  # noqa: F811
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    url, _ = app
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                           "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(90_000)
        page.goto(url)
        page.get_by_label("Steps").fill("3")
        page.get_by_label("Steps").press("Tab")
        page.click("#ps-start")
        page.wait_for_function("() => document.querySelector('#ps-progress').innerText.includes('finished')")
        page.get_by_role("tab", name="Export").click()
        page.fill("#ps-export-name textarea, #ps-export-name input", "../browser run")
        page.click("#ps-export")
        link = page.locator("#ps-export-zip a").first
        link.wait_for()
        assert "exported" in page.inner_text("#ps-export-status").lower()
        shots = Path(__file__).resolve().parent.parent / "test-output"
        shots.mkdir(exist_ok=True)
        page.screenshot(path=str(shots / "export.png"), full_page=True)
        with page.expect_download() as dl:
            link.click()
        saved = tmp_path / "download.zip"
        dl.value.save_as(saved)
        browser.close()
    names = zipfile.ZipFile(saved).namelist()
    assert "browser-run/proxsparse/masks.npz" in names and "browser-run/README.md" in names
    assert (exports_root / "browser-run" / "config.json").exists()      # sanitised, inside the root


def test_report_ticks_are_round_and_steps_whole():
    from proxsparse_core.runs.report import nice_ticks, svg_line_chart

    assert nice_ticks(1, 3, 6, whole=True) == [1, 2, 3]
    assert nice_ticks(1, 60, 6, whole=True) == [20, 40, 60]
    assert nice_ticks(2.93, 3.61, 5) == pytest.approx([3.0, 3.2, 3.4, 3.6])
    svg = svg_line_chart({"a": ([1, 2, 3], [3.0, 2.5, 2.0])}, "t", "training step", "loss")
    import re
    xs = re.findall(r'text-anchor="middle">([^<]+)</text>', svg)
    assert "1.5" not in xs and {"1", "2", "3"} <= set(xs)


def test_the_report_is_written_without_plotly_with_its_svg_charts(monkeypatch):
    """The core runs where only torch and transformers are installed (a GPU machine): no interactive
    charts then, the SVG learning curves still there."""
    import importlib.util
    import sys

    from proxsparse_core.runs.report import report_html

    events = [{"step": s, "total_steps": 3, "loss": 3.0 - 0.1 * s, "lm_loss": 3.0 - 0.1 * s, "share_24": 0.2 * s,
               "nnz_hist": [0, 0, s, 1, 3 - s], "lr": 0.01} for s in (1, 2, 3)]
    if importlib.util.find_spec("plotly") is not None:
        assert "Interactive charts" in report_html({"perplexity": {}}, events, {"loss": "<svg id='loss'></svg>"})
    monkeypatch.setitem(sys.modules, "plotly", None)             # as if it were not installed
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    without = report_html({"perplexity": {}}, events, {"loss": "<svg id='loss'></svg>"})
    assert "Interactive charts" not in without and "<svg id='loss'>" in without
