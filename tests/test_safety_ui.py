"""The app is safe to leave running: tried as a hostile API client and as a careless user.

Most cases drive a running app over HTTP or with gradio_client: the app is launched in this
process (so a test can slow the model down or look at the job manager), or as `python app.py`
in a subprocess where the command line itself is under test. Every refusal must arrive as one
clear line naming the widget, never as `{"error": null}`, a silent queue or a traceback.
"""
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from proxsparse_core.config import RunConfig
from proxsparse_core.errors import UserError
from proxsparse_core.results import LEARNED
from test_ui_tiny_model import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_cfg(folder, **kw) -> RunConfig:
    base = dict(model=str(folder), device="cpu", dtype="float32", samples=8, ctx=32, eval_ctx=32,
                eval_windows=4, steps=3, lambda1=0.5, lr=1e-2, layer_stats_every=1)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def live(tiny_dir):
    """The app, launched in this process exactly as app.py launches it; yields (url, jobs)."""
    from ui.jobs import JobManager
    from ui.layout import build_app, launch

    jobs = JobManager()
    demo = build_app(jobs, defaults=tiny_cfg(tiny_dir))
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", jobs
    finally:
        demo.close()


def http_call(url: str, api: str, data: list, timeout: float = 60) -> tuple[str, object]:
    """Call an endpoint the way any HTTP client can (NaN and Infinity included, which
    gradio_client refuses to send); returns the final server-sent event and its data."""
    body = json.dumps({"data": data}).encode()        # json.dumps writes NaN / Infinity as is
    req = urllib.request.Request(f"{url}gradio_api/call/{api}", body, {"Content-Type": "application/json"})
    event_id = json.load(urllib.request.urlopen(req, timeout=timeout))["event_id"]
    stream = urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event_id}", timeout=timeout).read().decode()
    events = [dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
              for block in stream.split("\n\n") if block.strip()]
    last = [e for e in events if e.get("event") in ("complete", "error")][-1]
    return last["event"], json.loads(last["data"])


def api_error(client, *args, api_name: str) -> str:
    """The error message an API call gets (the call must fail)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        client.predict(*args, api_name=api_name)
    return str(caught.value)


def start_args(cfg: RunConfig, **change) -> list:
    """/start's inputs: data mode, upload, HF dataset, evaluate, then the form (ui.learn_tab.FORM)."""
    from ui.learn_tab import DATA_MODES, FORM

    head = {"mode": DATA_MODES[0], "upload": None, "hf": "", "evaluate": False}
    head.update({k: v for k, v in change.items() if k in head})
    return list(head.values()) + [change.get(n, getattr(cfg, n)) for n in FORM]


# ----------------------------------------------------------------------------- 1. remote code

