"""Broken model folders, ids that cannot be downloaded, and names or requests the app must refuse.

A local folder's error names the folder and the file at fault (never "offline" or "download");
only a hub id may be explained as offline, and then at once instead of after ~23 s of retries.
Over the API, an unknown result name is an error, and a heavy request while another long job
holds the machine is answered "busy" (never "complete" with an earlier run's card).
Offline: tiny models saved in the test (test_ui_tiny_model)."""
import json
import shutil
import socket
import time

import pytest

from proxsparse_core.config import RunConfig
from proxsparse_core.errors import UserError
from proxsparse_core.models.loading import load_model
from proxsparse_core.results import LEARNED
from test_ui_tiny_model import save_tiny_model

BAD_WORDS = ("offline", "download", "reachable")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def copy_of(tiny_dir, tmp_path, name="broken"):
    return shutil.copytree(tiny_dir, tmp_path / name)


def load_error(folder) -> str:
    with pytest.raises(UserError) as caught:
        load_model(str(folder), "cpu", "float32")
    said = str(caught.value)
    assert not any(w in said.lower() for w in BAD_WORDS), said
    assert repr(str(folder)) in said, said           # the folder, as given
    return said


# ---------------------------------------------------------------------------- local folders

def test_malformed_config_json_names_the_folder_the_file_and_the_line(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path)
    (folder / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": ,\n}\n')
    said = load_error(folder)
    assert "config.json is not valid JSON (line 3" in said, said
    (folder / "config.json").write_text("[1, 2]")
    assert "config.json is not a JSON object" in load_error(folder)
    (folder / "config.json").write_bytes(b"\xff\xfe\x00 not text")
    assert "config.json is not UTF-8 text" in load_error(folder)


def test_corrupt_safetensors_header_names_the_file(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"{not json at all" + data[24:])        # the header's JSON
    said = load_error(folder)
    assert "model.safetensors is not a readable safetensors file (" in said, said
    weights.write_bytes((2 ** 60).to_bytes(8, "little") + data[8:])        # an absurd header length
    assert "model.safetensors is not a readable safetensors file" in load_error(folder)
    weights.write_bytes(data[: len(data) // 2])                            # cut short
    assert "model.safetensors is not a readable safetensors file" in load_error(folder)


def test_missing_or_broken_files_are_named(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path, "no-tokenizer")
    (folder / "tokenizer.json").unlink()
    assert "no tokenizer file" in load_error(folder)

    folder = copy_of(tiny_dir, tmp_path, "bad-tokenizer")
    (folder / "tokenizer_config.json").write_text("{\n  nope")
    assert "tokenizer_config.json is not valid JSON (line 2" in load_error(folder)

    folder = copy_of(tiny_dir, tmp_path, "no-weights")
    (folder / "model.safetensors").unlink()
    assert "no weights file" in load_error(folder)

    folder = copy_of(tiny_dir, tmp_path, "unknown-type")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-architecture"}))
    said = load_error(folder)
    assert "config.json names the model type 'no-such-architecture'" in said, said

    folder = copy_of(tiny_dir, tmp_path, "wrong-shapes")
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_size": 2 * cfg["hidden_size"]}))
    assert "do not have the shapes config.json describes" in load_error(folder)


def test_a_missing_shard_is_named(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = copy_of(tiny_dir, tmp_path, "sharded")
    (folder / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(str(tiny_dir)).save_pretrained(folder, max_shard_size="50KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    said = load_error(folder)
    assert f"model.safetensors.index.json names {shards[-1].name}" in said and "missing" in said, said


# ---------------------------------------------------------------------------- hub ids

def test_made_up_id_fails_at_once_in_offline_mode():
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE                     # conftest sets HF_HUB_OFFLINE=1
    t0 = time.time()
    with pytest.raises(UserError, match="offline") as caught:
        load_model("someone-made/this-up-xyz", "cpu", "float32")
    assert time.time() - t0 < 3
    assert "'someone-made/this-up-xyz'" in str(caught.value) and "cache" in str(caught.value)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]                       # nothing listens there once closed


def test_unreachable_hub_fails_at_once_without_retries(monkeypatch):
    """Not in offline mode, but the hub cannot be reached: one refused request, not ~23 s of retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    t0 = time.time()
    with pytest.raises(UserError, match=r"not reachable \(offline\)"):
        load_model("someone-made/this-up-xyz", "cpu", "float32")
    assert time.time() - t0 < 3


def test_an_impossible_id_is_not_called_offline():
    with pytest.raises(UserError, match="neither a local model folder nor a Hugging Face model id"):
        load_model("not a model id", "cpu", "float32")


# ---------------------------------------------------------------------------- handlers

def test_generate_and_recover_refuse_an_unknown_result_name(tiny_dir):
    from ui import compare_tab
    from ui.jobs import Busy, JobManager

    jobs = JobManager()
    with pytest.raises(UserError, match="no result named 'proxsprase'; there is no 2:4 result yet"):
        list(compare_tab.generate_pair(jobs, "proxsprase", "hello", False, 0.7, 0.9, 4, False))
    jobs.ws.results[LEARNED] = object()                 # only the names matter before the model is touched
    try:
        with pytest.raises(UserError, match=f"no result named 'proxsprase'; the results are: {LEARNED}"):
            list(compare_tab.generate_pair(jobs, "proxsprase", "hello", False, 0.7, 0.9, 4, False))
        with pytest.raises(UserError, match="no result named 'proxsprase'"):
            list(compare_tab.recover_result(jobs, "proxsprase", "obs", 5))
        with pytest.raises(UserError, match="must be text"):
            list(compare_tab.generate_pair(jobs, ["x"], "hello", False, 0.7, 0.9, 4, False))
        assert jobs.activity is None
        # while a long job holds the machine (it may be making results), busy comes first
        with jobs.claim("learning a mask"):
            with pytest.raises(Busy, match="busy learning a mask"):
                list(compare_tab.generate_pair(jobs, "not-yet", "hello", False, 0.7, 0.9, 4, False))
            with pytest.raises(Busy, match="busy learning a mask"):
                list(compare_tab.recover_result(jobs, "not-yet", "obs", 5))
    finally:
        jobs.ws.results.clear()


# ---------------------------------------------------------------------------- over the API

def tiny_cfg(folder, **kw) -> RunConfig:
    base = dict(model=str(folder), device="cpu", dtype="float32", samples=8, ctx=32, eval_ctx=32,
                eval_windows=4, steps=3, lambda1=0.5, lr=1e-2, layer_stats_every=1)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def live(tiny_dir):
    from ui.jobs import JobManager
    from ui.layout import build_app, launch

    jobs = JobManager()
    demo = build_app(jobs, defaults=tiny_cfg(tiny_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", jobs
    finally:
        demo.close()


def api_error(client, *args, api_name: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        client.predict(*args, api_name=api_name)
    return str(caught.value)


def start_args(cfg: RunConfig) -> list:
    from ui.learn_tab import DATA_MODES, FORM

    return [DATA_MODES[0], None, "", False] + [cfg.to_dict()[n] for n in FORM]


def test_api_unknown_result_names_are_errors(live, tiny_dir):
    from gradio_client import Client

    url, jobs = live
    if LEARNED not in jobs.ws.results:                     # a real result beside the unknown name
        job = jobs.start_learning(tiny_cfg(tiny_dir).validate(), evaluate=False)
        t0 = time.time()
        while job.active and time.time() - t0 < 60:
            time.sleep(0.05)
    assert LEARNED in jobs.ws.results
    client = Client(url, verbose=False)
    said = api_error(client, "nope-result", "hello", False, 0.7, 0.9, 8, False, False, api_name="/generate")
    assert said.startswith("no result named 'nope-result'"), said
    said = api_error(client, "nope-result", "obs", 5, 0, 1, 0.05, "stored", 0, api_name="/recover")
    assert "nope-result" in said, said
    said = api_error(client, "nope-result", "", False, False, api_name="/export")
    assert "nope-result" in said, said
    said = api_error(client, ["nope-method"], api_name="/perplexity")
    assert "One-shot baselines to add must be a list of" in said and "nope-method" in said, said
    assert jobs.activity is None


def test_api_start_during_another_long_job_answers_busy(live, tiny_dir):
    from gradio_client import Client

    url, jobs = live
    client = Client(url, verbose=False)
    args = start_args(tiny_cfg(tiny_dir))
    done = client.predict(*args, api_name="/start")          # an earlier run, finished
    assert "finished" in done[0] and jobs.job is not None and not jobs.learning
    earlier = jobs.job
    for activity in ("recovering weights", "computing perplexities", "exporting", "measuring 2:4 speed",
                     "generating text"):
        with jobs.claim(activity):
            t0 = time.time()
            said = api_error(client, *args, api_name="/start")
            assert f"the machine is busy {activity}" in said and time.time() - t0 < 10, (activity, said)
        assert jobs.job is earlier                              # nothing started
    # while a run learns, a second /start over the API is refused too (the page watches it live)
    job = jobs.start_learning(tiny_cfg(tiny_dir, steps=100_000, layer_stats_every=50).validate(), evaluate=False)
    try:
        said = api_error(client, *args, api_name="/start")
        assert "the machine is busy learning a mask" in said and jobs.job is job and job.active, said
    finally:
        jobs.stop()
        t0 = time.time()
        while job.active and time.time() - t0 < 60:
            time.sleep(0.05)
    assert not job.active and jobs.activity is None
