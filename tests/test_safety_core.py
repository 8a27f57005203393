"""Safe by construction (core and CLI): no model code runs unless whoever started the process
allowed it, a typo never loses a finished run, the model is dense again however a run ends, run
folders are complete or say they are not, and every bad input is one line. One test per case."""
import ast
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from proxsparse_core.models import budget
from proxsparse_core.runs import export as ex
from proxsparse_core.runs.files import load_masks, save_masks
from proxsparse_core.cli import main
from proxsparse_core.config import RunConfig
from proxsparse_core.errors import UserError
from proxsparse_core.method.learner import ProxSparseLearner
from proxsparse_core.sparsity.masks import mask_2to4
from proxsparse_core.models.loading import allow_remote_code, load_model, remote_code_allowed
from proxsparse_core.results import DENSE, LEARNED
from proxsparse_core.workspace import Workspace
from test_export import save_tiny_model, tiny_cfg

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()                  # what the test's own set-up printed (e.g. saving a model) is not the CLI's
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def _tiny_flags(folder, verb="learn", **kw) -> list[str]:
    flags = dict(model=str(folder), device="cpu", dtype="float32", samples=8, ctx=32, eval_ctx=32, eval_windows=2)
    if verb == "learn":
        flags.update(steps=2, lr=1e-3)
    flags.update(kw)
    return [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))]


# ----------------------------------------------------------------------------- 1. remote code
@pytest.fixture
def evil_folder(tmp_path, tiny_folder):
    """A model folder whose config.json names its own Python code (auto_map); that code, if it
    ever runs, writes a marker file."""
    folder = tmp_path / "evil-model"
    shutil.copytree(tiny_folder, folder)
    marker = tmp_path / "MARKER"
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil_code.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('the model folder ran its own code')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    yield folder, marker
    allow_remote_code(False)


def test_the_evil_folder_really_runs_code_when_the_starter_allows_it(evil_folder, tmp_path):
    """The control for the tests below: with --trust-remote-code typed on the command line the
    folder's code does run (in a subprocess, so this process never imports it)."""
    folder, marker = evil_folder
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "proxsparse_core", "eval", "--model", str(folder), "--device", "cpu",
                    "--trust-remote-code", "--no-eval"], env=env, cwd=tmp_path, capture_output=True, timeout=300)
    assert marker.exists()


@pytest.mark.parametrize("value", ["false", "no", "0", 1, None])
def test_trust_remote_code_must_be_a_real_boolean(evil_folder, value):
    folder, marker = evil_folder
    with pytest.raises(UserError, match=r"^trust_remote_code must be true or false, got "):
        cfg = RunConfig.from_dict({"model": str(folder), "device": "cpu", "trust_remote_code": value})
        Workspace().load(cfg)          # before the fix "false" got here and ran the folder's code
    with pytest.raises(UserError, match=r"^trust_remote_code must be true or false"):
        load_model(str(folder), "cpu", "float32", trust_remote_code=value)
    assert not marker.exists()


def test_remote_code_needs_the_gate_opened_by_whoever_started_the_process(evil_folder):
    folder, marker = evil_folder
    assert remote_code_allowed() is False                     # closed by default
    with pytest.raises(UserError) as err:
        load_model(str(folder), "cpu", "float32", trust_remote_code=True)
    assert "runs a model's own Python code" in str(err.value) and "--allow-remote-code" in str(err.value)
    assert "--trust-remote-code" in str(err.value)
    with pytest.raises(TypeError):
        allow_remote_code("yes")
    assert not marker.exists()


def test_a_recipe_cannot_turn_remote_code_on(evil_folder, tmp_path, capsys):
    folder, marker = evil_folder
    for value, needle in ((True, "pass --trust-remote-code on the command line"),
                          ("false", "trust_remote_code must be true or false, got 'false'"),
                          ("no", "trust_remote_code must be true or false, got 'no'")):
        recipe = tmp_path / f"recipe-{value}.json"
        recipe.write_text(json.dumps({"config": {"model": str(folder), "device": "cpu", "trust_remote_code": value}}))
        rc, _, err = _cli(capsys, "eval", "--recipe", recipe, "--no-eval")
        assert rc == 2 and needle in _one_line(err)
    assert not marker.exists()