def evil_model(folder: Path, marker: Path) -> Path:
    """A model folder whose config.json names its own Python code (auto_map); the code writes
    `marker` when it is imported, i.e. when the app runs it."""
    save_tiny_model(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('the model folder ran its own code')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class EvilConfig(LlamaConfig):\n    pass\n\n\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return folder


def test_remote_code_never_runs_unless_the_server_was_started_to_allow_it(live, tmp_path):
    from gradio_client import Client

    url, jobs = live
    marker = tmp_path / "ran.txt"
    evil = evil_model(tmp_path / "evil", marker)
    client = Client(url, verbose=False)
    for value in ("false", "no", 0):        # truthy strings and numbers are not booleans
        said = api_error(client, str(evil), "cpu", "float32", value, "", api_name="/inspect_model")
        assert said == f"Trust remote code must be true or false, got {value!r}"
        said = api_error(client, *start_args(tiny_cfg(evil), trust_remote_code=value), api_name="/start")
        assert said == f"Trust remote code must be true or false, got {value!r}"
    for api, args in (("/inspect_model", [str(evil), "cpu", "float32", True, ""]),
                      ("/start", start_args(tiny_cfg(evil), trust_remote_code=True))):
        said = api_error(client, *args, api_name=api)
        assert "this server was started without --allow-remote-code" in said
    assert not marker.exists() and jobs.job is None and jobs.activity is None


def test_app_flag_decides_remote_code_and_the_checkbox_says_why(monkeypatch):
    import app
    import ui.layout
    from proxsparse_core.models import loading as models

    built = {}
    monkeypatch.setattr(ui.layout, "launch", lambda demo, **kw: built.update(demo=demo, **kw))
    monkeypatch.setattr(app, "_stop_on_sigterm", lambda: None)

    def checkbox(demo):
        import gradio as gr
        return next(b for b in demo.blocks.values()
                    if isinstance(b, gr.Checkbox) and b.label == "Trust remote code")

    app.run(["--port", "0"])
    box = checkbox(built["demo"])
    assert built["demo"].jobs.allow_remote_code is False
    assert box.interactive is False and "started without --allow-remote-code" in box.info
    gate = getattr(models, "remote_code_allowed", None)
    try:
        app.run(["--port", "0", "--allow-remote-code"])
        assert built["demo"].jobs.allow_remote_code is True
        assert checkbox(built["demo"]).interactive is not False
        if gate is not None:                   # the process-wide gate of proxsparse_core, where present
            assert gate() is True
    finally:
        if hasattr(models, "allow_remote_code"):
            models.allow_remote_code(False)
    with pytest.raises(TypeError):
        from ui.jobs import JobManager
        JobManager(allow_remote_code="yes")


def test_an_allowed_server_does_run_remote_code_when_asked(tmp_path):
    """The flag really opens the gate (so the refusals above are the policy, not a broken load).
    In a subprocess, so the model's code is cached in the test's folder, not in ~/.cache."""
    marker = tmp_path / "ran.txt"
    evil = evil_model(tmp_path / "evil", marker)
    script = f"""
from proxsparse_core.models import loading as models
from proxsparse_core.config import RunConfig
from proxsparse_core.errors import UserError
from ui.jobs import JobManager
if hasattr(models, "allow_remote_code"):
    models.allow_remote_code(True)
jobs = JobManager(allow_remote_code=True)
with jobs.claim("test"):
    try:
        jobs.ensure_loaded(RunConfig(model={str(evil)!r}, device="cpu", dtype="float32", trust_remote_code=True))
    except UserError:
        pass        # whether the odd model loads does not matter here
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert out.returncode == 0 and marker.exists(), out.stderr[-2000:]


# ----------------------------------------------------------------------------- 6. bad values through the API

NAN, INF = float("nan"), float("inf")
BAD_START = [   # (setting, value, message)
    ("steps", "ten", "Steps must be a whole number, got 'ten'"),
    ("steps", NAN, "Steps must be a whole number, got nan"),
    ("steps", [1], "Steps must be a whole number, got [1]"),
    ("steps", None, "Steps is empty"),
    ("batch", "x", "Batch size must be a whole number, got 'x'"),
    ("samples", 1.5, "Calibration samples must be a whole number, got 1.5"),
    ("ctx", INF, "Tokens per sample must be a whole number, got inf"),
    ("lr", "ten", "Learning rate must be a number, got 'ten'"),
    ("lr", NAN, "Learning rate must be a number, got nan"),
    ("lambda1", [0.1], "λ1 · 2:4 regulariser must be a number, got [0.1]"),
    ("lambda1", None, "λ1 · 2:4 regulariser is empty"),
    ("lambda1", -3, "λ1 · 2:4 regulariser must be ≥ 0, got -3.0"),
    ("grad_ckpt", "no", "Gradient checkpointing must be true or false, got 'no'"),
    ("model", 5, "Model must be text, got 5"),
    ("model", "m" * 5000, "Model is 5,000 characters long; the limit is 1,000"),
    ("evaluate", "false", "Measure held-out perplexity after learning must be true or false, got 'false'"),
    ("mode", "everything", "Calibration data must be one of: built-in text, upload a file, HF dataset, "
                           "built-in + the model's own text; "
                           "got 'everything'"),
]


@pytest.mark.parametrize("name,value,message", BAD_START, ids=[f"{n}={v!r:.12}" for n, v, _ in BAD_START])
def test_bad_learn_settings_through_the_api_name_the_widget(live, tiny_dir, name, value, message):
    url, jobs = live
    event, data = http_call(url, "start", start_args(tiny_cfg(tiny_dir), **{name: value}))
    assert (event, data) == ("error", {**data, "error": message})
    assert jobs.job is None


GEN = [None, "hello", False, 0.7, 0.9, 16, False, False]   # variant, prompt, sample, temperature, top-p, max new, chat, block repeats
BAD_OTHER = [   # (endpoint, inputs, message)
    ("generate", {5: "ten"}, "Max new tokens must be a whole number, got 'ten'"),
    ("generate", {5: NAN}, "Max new tokens must be a whole number, got nan"),
    ("generate", {5: None}, "Max new tokens must be a whole number, got None"),
    ("generate", {3: "hot"}, "Temperature must be a number, got 'hot'"),
    ("generate", {4: [1]}, "Top-p must be a number, got [1]"),
    ("generate", {2: "false"}, "Sample (off = greedy) must be true or false, got 'false'"),
    ("generate", {7: "yes"}, "Block repeats must be true or false, got 'yes'"),
    ("prox_demo", {4: NAN}, "λ (regulariser strength) must be a number, got nan"),
    ("prox_demo", {4: INF}, "λ (regulariser strength) must be a number, got inf"),
    ("prox_demo", {4: "strong"}, "λ (regulariser strength) must be a number, got 'strong'"),
    ("prox_demo", {4: 7}, "λ (regulariser strength) must be between 0 and 5, got 7"),
    ("prox_demo", {0: NAN}, "w1 must be a number, got nan"),
    ("export", {2: "false"}, "Replace an existing folder of that name must be true or false, got 'false'"),
    ("perplexity", {0: "magnitude"}, "One-shot baselines to add must be a list of: "),
    ("inspect_model", {1: 5}, "Device must be text, got 5"),
    ("inspect_model", {0: "m" * 5000}, "Model is 5,000 characters long; the limit is 1,000"),
    ("recover", {3: -5}, "Fine-tuning samples must be between 0 and 1000000, got -5"),
    ("recover", {3: "many"}, "Fine-tuning samples must be a whole number, got 'many'"),
    ("recover", {2: 2.5}, "Fine-tuning steps must be a whole number, got 2.5"),
    ("recover", {4: 0}, "Samples per step must be between 1 and 256, got 0"),
    ("recover", {4: [4]}, "Samples per step must be a whole number, got [4]"),
    ("recover", {5: NAN}, "Fine-tuning learning rate must be a number, got nan"),
    ("recover", {5: 2}, "Fine-tuning learning rate must be between 0 and 1, got 2"),
    ("recover", {6: "oracle"}, "Teacher must be one of"),
    ("recover", {6: 1}, "Teacher must be"),
    ("recover", {7: -1}, "Fresh text (tokens) must be between 0 and 50000000, got -1"),
    ("recover", {7: "1M"}, "Fresh text (tokens) must be a whole number, got '1M'"),
    ("recover", {3: 30000, 4: 128}, "a stored teacher keeps the dense model's top-64"),
]
BASE = {"generate": GEN, "prox_demo": [0.9, -0.7, 0.5, 0.3, 0.6], "export": [LEARNED, "x", False, False],
        "perplexity": [[]], "inspect_model": ["", "cpu", "float32", False, ""],
        "recover": [LEARNED, "both", 300, 300, 1, 0.002, "stored", 0]}


@pytest.mark.parametrize("api,change,message", BAD_OTHER, ids=[f"{a}-{c!s:.16}" for a, c, _ in BAD_OTHER])
def test_bad_values_in_other_endpoints_name_the_widget(live, api, change, message):
    url, jobs = live
    data = [change.get(i, v) for i, v in enumerate(BASE[api])]
    event, out = http_call(url, api, data)
    assert event == "error" and str(out.get("error")).startswith(message), out
    assert jobs.activity is None


@pytest.mark.parametrize("value", [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "/etc/passwd",
                                   {"path": "/etc/passwd"}, 5, [1]], ids=["record-not-uploaded", "path", "no-meta",
                                                                         "number", "list"])
def test_a_file_field_that_is_no_upload_is_refused_in_one_line(live, tiny_dir, value):
    """Gradio reads file fields before any handler runs; what it cannot read (or refuses: a path
    not uploaded through this server) used to reach the client as {"error": null}."""
    url, jobs = live
    for api, data in (("open_zip", [value]), ("start", start_args(tiny_cfg(tiny_dir), mode="upload a file", upload=value))):
        event, out = http_call(url, api, data)
        assert event == "error" and "must be empty or the record of a file uploaded to this server" in out["error"], out
        assert "file field “" in out["error"], out      # names the widget by its label
    assert jobs.activity is None


def test_too_few_values_are_refused_in_one_line(live):
    url, jobs = live
    event, out = http_call(url, "open_zip", [])
    assert event == "error" and out["error"] == "this endpoint takes 1 value; the request sent 0", out
    event, out = http_call(url, "start", [None, None])
    assert event == "error" and out["error"].endswith("values; the request sent 2"), out
    assert jobs.activity is None


def page_event(url: str, api: str, data: list, timeout: float = 60) -> list[dict]:
    """Fire an event as the page's own widget does (the browser sends the id of the widget that
    triggered it); returns the messages the page receives."""
    config = json.load(urllib.request.urlopen(f"{url}config", timeout=timeout))
    dep = next(d for d in config["dependencies"] if d.get("api_name") == api)
    session = uuid.uuid4().hex
    body = json.dumps({"data": data, "fn_index": dep["id"], "trigger_id": dep["targets"][0][0],
                       "session_hash": session, "event_data": None}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{url}gradio_api/queue/join", body,
                                                  {"Content-Type": "application/json"}), timeout=timeout)
    messages = []
    with urllib.request.urlopen(f"{url}gradio_api/queue/data?session_hash={session}", timeout=timeout) as stream:
        for line in stream:
            if line.startswith(b"data: "):
                messages.append(json.loads(line[6:]))
                if messages[-1].get("msg") == "process_completed":
                    return messages
    raise AssertionError(f"no process_completed in {messages}")


def test_in_the_page_a_refusal_is_a_toast_and_the_outputs_stay(live):
    """The same refusal, fired by the page's Generate button: a warning toast, and the three
    outputs untouched (a gr.Error would cover them with an "Error" pane until dismissed)."""
    url, _ = live
    messages = page_event(url, "generate", [None, "x" * 40_000, False, 0.7, 0.9, 16, False, False])
    toasts = [m for m in messages if m.get("msg") == "log"]
    assert [(t["level"], t["log"]) for t in toasts] == [
        ("warning", "Prompt is 40,000 characters long; the limit is 4,000")]
    done = messages[-1]
    assert done["success"] is True
    outputs = done["output"]["data"]
    assert len(outputs) == 3 and all(o["__type__"] == "update" and "value" not in o.get("props", o)
                                     for o in outputs)                 # gr.skip(): nothing changes


def test_prox_demo_refuses_what_it_cannot_draw():
    from ui.explain_tab import prox_demo

    for bad in (NAN, INF, -INF, "x", None, [1.0]):
        with pytest.raises(UserError, match=r"^λ \(regulariser strength\) must be"):
            prox_demo(0.9, -0.7, 0.5, 0.3, bad)
    with pytest.raises(UserError, match="^w3 must be a number, got nan"):
        prox_demo(0.9, -0.7, NAN, 0.3, 0.6)
    fig, text = prox_demo(0.9, -0.7, 0.5, 0.3, 5)           # the slider's own ends still work
    bars = [v for t in fig.data[1:3] for v in t.y if v is not None]      # kept and dropped bars
    assert "Prox output" in text and len(bars) == 4 and all(math.isfinite(v) for v in bars)


# ----------------------------------------------------------------------------- 7. limits: prompt, Stop, busy

def slow_forward(model, delay: float):
    """Make every forward pass of `model` take `delay` seconds longer; returns the undo."""
    inner = model.forward

    def forward(*a, **k):
        time.sleep(delay)
        return inner(*a, **k)
    model.forward = forward
    return lambda: setattr(model, "forward", inner)


def test_a_long_prompt_is_refused_at_once(live):
    from gradio_client import Client

    url, jobs = live
    t0 = time.time()
    said = api_error(Client(url, verbose=False), None, "x" * 40_000, False, 0.7, 0.9, 64, False, False,
                     api_name="/generate")
    assert said == "Prompt is 40,000 characters long; the limit is 4,000"
    assert time.time() - t0 < 10 and jobs.activity is None


def test_heavy_requests_hear_busy_at_once_and_stop_ends_generation(live, tiny_dir):
    from gradio_client import Client

    url, jobs = live
    with jobs.claim("test"):
        jobs.ensure_loaded(tiny_cfg(tiny_dir))
    undo = slow_forward(jobs.ws.lm.model, 0.05)          # 256 tokens ≈ 13 s
    try:
        page = Client(url, verbose=False)
        gen = page.submit(None, "hello", False, 0.7, 0.9, 256, False, False, api_name="/generate")
        deadline = time.time() + 60
        while not gen.outputs() and time.time() < deadline:   # the first tokens are streaming
            time.sleep(0.1)
        assert gen.outputs() and jobs.activity == "generating text"
        other = Client(url, verbose=False)
        for api, args in (("/perplexity", [[]]), ("/export", [LEARNED, "", False, False]),
                          ("/inspect_model", [str(tiny_dir), "cpu", "float32", False, ""]),
                          ("/generate", GEN)):
            t0 = time.time()
            said = api_error(other, *args, api_name=api)
            assert "the machine is busy generating text" in said and time.time() - t0 < 5, (api, said)
        t0 = time.time()
        other.predict(api_name="/stop_eval")
        dense, pruned, summary = gen.result(timeout=30)
        assert time.time() - t0 < 5 and "Stopped" in summary and 'class="ps-gen"' in dense
        assert jobs.activity is None
    finally:
        undo()


# ----------------------------------------------------------------------------- 8. uploads

def upload(url: str, name: str, content: bytes):
    """POST a file to the app's upload route; returns (status, the JSON answer or the error text)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{url}gradio_api/upload", body,
                                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_uploads_over_the_limit_are_refused_before_they_are_stored(live):
    from gradio.utils import get_upload_folder

    from ui.learn_tab import remove_upload

    url, _ = live
    huge = f"huge-{uuid.uuid4().hex}.txt"
    status, body = upload(url, huge, b"a" * (51 * 2**20))
    assert (status, body) == (413, "File size exceeded maximum allowed size of 52428800 bytes.")
    assert not list(Path(get_upload_folder()).rglob(huge))
    status, body = upload(url, "small.txt", b"some calibration text\n")
    assert status == 200 and Path(body[0]).read_text() == "some calibration text\n"
    remove_upload(body[0])
    config = json.load(urllib.request.urlopen(f"{url}config", timeout=30))
    assert config["max_file_size"] == 50 * 2**20               # the page refuses it before sending


