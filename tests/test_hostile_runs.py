"""Reading a run folder never trusts its bytes, and export never commits what it knows is wrong
(issue 26). Small hostile run folders are built here; every case is one error line without a
traceback, a non-zero exit, nothing existing lost and nothing half-written left behind."""
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from proxsparse_core.runs.files import load_masks, save_masks
from proxsparse_core.cli import main
from test_export import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _flags(folder, **kw) -> list[str]:
    flags = dict(model=str(folder), device="cpu", dtype="float32", samples=8, ctx=32, eval_ctx=32, eval_windows=2)
    flags.update(kw)
    return [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))]


def _eval_flags(folder) -> list[str]:
    return ["--model", str(folder), "--device", "cpu", "--dtype", "float32", "--eval-ctx", "32", "--eval-windows", "2"]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _refused(rc: int, err: str) -> str:
    """What a refusal must look like: exit code 2 and exactly one line on stderr, no traceback."""
    assert rc == 2, (rc, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def _digest(folder: Path) -> dict:
    """Every file under `folder` (links not followed) → its sha256: to prove nothing was lost."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "link → " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(folder)) + "/"] = "dir"
    return out


def _empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


@contextmanager
def _deadline(seconds: int):
    """Fail (instead of hanging the suite) if the body takes longer than `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it blocked or read far too much")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def base_run(tiny_folder, tmp_path_factory):
    """A magnitude run folder (recipe.json, masks.npz, metrics.json)."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["prune", "--method", "magnitude", *_flags(tiny_folder), "--out", str(run), "--no-eval"]) == 0
    return run


@pytest.fixture(scope="module")
def recover_run(base_run, tmp_path_factory):
    """A recover folder of base_run (with weights.safetensors)."""
    rec = tmp_path_factory.mktemp("rec") / "rec"
    assert main(["recover", "--run", str(base_run), "--method", "obs", "--out", str(rec), "--no-eval"]) == 0
    assert (rec / "weights.safetensors").is_file()
    return rec


@pytest.fixture
def run(base_run, tmp_path):
    """A private copy of base_run to tamper with."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


@pytest.fixture
def rec(recover_run, tmp_path):
    return Path(shutil.copytree(recover_run, tmp_path / "rec"))


def _write_npz(path: Path, meta, arrays: dict):
    meta_bytes = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    with open(path, "wb") as f:
        np.savez_compressed(f, meta=np.frombuffer(meta_bytes, dtype=np.uint8), **arrays)


def _meta_and_packed(run: Path):
    masks = load_masks(run)
    names = list(masks)
    meta = {"names": names, "shapes": [list(masks[n].shape) for n in names]}
    packed = {f"m{i}": np.packbits(masks[n].numpy().reshape(-1)) for i, n in enumerate(names)}
    return masks, meta, packed


# ----------------------------------------------------------------------------- 1. not a regular file
def test_recipe_linked_to_dev_zero_is_refused_at_once(run, tiny_folder, tmp_path, capsys):
    """st_size of a device is 0: the old size check passed and 7 GB were read."""
    (run / "recipe.json").unlink()
    (run / "recipe.json").symlink_to("/dev/zero")
    before = _digest(run)
    for argv in (["learn", "--recipe", run, "--out", tmp_path / "o1"],
                 ["learn", "--recipe", run / "recipe.json", "--out", tmp_path / "o2"],
                 ["recover", "--run", run, "--method", "obs", "--out", tmp_path / "o3"],
                 ["export", "--run", run, "--out", tmp_path / "o4"],
                 ["eval", "--masks", run]):
        start = time.monotonic()
        with _deadline(60):
            rc, _, err = _cli(capsys, *argv)
        assert time.monotonic() - start < 30
        line = _refused(rc, err)
        assert "recipe.json" in line and "is a character device, not a regular file" in line, line
    assert _digest(run) == before
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


@pytest.mark.parametrize("name", ["recipe.json", "masks.npz"])
def test_a_fifo_in_a_run_folder_never_blocks(name, run, tmp_path, capsys):
    (run / name).unlink()
    os.mkfifo(run / name)
    for argv in (["recover", "--run", run, "--method", "obs", "--out", tmp_path / "o1"],
                 ["export", "--run", run, "--out", tmp_path / "o2"],
                 ["eval", "--masks", run],
                 *([["learn", "--recipe", run, "--out", tmp_path / "o3"]] if name == "recipe.json" else [])):
        with _deadline(60):
            rc, _, err = _cli(capsys, *argv)
        line = _refused(rc, err)
        assert name in line and "is a FIFO (named pipe), not a regular file" in line, line
    assert (run / name).is_fifo()
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 4))


def test_a_folder_named_recipe_json_is_one_line(run, tmp_path, capsys):
    (run / "recipe.json").unlink()
    (run / "recipe.json").mkdir()
    line = _refused(*_cli(capsys, "export", "--run", run, "--out", tmp_path / "e")[::2])
    assert "is a folder, not a regular file" in line


# ----------------------------------------------------------------------------- 2. tampered masks.npz
def _tamper(case: str, run: Path):
    masks, meta, packed = _meta_and_packed(run)
    path = run / "masks.npz"
    first = meta["names"][0]
    if case == "meta is a list":
        _write_npz(path, [meta["names"], meta["shapes"]], packed)
        return "its meta is a JSON list, not an object"
    if case == "float64 masks":
        _write_npz(path, meta, {**packed, "m0": masks[first].numpy().astype(np.float64).reshape(-1)})
        return f"the mask of '{first}' is stored as float64, not as bit-packed bytes (uint8)"
    if case == "string shapes":
        meta["shapes"][0] = [str(d) for d in meta["shapes"][0]]
        _write_npz(path, meta, packed)
        return f"the shape of '{first}' is"
    if case == "int names":
        meta["names"] = list(range(len(meta["names"])))
        _write_npz(path, meta, packed)
        return "a layer name in its meta is 0, not text"
    if case == "huge shape":
        meta["shapes"][0] = [10**6, 10**6]
        _write_npz(path, meta, packed)
        return "its shapes claim 1,000,"
    if case == "a few GiB claimed":       # within what a model could be: the bytes must match the claim
        meta["shapes"][0] = [2**16, 2**16]
        _write_npz(path, meta, packed)
        return f"the mask of '{first}' holds {packed['m0'].size:,} bytes; its shape needs exactly 536,870,912"
    if case == "npy header claims 512 MiB":
        meta["shapes"][0] = [2**16, 2**16]
        _write_npz(path, meta, packed)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (2**29,)})
        with zipfile.ZipFile(path, "a") as z:       # a second m0.npy: zipfile reads the last one
            z.writestr("m0.npy", header.getvalue() + b"\x55" * 16)
        return "holds 16 bytes of data, its header says 536,870,912"
    if case == "pickled object array":
        _write_npz(path, meta, {**packed, "m0": np.array([{"evil": 1}], dtype=object)})
        return "is stored as object, not as bit-packed bytes"
    raise AssertionError(case)


MASK_CASES = ["meta is a list", "float64 masks", "string shapes", "int names", "huge shape",
              "a few GiB claimed", "npy header claims 512 MiB", "pickled object array"]


@pytest.mark.filterwarnings("ignore::UserWarning")         # zipfile warns of the duplicate member name
@pytest.mark.parametrize("case", MASK_CASES)
def test_a_tampered_masks_file_is_one_line_everywhere(case, run, tiny_folder, tmp_path, capsys):
    needle = _tamper(case, run)
    before = _digest(run)
    for argv in (["eval", "--masks", run, "--no-eval"],
                 ["eval", *_eval_flags(tiny_folder), "--masks", run / "masks.npz", "--no-eval"],
                 ["recover", "--run", run, "--method", "obs", "--out", tmp_path / "o1"],
                 ["export", "--run", run, "--out", tmp_path / "o2"]):
        start = time.monotonic()
        with _deadline(120):
            rc, _, err = _cli(capsys, *argv)
        line = _refused(rc, err)
        if "--model" in argv and "claim" in case:   # the model is known first: its shapes refuse the claim unread
            assert "masks.npz: the masks do not match this model: the mask of" in line, line
            assert "has shape (65536, 65536)" in line
        else:
            assert "masks.npz is not a valid ProxSparse mask file" in line and needle in line, (argv, line)
        assert time.monotonic() - start < 60
    assert _digest(run) == before
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------- 3. weights.safetensors
def _set_weights(rec: Path, change):
    from safetensors.torch import load_file, save_file
    path = rec / "weights.safetensors"
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name] = change(weights[name])
    save_file(weights, path)
    return name


def _first_survivor_nan(w):
    w = w.clone()
    w.view(-1)[int(torch.nonzero(w.view(-1))[0])] = float("nan")
    return w


@pytest.mark.parametrize("case", ["nan", "inf", "int64", "bool", "folder"])
def test_bad_recovered_weights_are_one_line(case, rec, tmp_path, capsys):
    if case == "folder":
        (rec / "weights.safetensors").unlink()
        (rec / "weights.safetensors").mkdir()
        needle = "weights.safetensors' is a folder, not a regular file"
    elif case == "nan":
        name = _set_weights(rec, _first_survivor_nan)
        needle = f"weights.safetensors: {name} has 1 NaN or infinite weights"
    elif case == "inf":
        name = _set_weights(rec, lambda w: torch.where(w != 0, torch.full_like(w, float("inf")), w))
        needle = f"weights.safetensors: {name} has "
    else:
        name = _set_weights(rec, lambda w: w.to(getattr(torch, case)))
        needle = f"weights.safetensors: {name} is stored as {case}, not as floating-point weights"
    before = _digest(rec)
    for argv in (["eval", "--masks", rec, "--no-eval"], ["export", "--run", rec, "--out", tmp_path / "e"]):
        line = _refused(*_cli(capsys, *argv)[::2])
        assert needle in line, line
    assert not (tmp_path / "e").exists() and list(tmp_path.iterdir()) == [rec]
    assert _digest(rec) == before


# ----------------------------------------------------------------------------- 4. export of a wrong pattern
@pytest.mark.parametrize("keep", [4, 3])
def test_export_of_a_mask_that_is_not_2to4_writes_nothing(keep, run, tmp_path, capsys):
    masks = load_masks(run)
    bad = {n: torch.zeros_like(m) for n, m in masks.items()}
    for m in bad.values():
        m.view(-1, 4)[:, :keep] = True
    save_masks(run / "masks.npz", bad)
    before = _digest(run)
    out = tmp_path / "exports" / "e"
    line = _refused(*_cli(capsys, "export", "--run", run, "--out", out)[::2])
    assert "failed its 2:4 check" in line and "groups with > 2 non-zeros" in line and "nothing was written" in line
    assert not out.exists() and _empty(tmp_path / "exports")       # no temporary folder either
    assert _digest(run) == before


def test_a_model_card_is_only_written_for_a_verified_pattern():
    from proxsparse_core.runs.report import model_card
    with pytest.raises(ValueError, match="verified"):
        model_card({"verified": False, "verification": "NOT verified: x: 3 groups with > 2 non-zeros"}, "proxsparse")
    assert "keeps at most 2 non-zero weights" in model_card({"verified": True, "method": "magnitude"}, "proxsparse")


# ----------------------------------------------------------------------------- 5. --out inside the run
@pytest.mark.parametrize("where", ["the run", "inside the run", "a link to the run", "holding the run"])
def test_export_into_the_run_it_reads_is_refused(where, run, tmp_path, capsys):
    (run / "sub").mkdir()
    (run / "sub" / "keep.txt").write_text("mine")
    out = {"the run": run, "inside the run": run / "sub" / "e", "holding the run": tmp_path}[where] \
        if where != "a link to the run" else tmp_path / "link"
    if where == "a link to the run":
        out.symlink_to(run)
    before, around = _digest(run), sorted(p.name for p in tmp_path.iterdir())
    line = _refused(*_cli(capsys, "export", "--run", run, "--out", out, "--overwrite")[::2])
    assert ("holds the run folder" if where == "holding the run" else "the run folder") in line
    assert "nothing was changed" in line
    assert _digest(run) == before and sorted(p.name for p in tmp_path.iterdir()) == around


@pytest.mark.parametrize("verb", ["recover", "learn", "prune"])
def test_other_commands_refuse_an_out_inside_the_run_they_read(verb, run, capsys, monkeypatch):
    import proxsparse_core.workspace as workspace

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before --out was checked")
    monkeypatch.setattr(workspace, "load_model", no_load)
    before = _digest(run)
    for out in (run, run / "sub"):
        argv = {"recover": ["recover", "--run", run, "--method", "obs"],
                "learn": ["learn", "--recipe", run],
                "prune": ["prune", "--method", "wanda", "--recipe", run / "recipe.json"]}[verb]
        line = _refused(*_cli(capsys, *argv, "--out", out, "--overwrite")[::2])
        assert "the run folder" in line and "nothing was changed" in line
    assert _digest(run) == before and not (run / "sub").exists()


# ----------------------------------------------------------------------------- 6. eval = what export exports
def test_eval_of_a_sparsegpt_folder_evaluates_the_rebuilt_weights(tiny_folder, tmp_path, capsys):
    run = tmp_path / "sgpt"
    rc, out, _ = _cli(capsys, "prune", "--method", "sparsegpt", *_flags(tiny_folder), "--out", run)
    assert rc == 0
    made = json.loads((run / "metrics.json").read_text())["perplexity"]["sparsegpt"]

    rc, out, _ = _cli(capsys, "eval", "--masks", run, "--json")
    assert rc == 0 and "evaluating sparsegpt from" in out and "rebuilt" in out
    folder_ppl = json.loads(out.strip().splitlines()[-1])["perplexity"]["pruned"]

    rc, out, _ = _cli(capsys, "eval", *_eval_flags(tiny_folder), "--masks", run / "masks.npz", "--json")
    assert rc == 0 and "evaluating the original weights × the mask of" in out and "a mask file" in out
    mask_only = json.loads(out.strip().splitlines()[-1])["perplexity"]["pruned"]

    assert folder_ppl == pytest.approx(made, rel=1e-5)          # what prune measured (and export exports)
    assert abs(folder_ppl - mask_only) > 1e-4 * mask_only      # not sparsegpt-maskonly


def test_eval_of_a_recover_folder_says_it_uses_the_recovered_weights(recover_run, capsys):
    rc, out, _ = _cli(capsys, "eval", "--masks", recover_run, "--no-eval")
    assert rc == 0 and "evaluating magnitude+recovery from" in out and "recovered weights" in out


# ----------------------------------------------------------------------------- 7. SIGTERM, a full disk
def test_sigterm_during_learn_saves_the_mask_like_ctrl_c(tiny_folder, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "proxsparse_core", "learn", *_flags(tiny_folder, steps=5000, lr=1e-3),
           "--out", str(out), "--no-eval"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "stderr.txt", "w") as errfile:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errfile, text=True, env=env, cwd=ROOT)
    lines, deadline = [], time.monotonic() + 240
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step 1/5000" in line or time.monotonic() > deadline:
                break
        if not any("step 1/5000" in x for x in lines):
            pytest.skip("the learner did not reach its first step in time on this machine")
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text, err = "".join(lines) + rest, (tmp_path / "stderr.txt").read_text()
    assert "terminate signal (SIGTERM): stopping after this step" in text, text[-2000:]
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["verified"] and 1 <= metrics["steps"] < 5000
    assert metrics["status"] == "stopped"
    assert load_masks(out)                    # the mask was saved


def test_disk_full_during_a_cli_export_is_one_line(base_run, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError
    import transformers.modeling_utils as mu

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(mu, "safe_save_file", full)
    before = _digest(base_run)
    out = tmp_path / "exports" / "e"
    line = _refused(*_cli(capsys, "export", "--run", base_run, "--out", out, "--no-eval")[::2])
    assert "the disk is full while exporting to" in line and "nothing was written" in line
    assert not out.exists() and _empty(tmp_path / "exports")
    assert _digest(base_run) == before