def test_the_cli_flag_opens_the_gate_for_its_own_command_only(tiny_folder, capsys, monkeypatch):
    import proxsparse_core.workspace as workspace
    seen = []
    real = workspace.load_model

    def spy(*a, **k):
        seen.append(remote_code_allowed())
        return real(*a, **k)
    monkeypatch.setattr(workspace, "load_model", spy)
    rc, _, _ = _cli(capsys, "eval", "--model", tiny_folder, "--device", "cpu", "--no-eval", "--trust-remote-code")
    assert rc == 0 and seen == [True]
    assert remote_code_allowed() is False
    rc, _, _ = _cli(capsys, "eval", "--model", tiny_folder, "--device", "cpu", "--no-eval")
    assert rc == 0 and seen == [True, False]


# ----------------------------------------------------------------------------- 2. a typo loses nothing
@pytest.mark.parametrize("change, needle", [
    (dict(device="garbage"), "unknown device 'garbage'; use auto, cpu, cuda, cuda:N"),
    (dict(device="cuda:x"), "unknown device 'cuda:x'"),
    (dict(model="no-such-org/no-such-model-xyz"), "no-such-org/no-such-model-xyz"),
    (dict(model="/no/such/folder"), "does not exist"),
    (dict(dtype="float8"), "unknown dtype 'float8'"),
])
def test_a_failed_load_keeps_the_model_data_and_every_result(tiny_folder, change, needle):
    ws = Workspace()
    cfg = tiny_cfg(tiny_folder)
    ws.learn(cfg)
    ws.perplexity(DENSE)
    ws.perplexity(LEARNED)
    lm, data, results, ppl = ws.lm, ws.data, dict(ws.results), dict(ws.ppl)
    with pytest.raises(UserError, match=re.escape(needle)):
        ws.load(RunConfig(**{**cfg.to_dict(), **change}))
    assert ws.lm is lm and ws.data is data and ws.results == results and ws.ppl == ppl
    assert ws.verify(LEARNED).ok and ws.perplexity(LEARNED) == ppl[LEARNED]


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_known_device_names_pass_validation(device):
    RunConfig(device=device).validate()


# ----------------------------------------------------------------------------- 3. W0 on every exit
def test_any_exception_mid_run_restores_everything_and_is_re_raised(tiny_lm, monkeypatch):
    import proxsparse_core.method.learner as learner

    model = tiny_lm.model
    model.get_input_embeddings().weight.requires_grad_(False)     # a flag that must come back as is
    model.config.use_cache = True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = {"n": 0}
    real = learner.prox_2to4_
    layers = len(tiny_lm.prunable.names)

    def failing(w, lam, **kw):
        calls["n"] += 1
        if calls["n"] == layers + 2:        # step 2, after one layer already had its prox
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return real(w, lam, **kw)
    monkeypatch.setattr(learner, "prox_2to4_", failing)
    # the layer-by-layer path (the one every device has), not the all-layers C call of the CPU
    monkeypatch.setattr(learner.prox_native, "layers_supported", lambda *a, **k: False)
    cfg = RunConfig(steps=4, lr=1e-2, lambda1=1.0, lambda2=0.1, train_all=True, grad_ckpt=True)
    samples = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="illegal memory access") as err:
        ProxSparseLearner(tiny_lm, cfg, samples).run()
    for n, p in model.named_parameters():            # W0 and the other trained parameters
        assert torch.equal(p.detach(), before[n]), n
        assert p.requires_grad == flags[n] and p.grad is None, n
    assert model.config.use_cache is True and not model.training
    assert not model.is_gradient_checkpointing
    gc.collect()   # the optimizer state is released although the traceback still holds the frame
    live = [o for o in gc.get_objects() if issubclass(type(o), torch.optim.Optimizer) and o.state]
    assert err.value is not None and live == []


