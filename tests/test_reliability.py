"""Reliability: every bad input or fault gets one clear line, and leaves the CLI / app usable with
nothing finished lost. Each test is one row of the reliability table (case → test → message)."""
import errno
import inspect
import threading
import time

import pytest
import torch

from proxsparse_core.cli import main
from proxsparse_core.config import RunConfig
from proxsparse_core.errors import Stopped, UserError
from proxsparse_core.models.loading import load_model
from proxsparse_core.results import DENSE
from proxsparse_core.workspace import Workspace
from test_export import save_tiny_model, tiny_cfg

LEARNED = "proxsparse"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _tiny_flags(folder, **kw) -> list[str]:
    flags = dict(model=str(folder), device="cpu", dtype="float32", samples=8, ctx=32, eval_ctx=32,
                 eval_windows=2, steps=2, lr=1e-3)
    flags.update(kw)
    return [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))]


def _slow_forward(model, delay: float, fail_at: int | None = None, exc=None, stop=None, nan_at=None):
    """Wrap model.forward: sleep, and at training forward number fail_at raise `exc`, at stop_at
    set `stop`, at nan_at return a NaN loss (forwards in eval mode, such as the learner's held-out
    measurement, are not counted). Returns the call counter."""
    orig = model.forward
    calls = {"n": 0}

    def forward(*a, **k):
        time.sleep(delay)
        if not model.training:
            return orig(*a, **k)
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise exc
        if stop is not None and calls["n"] == stop[0]:
            stop[1].set()
        out = orig(*a, **k)
        if nan_at is not None and calls["n"] == nan_at and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out
    model.forward = forward
    return calls


def _wait(job, timeout=60):
    t0 = time.time()
    while job.active and time.time() - t0 < timeout:
        time.sleep(0.02)
    assert not job.active, "the job did not finish"


# ----------------------------------------------------------------------------- model sources
def test_unknown_or_private_model_id(capsys, monkeypatch, tmp_path):
    import transformers

    def not_found(name, *a, **k):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on "
                      f"'https://huggingface.co/models'\nIf this is a private repository, make sure to "
                      f"pass a token having permission to this repo")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", not_found)
    rc, err = _cli(capsys, "learn", "--model", "someone/private-model", "--out", str(tmp_path / "r"))
    assert rc == 2 and "was not found" in _one_line_error(err) and "login" in err
    assert not any((tmp_path / "r").glob("*"))          # nothing written
    pytest.importorskip("gradio")                       # the app: a toast, and the page stays usable
    from ui import feedback, learn_tab
    from ui.jobs import JobManager
    said = []
    monkeypatch.setattr(feedback, "notify", lambda m, *a, **k: said.append(m))
    jobs = JobManager()
    out = learn_tab.inspect_model(jobs, "someone/private-model", "cpu", "float32", False, "")
    assert said and "was not found" in said[0] and not isinstance(out, str)
    with jobs.claim("checking"):
        pass


def test_offline_hub_gives_a_clear_message():
    with pytest.raises(UserError, match="offline"):
        load_model("nobody-here/no-such-model-xyz", device="cpu")


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a causal language model"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(UserError, match="without config.json"):
        load_model(str(tmp_path.parent), device="cpu")


def test_layers_not_divisible_by_4_are_skipped_and_listed(tmp_path):
    from proxsparse_core.runs.export import export_result

    folder = save_tiny_model(tmp_path / "odd", hidden=70, heads=5, kv_heads=5, inter=128)
    ws = Workspace()
    res = ws.learn(tiny_cfg(folder, steps=2))
    p = ws.lm.prunable
    assert res.status == "finished"
    assert p.names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(p.skipped) == 12 and all("70 not divisible by 4" in why for _, why in p.skipped)
    assert "skipped 12" in ws.lm.describe()
    out = export_result(ws, LEARNED, tmp_path / "exp", evaluate=False)
    assert out.metrics["verified"] and len(out.metrics["skipped_layers"]) == 12


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("kind,message", [("empty", "is empty"), ("binary", "looks binary"),
                                          ("huge", "the limit is 200 MiB"), ("latin1", "not UTF-8"),
                                          ("utf16", "is UTF-16 text; save it as UTF-8")])