def test_a_replaced_upload_is_removed_unless_a_run_uses_it(live, tmp_path):
    from ui.jobs import JobManager
    from ui.learn_tab import forget_upload, remove_upload

    url, _ = live
    first, second, third = (upload(url, f"{n}.txt", f"{n} {uuid.uuid4()}\n".encode())[1][0]
                            for n in ("first", "second", "third"))
    jobs = JobManager()
    assert forget_upload(jobs, {"path": second}, first) == second       # the page's widget sends a record
    assert not Path(first).exists() and not Path(first).parent.exists() and Path(second).exists()
    jobs.cfg = RunConfig(data=second)                                    # the last run read it: keep it
    assert forget_upload(jobs, None, second) is None and Path(second).exists()
    mine = tmp_path / "mine.txt"                                         # never a file of the user's own
    mine.write_text("mine")
    assert forget_upload(jobs, third, str(mine)) == third and mine.exists()
    for path in (second, third):
        remove_upload(path)
        assert not Path(path).exists() and not Path(path).parent.exists()


def test_a_run_still_starts_from_an_uploaded_file(live, tiny_dir, tmp_path):
    """The widgets hand their values over as sent (preprocess=False): a file arrives as the
    upload's record, and a run reads the uploaded copy."""
    from gradio_client import Client, handle_file
    from pydoc_data.topics import topics

    from ui.learn_tab import DATA_MODES, remove_upload

    url, jobs = live
    data = tmp_path / "calibration.txt"
    data.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    client = Client(url, verbose=False)
    out = client.predict(*start_args(tiny_cfg(tiny_dir, steps=2), mode=DATA_MODES[1], upload=handle_file(str(data))),
                         api_name="/start")
    assert "finished" in out[0] and jobs.job.cfg.data.endswith("calibration.txt")
    assert jobs.job.cfg.data != str(data)                  # the server's copy, not the client's path
    remove_upload(jobs.job.cfg.data)