# ----------------------------------------------------------------------------- 4. run folders
def test_ctrl_c_during_evaluation_keeps_the_mask_and_marks_the_run_incomplete(tiny_folder, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "run"
    on_disk = {}

    def interrupted(self, name=DENSE, progress=None, stop=None):
        on_disk.update(json.loads((out / "metrics.json").read_text()))
        raise KeyboardInterrupt
    monkeypatch.setattr(Workspace, "perplexity", interrupted)
    rc, _, err = _cli(capsys, "learn", *_tiny_flags(tiny_folder), "--out", out)
    assert rc == 130
    assert err.strip() == f"interrupted: the mask was saved in {out / 'masks.npz'}; metrics.json is marked incomplete"
    assert on_disk["complete"] is False                       # written before the evaluation began
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] is False and "interrupted (Ctrl-C)" in metrics["incomplete"]
    assert metrics["steps"] == 2 and metrics["verified"] is True
    masks = load_masks(out)
    ws = Workspace()
    ws.load(tiny_cfg(tiny_folder))
    assert set(masks) == set(ws.lm.prunable.names)
    assert json.loads((out / "recipe.json").read_text())["method"] == LEARNED


def test_a_finished_run_says_it_is_complete(tiny_folder, tmp_path, capsys):
    rc, _, _ = _cli(capsys, "learn", *_tiny_flags(tiny_folder), "--out", tmp_path / "run", "--no-eval")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rc == 0 and metrics["complete"] is True and "incomplete" not in metrics