def test_bad_uploaded_text(tiny_folder, tmp_path, capsys, kind, message):
    f = tmp_path / "upload.txt"
    if kind == "empty":
        f.write_bytes(b"")
    elif kind == "binary":
        f.write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    elif kind == "latin1":
        f.write_bytes("caf\xe9 na\xefve\n\n".encode("latin-1") * 50)
    elif kind == "utf16":                          # what Windows Notepad saves as "Unicode"
        f.write_text("hello world\n\n" * 500, encoding="utf-16")
    else:
        with open(f, "wb") as h:                   # sparse: no disk space used
            h.truncate(201 * 2**20)
    rc, err = _cli(capsys, "learn", *_tiny_flags(tiny_folder, data=f), "--out", str(tmp_path / "r"))
    assert rc == 2 and message in _one_line_error(err)


def test_bad_upload_in_the_app_keeps_it_usable(tiny_folder, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from ui import learn_tab
    from ui.jobs import JobManager

    monkeypatch.setattr(learn_tab, "notify", lambda *a, **k: None)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    jobs = JobManager()
    cfg = tiny_cfg(tiny_folder).to_dict()
    values = [cfg[n] for n in learn_tab.FORM]
    frames = list(learn_tab.start_run(jobs, learn_tab.DATA_MODES[1], str(empty), "", False, *values))
    assert "is empty" in frames[-1][0] and jobs.job.status == "failed"
    frames = list(learn_tab.start_run(jobs, learn_tab.DATA_MODES[1], None, "", False, *values))
    assert "choose a .txt or .jsonl file" in frames[-1][0]
    with jobs.claim("checking"):                    # the guard was released
        pass
    frames = list(learn_tab.start_run(jobs, learn_tab.DATA_MODES[0], None, "", False, *values))
    assert jobs.job.status == "finished" and LEARNED in jobs.ws.results


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("flag,value,message", [
    ("lambda1", "-1", "lambda1 must be ≥ 0"), ("lambda1", "nan", "finite number"),
    ("lambda1", "1e9", "out of range"), ("lambda2", "inf", "finite number"),
    ("lr", "0", "lr must be > 0"), ("lr", "-1e-4", "lr must be > 0"), ("lr", "nan", "finite number"),
    ("lr", "10", "out of range"), ("steps", "0", "steps must be between 1"),
    ("steps", "1000000000", "steps must be between 1"), ("eps", "0", "eps must be > 0")])
def test_bad_hyper_parameters(capsys, tmp_path, flag, value, message):
    rc, err = _cli(capsys, "learn", f"--{flag}={value}", "--out", str(tmp_path / "r"))
    assert rc == 2 and message in _one_line_error(err)
    assert not (tmp_path / "r").exists()            # refused before anything is written


def test_zero_lambda_is_allowed_and_form_values_are_checked():
    assert RunConfig(lambda1=0.0).validate().lambda1 == 0.0     # λ1 = 0: no regulariser, still a mask
    pytest.importorskip("gradio")
    from ui.learn_tab import FORM, config_from_form
    values = {n: v for n, v in RunConfig().to_dict().items() if n in FORM}
    with pytest.raises(UserError, match="^Learning rate must be > 0"):          # the page's own words
        config_from_form({**values, "lr": 0.0})
    with pytest.raises(UserError, match="^Steps must be between"):
        config_from_form({**values, "steps": 0})


def test_context_longer_than_the_model(tiny_folder, capsys, tmp_path):
    rc, err = _cli(capsys, "learn", *_tiny_flags(tiny_folder, ctx=1024), "--out", str(tmp_path / "r"))
    assert rc == 2 and "longer than the model allows (512 tokens)" in _one_line_error(err)


# ----------------------------------------------------------------------------- faults while learning
def _clean_masks(folder, steps):
    ws = Workspace()
    ws.learn(tiny_cfg(folder, steps=steps, warmup=0.0))
    return ws.results[LEARNED].masks


def test_out_of_memory_keeps_the_last_good_mask(tiny_folder):
    ws = Workspace()
    cfg = tiny_cfg(tiny_folder, steps=4, warmup=0.0)
    ws.load(cfg)
    _slow_forward(ws.lm.model, 0, fail_at=3, exc=torch.OutOfMemoryError("CUDA out of memory (simulated)"))
    res = ws.learn(cfg)
    assert res.status == "failed" and res.steps_done == 2
    assert "out of memory at step 3: lower ctx or batch" in res.message and "gradient checkpointing" in res.message
    assert all(p.grad is None for p in ws.lm.model.parameters())               # gradients freed
    for n in ws.lm.prunable.names:                                                # dense again
        assert torch.equal(ws.lm.prunable.modules[n].weight.detach(), ws.originals[n])
    good = _clean_masks(tiny_folder, 2)
    assert all(torch.equal(ws.results[LEARNED].masks[n], good[n]) for n in good)  # step-2 mask kept
    assert ws.verify(LEARNED).ok


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_out_of_memory_frees_gpu_memory(tiny_folder):
    ws = Workspace()
    cfg = tiny_cfg(tiny_folder, steps=4, warmup=0.0, device="cuda")
    ws.load(cfg)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    _slow_forward(ws.lm.model, 0, fail_at=3, exc=torch.OutOfMemoryError("CUDA out of memory (simulated)"))
    res = ws.learn(cfg)
    torch.cuda.synchronize()
    assert res.status == "failed" and res.steps_done == 2
    assert torch.cuda.memory_allocated() <= before          # optimizer state and grads released


def test_nan_loss_stops_and_keeps_the_last_good_mask(tiny_folder):
    ws = Workspace()
    cfg = tiny_cfg(tiny_folder, steps=4, warmup=0.0)
    ws.load(cfg)
    _slow_forward(ws.lm.model, 0, nan_at=3)
    res = ws.learn(cfg)
    assert res.status == "failed" and res.steps_done == 2
    assert "the loss became nan at step 3" in res.message and "Lower the learning rate" in res.message
    good = _clean_masks(tiny_folder, 2)
    assert all(torch.equal(ws.results[LEARNED].masks[n], good[n]) for n in good)
    assert ws.verify(LEARNED).ok and ws.perplexity(LEARNED) > 1


def test_stop_during_a_step_finishes_that_step_and_keeps_its_mask(tiny_folder):
    ws = Workspace()
    cfg = tiny_cfg(tiny_folder, steps=6, warmup=0.0)
    ws.load(cfg)
    stop = threading.Event()
    _slow_forward(ws.lm.model, 0, stop=(2, stop))                 # Stop pressed inside step 2
    res = ws.learn(cfg, stop=stop)
    assert res.status == "stopped" and res.steps_done == 2 and "stopped by the user after 2 steps" in res.message
    good = _clean_masks(tiny_folder, 2)
    assert all(torch.equal(ws.results[LEARNED].masks[n], good[n]) for n in good)


def test_stop_during_evaluation_keeps_the_model_dense_and_usable(tiny_folder):
    ws = Workspace()
    cfg = tiny_cfg(tiny_folder, eval_windows=12)       # three batches of windows
    ws.learn(cfg)
    stop = threading.Event()
    with pytest.raises(Stopped):
        ws.perplexity(LEARNED, progress=lambda done, total: stop.set(), stop=stop)
    assert LEARNED not in ws.ppl
    for n in ws.lm.prunable.names:
        assert torch.equal(ws.lm.prunable.modules[n].weight.detach(), ws.originals[n])
    assert ws.perplexity(LEARNED) > 1 and ws.verify(LEARNED).ok


# ----------------------------------------------------------------------------- the app's job manager
@pytest.fixture
def jobs(tiny_folder):
    pytest.importorskip("gradio")
    from ui.jobs import JobManager
    return JobManager()


def test_stop_during_evaluation_in_the_compare_tab(jobs, tiny_folder, monkeypatch):
    from ui import compare_tab

    job = jobs.start_learning(tiny_cfg(tiny_folder), evaluate=False)
    _wait(job)
    jobs.ws.ppl.clear()

    def progress(frac, desc=""):
        if desc.startswith(f"perplexity of {LEARNED}"):
            jobs.eval_stop.set()
    table, note = compare_tab.compute_perplexities(jobs, [], progress)
    assert "stopped; the rows already computed are kept" in note
    assert DENSE in jobs.ws.ppl and LEARNED not in jobs.ws.ppl and list(table["method"])[0].startswith("Dense")
    table, note = compare_tab.compute_perplexities(jobs, [])     # usable again
    assert note.startswith("all rows computed") and LEARNED in jobs.ws.ppl


def test_browser_reload_mid_run_reattaches_and_loses_nothing(jobs, tiny_folder, monkeypatch):
    from ui import learn_tab

    monkeypatch.setattr(learn_tab, "POLL_S", 0.02)
    cfg = tiny_cfg(tiny_folder, steps=12)
    jobs.ensure_loaded(cfg)
    _slow_forward(jobs.ws.lm.model, 0.05)
    values = [cfg.to_dict()[n] for n in learn_tab.FORM]
    page = learn_tab.start_run(jobs, learn_tab.DATA_MODES[0], None, "", False, *values)
    next(page)                                     # the first page shows the run …
    page.close()                                   # … and is closed (reload)
    assert jobs.job.active
    frames = list(learn_tab.attach(jobs))          # the reloaded page re-attaches
    assert jobs.job.status == "finished" and len(jobs.job.events) == 12
    assert "finished" in frames[-1][0] and LEARNED in jobs.ws.results


def test_two_visitors_starting_runs_at_once(jobs, tiny_folder, monkeypatch):
    from ui import learn_tab
    from ui.export_tab import run_export
    from ui.jobs import Busy

    monkeypatch.setattr(learn_tab, "notify", lambda *a, **k: None)
    monkeypatch.setattr(learn_tab, "POLL_S", 0.02)
    cfg = tiny_cfg(tiny_folder, steps=30)
    jobs.ensure_loaded(cfg)
    _slow_forward(jobs.ws.lm.model, 0.05)
    first = jobs.start_learning(cfg, evaluate=False)
    with pytest.raises(Busy, match="busy learning a mask"):
        jobs.start_learning(cfg, evaluate=False)
    values = [cfg.to_dict()[n] for n in learn_tab.FORM]
    second_page = learn_tab.start_run(jobs, learn_tab.DATA_MODES[0], None, "", False, *values)
    frame = next(second_page)                      # visitor B watches A's run instead
    assert "A run is already using the machine" in frame[0] and jobs.job is first
    second_page.close()
    with pytest.raises(Busy):
        run_export(jobs, LEARNED, "x", False, False, threading.Event())
    t0 = time.time()
    while not first.events and time.time() - t0 < 60:   # Stop after A's first step, not before it
        time.sleep(0.01)
    jobs.stop()
    _wait(first)
    assert first.status == "stopped" and first.result.steps_done >= 1 and LEARNED in jobs.ws.results


def test_stop_during_export_in_the_app(jobs, tiny_folder, tmp_path, monkeypatch):
    from ui import export_tab

    monkeypatch.setenv("PROXSPARSE_EXPORTS", str(tmp_path / "exports"))
    _wait(jobs.start_learning(tiny_cfg(tiny_folder), evaluate=False))
    stop = threading.Event()

    def progress(frac, desc=""):
        if desc.startswith("writing masks"):
            stop.set()
    with pytest.raises(Stopped, match="nothing was written"):
        export_tab.run_export(jobs, LEARNED, "mine", False, False, stop, progress)
    assert list((tmp_path / "exports").iterdir()) == []
    text, zip_path = export_tab.run_export(jobs, LEARNED, "../../mine", False, True, stop)   # Stop is reset
    assert (tmp_path / "exports" / "mine" / "config.json").exists() and zip_path.endswith("mine-artefacts.zip")
    assert "Exported" in text and "verified" in text


def test_disk_full_or_unwritable_export_folder_in_the_app(jobs, tiny_folder, tmp_path, monkeypatch):
    from proxsparse_core.runs import export
    from ui import export_tab

    _wait(jobs.start_learning(tiny_cfg(tiny_folder), evaluate=False))
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PROXSPARSE_EXPORTS", str(tmp_path / "file"))
    with pytest.raises(UserError, match="cannot write"):
        export_tab.run_export(jobs, LEARNED, "a", False, False, threading.Event())
    monkeypatch.setenv("PROXSPARSE_EXPORTS", str(tmp_path / "exports"))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(export, "write_report", full)
    with pytest.raises(UserError, match="disk is full"):
        export_tab.run_export(jobs, LEARNED, "b", False, False, threading.Event())
    assert list((tmp_path / "exports").iterdir()) == []
    with jobs.claim("checking"):                   # nothing held on to the model
        pass
    assert LEARNED in jobs.ws.results


def test_export_with_nothing_learned_says_so(jobs):
    from ui.export_tab import run_export
    with pytest.raises(UserError, match="nothing to export yet"):
        run_export(jobs, LEARNED, "x", False, False, threading.Event())


def test_server_listens_on_localhost_unless_asked():
    pytest.importorskip("gradio")
    import app
    from ui.layout import launch

    args = app.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False
    assert app.parse_args(["--host", "0.0.0.0", "--share"]).host == "0.0.0.0"
    sig = inspect.signature(launch).parameters
    assert sig["host"].default == "127.0.0.1" and sig["share"].default is False