# ----------------------------------------------------------------------------- 9. downloads

def test_each_download_replaces_the_last_in_one_app_folder(live, tiny_dir, tmp_path, monkeypatch):
    from gradio_client import Client

    from ui import export_tab

    url, jobs = live
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(export_tab, "_downloads", None)
    monkeypatch.setenv("PROXSPARSE_EXPORTS", str(tmp_path / "exports"))
    job = jobs.start_learning(tiny_cfg(tiny_dir, steps=2), evaluate=False)
    while job.active:
        time.sleep(0.05)
    client = Client(url, verbose=False)
    for name in ("first", "second"):
        text, zip_path = client.predict(job.name, name, False, False, api_name="/export")   # this run's result
        assert "Exported" in text and zip_path.endswith(f"{name}-artefacts.zip")
    folders = [p for p in tmp.iterdir() if p.name.startswith("proxsparse-download")]
    assert len(folders) == 1 and [p.name for p in folders[0].iterdir()] == ["second-artefacts.zip"]


def test_the_downloads_folder_is_removed_when_the_app_exits():
    out = subprocess.run([sys.executable, "-c", "from ui.export_tab import downloads_dir; print(downloads_dir())"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    folder = Path(out.stdout.strip())
    assert out.returncode == 0 and folder.name.startswith("proxsparse-downloads-") and not folder.exists()


# ----------------------------------------------------------------------------- 5, 14. the command line

def run_app(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,env,message", [
    (["--port", "99999"], {}, "error: argument --port: a port is a whole number from 0 to 65535, got '99999'"),
    (["--port", "http"], {}, "error: argument --port: a port is a whole number from 0 to 65535, got 'http'"),
    ([], {"GRADIO_SERVER_PORT": "99999"}, "error: GRADIO_SERVER_PORT: a port is a whole number from 0 to 65535"),
    (["--preset", "nope"], {}, "error: unknown preset 'nope'"),
])
def test_bad_command_lines_are_one_line_and_exit_2(args, env, message):
    out = run_app(*args, env=env)
    assert out.returncode == 2 and out.stderr.startswith(message), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_a_busy_port_is_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_app("--port", str(port))
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is already in use; choose another with --port (0 = any free port)")


def test_host_and_port_come_from_the_environment_unless_flags_say_otherwise():
    import app

    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8123"}
    args = app.parse_args([], env=env)
    assert (args.host, args.port) == ("0.0.0.0", 8123)
    args = app.parse_args(["--host", "127.0.0.1", "--port", "9000"], env=env)
    assert (args.host, args.port) == ("127.0.0.1", 9000)
    args = app.parse_args([], env={})
    assert (args.host, args.port) == ("127.0.0.1", 7860)


def test_the_app_listens_where_the_environment_says_and_stops_cleanly(tiny_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--model", str(tiny_dir)], cwd=ROOT,
                            env={**ENV, "GRADIO_SERVER_PORT": str(port)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.5)
        proc.terminate()                        # `kill`: Gradio closes and exit-time cleanup runs
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------- 13. imports

def test_the_app_does_not_hide_import_errors_of_its_own_modules():
    for path in [ROOT / "app.py", *sorted((ROOT / "ui").glob("*.py"))]:
        assert "except ImportError" not in path.read_text(), path
