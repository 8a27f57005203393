"""End to end: `python app.py` in a subprocess, driven through its API with gradio_client.

Start a long run on a tiny model folder, receive live events, re-attach as a second page,
be refused as a second runner, stop, get a verified mask, compare generations and perplexity.
"""
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from test_ui_tiny_model import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
STEP = re.compile(r"step <b>(\d+) / (\d+)</b>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(logs: Path, *args: str, env: dict | None = None):
    """`python app.py --port <free> *args` in a subprocess; yields its URL once it answers."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **(env or {})}
    log = open(logs / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *args],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"the app did not start:\n{log.read()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on a free port with the tiny model preselected; yields (url, model folder)."""
    model = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    with running_app(tmp_path_factory.mktemp("logs"), "--model", str(model)) as url:
        yield url, model


def start_args(model: Path, **kw) -> list:
    from proxsparse_core.config import RunConfig
    from ui.learn_tab import DATA_MODES, FORM

    cfg = RunConfig(model=str(model), device="cpu", dtype="float32", samples=8, ctx=32, eval_ctx=32,
                    eval_windows=4, lambda1=0.5, lr=1e-2, layer_stats_every=2, **kw)
    return [DATA_MODES[0], None, "", True] + [getattr(cfg, n) for n in FORM]


def wait_for(job, test, timeout=90):
    """The newest output of a streaming gradio_client job once `test(output)` holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        outs = job.outputs()
        if outs and test(outs[-1]):
            return outs[-1]
        time.sleep(0.2)
    raise AssertionError(f"timed out; last output: {job.outputs()[-1:]}")


def step_of(out) -> int:
    m = STEP.search(out[0])
    return int(m.group(1)) if m else 0


def test_learn_stop_compare_through_the_api(app):
    from gradio_client import Client

    url, model = app
    page = Client(url, verbose=False)
    run = page.submit(*start_args(model, steps=100_000), api_name="/start")
    # a frame sends the loss chart only when new steps arrived since the last one: wait for one that does
    live = wait_for(run, lambda o: step_of(o) >= 3 and isinstance(o[1], dict) and o[1].get("type") == "plotly")
    assert "running" in live[0] and "ETA" in live[0] and "tokens/s" in live[0]
    loss_plot = live[1]
    assert loss_plot["type"] == "plotly" and "training loss" in loss_plot["plot"]

    # a reloaded page re-attaches to the running job and sees it advance
    reload = Client(url, verbose=False).submit(api_name="/attach")
    seen = wait_for(reload, lambda o: step_of(o) > step_of(live))
    assert "running" in seen[0]

    # a second visitor cannot start another run; they are told and watch the first one
    other = Client(url, verbose=False).submit(*start_args(model, steps=5), api_name="/start")
    assert "Another run" in wait_for(other, lambda o: "Another run" in o[0])[0]

    page.predict(api_name="/stop")
    final = wait_for(run, lambda o: "stopped" in o[0] and "Held-out perplexity" in o[5], timeout=90)
    deadline = time.time() + 30                     # the stream ends after its final frame
    while not run.done() and time.time() < deadline:
        time.sleep(0.1)
    assert run.done(), f"the run's stream did not end after Stop: {run.status().code.name}"
    assert "verified: all" in final[5]          # a stopped run is verified and measured like a finished one
    stopped_at = step_of(final)
    assert stopped_at >= step_of(seen)
    time.sleep(1.0)
    assert step_of(page.predict(api_name="/attach")) == stopped_at        # nothing ran on after Stop

    dense, pruned, summary = page.predict("proxsparse", "What is the capital of France?", False, 0.7, 0.9,
                                          16, True, False, api_name="/generate")
    assert 'class="ps-gen"' in dense and 'class="ps-gen"' in pruned and "no 2:4 model" not in pruned
    assert summary

    table, note = page.predict(["magnitude"], api_name="/perplexity")
    methods = [row[0] for row in table["data"]]
    assert methods[:2] == ["Dense (unpruned)", "ProxSparse (learned 2:4)"] and len(methods) == 3
    assert all(row[1] > 1 for row in table["data"]) and "held-out windows" in note