@pytest.mark.parametrize("out", ["/proc/proxsparse-run", "FILE/run"])
def test_an_unwritable_out_folder_fails_before_the_model_loads(tiny_folder, tmp_path, capsys, monkeypatch, out):
    (tmp_path / "FILE").write_text("a file, not a folder")
    out = out.replace("FILE", str(tmp_path / "FILE"))
    monkeypatch.setattr(Workspace, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for verb in (["learn"], ["prune", "--method", "magnitude"]):
        rc, _, err = _cli(capsys, *verb, *_tiny_flags(tiny_folder, verb[0]), "--out", out)
        assert rc == 2 and f"cannot write to output folder {out!r}" in _one_line(err)


def test_a_run_that_saves_nothing_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    rc, _, err = _cli(capsys, "learn", "--model", "/no/such/model", "--out", out)
    assert rc == 2 and "does not exist" in _one_line(err)
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- 5. one-line errors
BAD_RECIPES = [
    (b'{"config": ["model"]}', '"config" must be an object of settings'),
    (b'{"config": {"model": 5}}', "model must be text, got 5"),
    (b'{"config": {"device": 5}}', "device must be text, got 5"),
    (b'{"config": {"device": "garbage"}}', "unknown device 'garbage'"),
    (b'{"config": {"steps": "ten"}}', "steps must be a whole number, got 'ten'"),
    (b'{"config": {"steps": true}}', "steps must be a whole number, got True"),
    (b'{"config": {"lr": "0.1"}}', "lr must be a number, got '0.1'"),
    (b'{"config": {"grad_ckpt": "yes"}}', "grad_ckpt must be true or false, got 'yes'"),
    (b'[1, 2]', "it holds a JSON list, not an object"),
    (b'"learn"', "it holds a JSON str, not an object"),
    (b'{"config": {}', "is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"config": {"model": "\xff\xfe"}}', "is not UTF-8 text"),
    (b'{"config": {}, "pad": "' + b"x" * 2**20 + b'"}', "a recipe is at most 1 MiB"),
    (b'{"config": {"model": "' + b"m" * 5000 + b'"}}', "model is 5,000 characters long; the limit is 1,000"),
    (b'{"config": {"data": "' + b"d" * 1001 + b'"}}', "data is 1,001 characters long"),
]


@pytest.mark.parametrize("content, needle", BAD_RECIPES, ids=range(len(BAD_RECIPES)))
def test_a_bad_recipe_is_one_line(content, needle, tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_bytes(content)
    for verb in (["learn"], ["prune", "--method", "wanda"], ["eval"]):
        out = ["--out", tmp_path / "out"] if verb[0] != "eval" else []
        rc, _, err = _cli(capsys, *verb, "--recipe", recipe, *out)
        assert rc == 2 and needle in _one_line(err)
    assert not (tmp_path / "out").exists()


WRONG = {bool: ["false", 1, None], str: [5, None, ["cpu"]], int: ["ten", True, 2.5, float("nan")],
         float: ["x", True, None, [1.0]]}


@pytest.mark.parametrize("name", [f.name for f in fields(RunConfig)])
def test_every_setting_is_type_checked(name):
    kind = type(RunConfig.__dataclass_fields__[name].default)
    for value in WRONG[kind]:
        with pytest.raises(UserError, match=rf"^{name} must be "):
            RunConfig(**{name: value}).validate()


def test_a_five_thousand_character_model_path(capsys):
    rc, _, err = _cli(capsys, "learn", "--model", "/" + "a" * 4999, "--out", "/tmp/never-made")
    assert rc == 2 and "model is 5,000 characters long; the limit is 1,000" in _one_line(err)
    with pytest.raises(UserError, match="limit is 1,000"):                 # the loader guards itself too
        load_model("/" + "a" * 4999)
    with pytest.raises(UserError, match="not a usable model folder or id"):  # a name the file system refuses
        load_model("/" + "a" * 300, "cpu")


@pytest.mark.parametrize("line, needle", [
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "line 2 is nested too deeply"),
    ('{"text": {"nested": "object"}}', "line 2: the 'text' field must be text, not a JSON dict"),
    ('{"text": 5}', "line 2: the 'text' field must be text, not a JSON int"),
    ('[1, 2, 3]', "line 2 is not a JSON object with a 'text' field"),
])
def test_a_bad_jsonl_line_is_one_line(tmp_path, line, needle):
    from proxsparse_core.data.text import load_text
    path = tmp_path / "upload.jsonl"
    path.write_text('{"text": "a fine first document"}\n' + line + "\n")
    with pytest.raises(UserError, match=re.escape(needle)):
        load_text(str(path))


def test_eval_with_masks_of_another_shape(tiny_folder, tmp_path, capsys):
    other = save_tiny_model(tmp_path / "wider", inter=192)       # same layer names, other shapes
    from transformers import AutoModelForCausalLM
    from proxsparse_core.sparsity.prunable import find_prunable
    prunable = find_prunable(AutoModelForCausalLM.from_pretrained(other))
    save_masks(tmp_path / "masks.npz", {n: mask_2to4(prunable.modules[n].weight.detach()) for n in prunable.names})
    rc, _, err = _cli(capsys, "eval", "--model", tiny_folder, "--device", "cpu", "--masks", tmp_path / "masks.npz",
                      "--no-eval")
    assert rc == 2 and re.search(r"the masks do not match this model: the mask of \S+ has shape \(\d+, \d+\), "
                                 r"the layer \(\d+, \d+\)$", _one_line(err))
    from proxsparse_core.sparsity import masks                                # the check has one home
    assert all("def check_masks_match" not in p.read_text() for p in Path(ex.__file__).parent.parent.rglob("*.py")
               if p != Path(masks.__file__))


# ----------------------------------------------------------------------------- 8. memory budget
def _smollm2_shaped():
    """A LoadedModel shaped like the bundled SmolLM2-135M, on the meta device (no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from proxsparse_core.models.loading import LoadedModel
    from proxsparse_core.sparsity.prunable import find_prunable
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return LoadedModel(model, None, "bundled-shaped", "SmolLM2-shaped", "cpu", torch.float32,
                       find_prunable(model), 8192)


def test_settings_that_cannot_fit_are_refused_before_learning(monkeypatch):
    lm = _smollm2_shaped()
    with pytest.raises(UserError, match="longer than the model allows"):
        RunConfig(ctx=65536, batch=64, samples=64).validate(lm.max_positions)
    monkeypatch.setattr(budget, "available_memory", lambda device: 24 * 2**30)     # this machine's RAM
    big = RunConfig(ctx=8192, batch=64, samples=64)
    assert budget.estimate_learning_memory(lm, big).total > 200 * 2**30
    with pytest.raises(UserError, match=r"^these settings need about \d+\.\d GiB more memory to learn than the "
                                        r"24\.0 GiB available on cpu .*lower ctx or batch"):
        budget.check_learning_memory(lm, big)
    demo = RunConfig().with_preset("quick-demo")
    est = budget.check_learning_memory(lm, demo)                 # the presets pass
    assert 2**30 < est.total < 3 * 2**30                          # 106 M trained weights × 3 × 4 bytes + a little
    ckpt = budget.estimate_learning_memory(lm, RunConfig(ctx=2048, batch=4, samples=4, grad_ckpt=True))
    assert ckpt.activations < budget.estimate_learning_memory(lm, RunConfig(ctx=2048, batch=4, samples=4)).activations


def test_learn_checks_the_budget_before_any_step(tiny_folder, monkeypatch):
    ws = Workspace()
    cfg = tiny_cfg(tiny_folder)
    ws.load(cfg)
    monkeypatch.setattr(budget, "available_memory", lambda device: 2**20)
    monkeypatch.setattr(ProxSparseLearner, "run", lambda self: pytest.fail("learning started"))
    with pytest.raises(UserError, match="GiB more memory to learn"):
        ws.learn(cfg)
    assert LEARNED not in ws.results


def test_a_finished_run_keeps_no_optimizer_state_or_gradients(tiny_folder):
    ws = Workspace()
    ws.learn(tiny_cfg(tiny_folder, lambda2=0.1))
    gc.collect()
    assert [o for o in gc.get_objects() if issubclass(type(o), torch.optim.Optimizer) and o.state] == []
    assert all(p.grad is None for p in ws.lm.model.parameters())


# ----------------------------------------------------------------------------- 9. killed exports
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def learned(tiny_folder):
    ws = Workspace()
    ws.learn(tiny_cfg(tiny_folder))
    return ws


def test_export_removes_what_killed_exports_left_behind(learned, tmp_path, monkeypatch):
    dead, me = _dead_pid(), os.getpid()
    stale = [tmp_path / f".exp.partial-{dead}-abc", tmp_path / f".exp.old-{dead}-def"]
    keep = [tmp_path / f".exp.partial-{me}-live", tmp_path / f".other.partial-{dead}-x",
            tmp_path / ".exp.partial-legacy"]
    for d in stale + keep:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half-written")
    prefixes = []
    real = ex.tempfile.mkdtemp
    monkeypatch.setattr(ex.tempfile, "mkdtemp", lambda **k: prefixes.append(k["prefix"]) or real(**k))
    ex.export_result(learned, LEARNED, tmp_path / "exp", evaluate=False)
    assert not any(d.exists() for d in stale) and all(d.exists() for d in keep)
    assert prefixes == [f".exp.partial-{me}-"]                    # the pid tells the next export
    assert (tmp_path / "exp" / "README.md").exists()


def test_a_previous_export_being_replaced_when_killed_is_put_back(tmp_path):
    dead = _dead_pid()
    old = tmp_path / f".exp.old-{dead}-xyz"
    (old / "previous").mkdir(parents=True)
    (old / "previous" / "README.md").write_text("the previous export")
    assert ex.clean_stale(tmp_path / "exp") == [old]
    assert (tmp_path / "exp" / "README.md").read_text() == "the previous export" and not old.exists()


# ----------------------------------------------------------------------------- 12/13. one stop, own help
def test_help_prints_percent_signs_not_a_dict(capsys):
    for verb in ("learn", "prune", "eval", "export"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = capsys.readouterr().out
        assert "{'" not in out and "%(" not in out, verb
    with pytest.raises(SystemExit):
        main(["learn", "--help"])
    assert "~30% slower" in " ".join(capsys.readouterr().out.split())


def test_the_core_has_no_hidden_import_errors_no_second_stop_and_no_outside_citations():
    for path in sorted((ROOT / "proxsparse_core").glob("*.py")):
        text = path.read_text()
        assert "InterruptedError" not in text and "ExportStopped" not in text, path.name
        assert "SPEC" not in text and "../" + "shared" not in text, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Try):
                own = any(isinstance(n, ast.ImportFrom) and n.level > 0 for b in node.body for n in ast.walk(b))
                catches = any(h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers)
                assert not (own and catches), f"{path.name}:{node.lineno} hides an import error of its own module"


# ----------------------------------------------------------------------------- 15. an installable package
def test_the_package_builds_installs_and_runs_outside_the_clone(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "app.py"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("proxsparse_core", "ui"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, env=env, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("proxsparse_studio-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "app.py" in names and "proxsparse_core/export.py" in names and "ui/layout.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    assert "proxsparse = proxsparse_core.cli:main_entry" in scripts and "proxsparse-studio = app:main" in scripts
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, env=env, capture_output=True, timeout=300)
    run_env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import proxsparse_core, app\n"
                            "from proxsparse_core.runs.export import load_with_masks\n"
                            "print(proxsparse_core.__file__)"],
                           cwd=tmp_path, env=run_env, capture_output=True, text=True, check=True).stdout
    assert where.strip().startswith(str(site))
    presets = subprocess.run([str(site / "bin" / "proxsparse"), "presets"], cwd=tmp_path, env=run_env,
                             capture_output=True, text=True, timeout=120)
    assert presets.returncode == 0 and "quick-demo" in presets.stdout


# ----------------------------------------------------------------------------- 16. label what it is
def test_export_of_a_wanda_run_is_labelled_and_reproduced_as_wanda(tiny_folder, tmp_path, capsys):
    run, exp = tmp_path / "run", tmp_path / "exp"
    rc, out, _ = _cli(capsys, "prune", "--method", "wanda", *_tiny_flags(tiny_folder, "prune"), "--out", run, "--no-eval")
    assert rc == 0 and json.loads((run / "recipe.json").read_text())["method"] == "wanda"
    rc, out, _ = _cli(capsys, "export", "--run", run, "--out", exp, "--no-eval")
    assert rc == 0 and f"exported wanda to {exp}" in out
    card = (exp / "README.md").read_text()
    assert "(wanda)" in card and "python -m proxsparse_core prune --method wanda" in card
    assert "proxsparse_core learn" not in card and "λ1 is used as is" not in card
    recipe = json.loads((exp / "proxsparse" / "recipe.json").read_text())
    assert recipe["method"] == "wanda" and recipe["command"].startswith("python -m proxsparse_core prune --method wanda")
    assert json.loads((exp / "proxsparse" / "metrics.json").read_text())["method"] == "wanda"


def test_export_of_a_sparsegpt_run_has_its_updated_weights(tiny_folder, tmp_path, capsys):
    run, exp = tmp_path / "run", tmp_path / "exp"
    assert _cli(capsys, "prune", "--method", "sparsegpt", *_tiny_flags(tiny_folder, "prune"), "--out", run, "--no-eval")[0] == 0
    rc, out, _ = _cli(capsys, "export", "--run", run, "--out", exp, "--no-eval")
    assert rc == 0 and "exported sparsegpt to" in out
    metrics = json.loads((exp / "proxsparse" / "metrics.json").read_text())
    assert metrics["method"] == "sparsegpt" and metrics["weights_updated"] is True and metrics["verified"]


def test_magnitude_says_it_uses_no_calibration_data(tiny_folder, tmp_path, capsys):
    rc, out, _ = _cli(capsys, "prune", "--method", "magnitude", *_tiny_flags(tiny_folder, "prune"), "--out", tmp_path / "run",
                      "--no-eval")
    assert rc == 0 and "magnitude: no calibration data (magnitude uses none)" in out
    assert "calibration samples" not in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["calibration_tokens"] == 0 and metrics["complete"] is True
    rc, out, _ = _cli(capsys, "prune", "--method", "wanda", *_tiny_flags(tiny_folder, "prune"), "--out", tmp_path / "w",
                      "--no-eval")
    assert "wanda: 8 calibration samples" in out


def test_a_tokenizer_that_splits_english_into_characters_is_refused():
    """A GGUF vocabulary converted wrongly (transformers 5.17 with Gemma 3) yields one token per
    character; the conversion must stop with a message rather than produce a model whose every
    perplexity is meaningless. A word-level tokenizer passes."""
    from conftest import TinyTokenizer
    from proxsparse_core.models.loading import check_tokenizer
    from test_export import word_tokenizer

    check_tokenizer(word_tokenizer(4096), "fine.gguf")
    with pytest.raises(UserError, match=r"gemma\.gguf splits English into single characters \(\d+ tokens"):
        check_tokenizer(TinyTokenizer(), "gemma.gguf")
