"""The app's saved runs (issue 28, "Saved runs in the app"; item 4) through the job manager, handlers
as plain functions on a tiny model folder: every result is saved as a run folder and stays a result
of its own; opening a run folder (the CLI's, a zip) is a job that restores its mask, curves and
perplexity rows, loads the model it names, and follows the server's Trust remote code policy."""
import json
import zipfile

import pytest
import torch

from proxsparse_core import cli
from proxsparse_core.recovery.recover import RecoveryConfig
from proxsparse_core.results import DENSE, LEARNED, title
from proxsparse_core.runs import library
from proxsparse_core.runs.library import list_runs
from test_jobs import until
from test_ui_handlers import tiny_cfg, wait
from test_ui_tiny_model import save_tiny_model
from ui import compare_tab, export_tab, learn_tab, runs_panel
from ui.jobs import REMOTE_CODE_OFF, JobManager


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def cli_run(tiny_dir, tmp_path_factory):
    """A run folder written by `python -m proxsparse_core learn --out` (4 steps, measured)."""
    out = tmp_path_factory.mktemp("cli") / "demo"
    assert cli.main(["learn", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--samples", "8",
                     "--ctx", "32", "--eval-ctx", "32", "--eval-windows", "4", "--steps", "4", "--lambda1", "0.5",
                     "--lr", "0.01", "--layer-stats-every", "1", "--out", str(out)]) == 0
    return out


def masks_of(jobs, name):
    return {n: m.clone() for n, m in jobs.ws.results[name].masks.items()}


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_two_runs_and_a_stopped_third_stay_three_saved_results(tiny_dir, tmp_path):
    jobs = JobManager(runs_dir=tmp_path / "runs")
    wait(jobs.start_learning(tiny_cfg(tiny_dir), evaluate=True))
    first = masks_of(jobs, LEARNED)
    wait(jobs.start_learning(tiny_cfg(tiny_dir, steps=4, lambda1=0.4), evaluate=True))
    third = jobs.start_learning(tiny_cfg(tiny_dir, steps=100_000), evaluate=True)
    until(lambda: len(third.events) >= 2)
    jobs.stop()
    wait(third)
    assert third.status == "stopped" and third.name == "proxsparse#3"
    assert list(jobs.ws.results) == ["proxsparse", "proxsparse#2", "proxsparse#3"]
    assert same(jobs.ws.results[LEARNED].masks, first)            # the finished first run is untouched
    steps = [jobs.ws.results[n].info["steps"] for n in jobs.ws.results]
    assert steps[:2] == [3, 4] and steps[2] == len(third.events)

    runs = list_runs(jobs.runs_dir)                                # three run folders, newest first
    assert [r.steps for r in runs] == steps[::-1] and all(r.perplexity and r.dense for r in runs)
    assert runs[0].status == "stopped" and set(jobs.saved) == set(jobs.ws.results)
    assert "Run folder" in learn_tab.info_markdown(third) and str(jobs.saved["proxsparse#3"]) in third.state["saved"]
    titles = list(compare_tab.perplexity_table(jobs)["method"])
    assert titles == ["Dense (unpruned)", "ProxSparse (learned 2:4)", "ProxSparse (learned 2:4) · run 2",
                      "ProxSparse (learned 2:4) · run 3"]
    assert [n for _, n in export_tab.result_choices(jobs)] == list(jobs.ws.results)
    assert jobs.default_result() == "proxsparse#3"                 # the lists open on the newest mask
    frame = runs_panel.runs_frame(jobs)
    assert list(frame["steps"]) == [f"{steps[2]} (stopped)", "4", "3"]


def test_a_recovery_row_names_its_mask_after_a_new_run_and_is_saved_with_it(tiny_dir, tmp_path):
    jobs = JobManager(runs_dir=tmp_path / "runs")
    wait(jobs.start_learning(tiny_cfg(tiny_dir), evaluate=False))
    job = compare_tab.start_recovery(jobs, LEARNED, RecoveryConfig(method="obs"))
    wait(job)
    assert job.result == "proxsparse+recovery" and "saved as" in job.message
    wait(jobs.start_learning(tiny_cfg(tiny_dir, seed=2), evaluate=False))
    assert list(jobs.ws.results) == ["proxsparse", "proxsparse+recovery", "proxsparse#2"]
    recovered = jobs.ws.results["proxsparse+recovery"]
    assert recovered.info["base"] == LEARNED and same(recovered.masks, jobs.ws.results[LEARNED].masks)
    assert not same(recovered.masks, jobs.ws.results["proxsparse#2"].masks)
    assert title("proxsparse+recovery").startswith("ProxSparse + recovery")
    again = compare_tab.start_recovery(jobs, "proxsparse#2", RecoveryConfig(method="obs"))
    wait(again)
    assert again.result == "proxsparse#2+recovery" and title(again.result).startswith("ProxSparse · run 2 + recovery")
    folder = jobs.saved["proxsparse#2+recovery"]
    recipe = json.loads((folder / "recipe.json").read_text())
    assert (folder / "weights.safetensors").is_file() and recipe["base_run"] == str(jobs.saved["proxsparse#2"])
    assert recipe["method"] == "proxsparse+recovery" and recipe["base_result"] == "proxsparse#2"


def test_a_failed_start_keeps_the_learn_tabs_charts(tiny_dir, tmp_path):
    jobs = JobManager(runs_dir=tmp_path / "runs")
    good = jobs.start_learning(tiny_cfg(tiny_dir), evaluate=False)
    wait(good)
    bad = jobs.start_learning(tiny_cfg(tiny_dir, model=str(tmp_path / "no-such-model")), evaluate=False)
    wait(bad)
    assert bad.status == "failed" and jobs.job is bad
    view = learn_tab.render(jobs.job)
    assert list(view.loss_plot.data[0].y) == [e["lm_loss"] for e in good.events]        # still the last run's
    assert "FAILED" in view.progress.upper() and "Error" in view.info


def test_a_full_disk_never_fails_the_run(tiny_dir, tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(library, "save_masks", full)
    jobs = JobManager(runs_dir=tmp_path / "runs")
    job = jobs.start_learning(tiny_cfg(tiny_dir), evaluate=False)
    wait(job)
    assert job.status == "finished" and LEARNED in jobs.ws.results
    assert job.state["saved"].startswith("⚠ not saved: the disk is full") and "\n" not in job.state["saved"]
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_cli_run_folder_opens_as_a_job_with_its_curves_rows_and_model(tiny_dir, cli_run, tmp_path):
    other = save_tiny_model(tmp_path / "other-model")              # another model is loaded first
    jobs = JobManager(runs_dir=tmp_path / "runs")
    wait(jobs.start_learning(tiny_cfg(other), evaluate=False))
    frames = list(runs_panel.stream_open(jobs, str(cli_run)))
    final = frames[-1]
    name = "proxsparse#demo"
    assert "Opened" in final.runs_status and "Learn" in final.runs_status
    assert jobs.ws.lm.source == str(tiny_dir) and list(jobs.ws.results) == [name]    # the run's model
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert jobs.ws.ppl[name] == metrics["perplexity"][LEARNED] and jobs.ws.ppl[DENSE] == metrics["perplexity"][DENSE]
    table = compare_tab.perplexity_table(jobs)
    assert list(table["method"]) == ["Dense (unpruned)", "ProxSparse (learned 2:4) · demo"]
    assert list(table["held-out perplexity"]) == [round(metrics["perplexity"][DENSE], 3),
                                                  round(metrics["perplexity"][LEARNED], 3)]
    assert jobs.verified[name] and jobs.job.name == name and len(jobs.job.events) == 4
    assert list(final.loss_plot.data[0].y) == [e["lm_loss"] for e in jobs.job.events]     # the Learn tab's chart
    assert "step <b>4 / 4</b>" in final.progress and "opened from" in final.progress
    assert [n for _, n in export_tab.result_choices(jobs)] == [name]
    assert export_tab._events_for(jobs, name) == jobs.curves[name]
    assert learn_tab.last_run_form(jobs)["steps"] == 4                # the form shows the run's settings
    reattached = list(runs_panel.attach_open(jobs))                    # a reloaded page
    assert reattached[-1].runs_status == final.runs_status
    again = list(runs_panel.stream_open(jobs, str(cli_run)))[-1]      # open twice: the same result
    assert "open already" in again.runs_status and list(jobs.ws.results) == [name]


def test_a_zip_upload_opens_and_a_hostile_one_is_refused(cli_run, tmp_path):
    jobs = JobManager(runs_dir=tmp_path / "runs")
    good = tmp_path / "demo.zip"
    with zipfile.ZipFile(good, "w") as z:
        for p in cli_run.iterdir():
            z.write(p, f"demo/{p.name}")
    final = list(runs_panel.stream_open(jobs, upload=str(good)))[-1]
    assert "Opened" in final.runs_status and len(jobs.ws.results) == 1
    [entry] = list_runs(jobs.runs_dir)
    assert entry.path.name.endswith("unzipped-demo") and entry.steps == 4
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("demo/../../evil.json", "{}")
    with pytest.raises(Exception, match="leads outside its folder"):
        list(runs_panel.stream_open(jobs, upload=str(bad)))
    assert jobs.last("open").status == "failed" and len(list_runs(jobs.runs_dir)) == 1


def test_opening_follows_the_servers_remote_code_policy(cli_run, tmp_path):
    import shutil

    run = tmp_path / "remote"
    shutil.copytree(cli_run, run)
    recipe = json.loads((run / "recipe.json").read_text())
    recipe["config"]["trust_remote_code"] = True
    (run / "recipe.json").write_text(json.dumps(recipe))
    jobs = JobManager(runs_dir=tmp_path / "runs")
    with pytest.raises(Exception, match="Trust remote code is off"):
        list(runs_panel.stream_open(jobs, str(run)))
    assert jobs.last("open").message == REMOTE_CODE_OFF and jobs.ws.lm is None


def test_opening_while_a_run_learns_is_refused_at_once(tiny_dir, cli_run, tmp_path):
    from ui.jobs import Busy

    jobs = JobManager(runs_dir=tmp_path / "runs")
    job = jobs.start_learning(tiny_cfg(tiny_dir, steps=100_000), evaluate=False)
    try:
        until(lambda: job.events)
        with pytest.raises(Busy, match="learning a mask"):
            runs_panel.start_open(jobs, str(cli_run))
    finally:
        jobs.stop()
        wait(job)


def test_the_run_picker_follows_the_newest_run_unless_the_user_picked_one(cli_run, tmp_path):
    """Built when the page was, the picker's value used to stay on the run that was newest then: after a
    new run, Open opened an older one while the table showed the new one on top. Opening the tab now
    picks the newest run; Refresh keeps the user's pick while it is still listed."""
    import os
    import shutil

    jobs = JobManager(runs_dir=tmp_path / "runs")
    old = shutil.copytree(cli_run, jobs.runs_dir / "20260101-000000-proxsparse")
    os.utime(old / "recipe.json", (1, 1))                                                # saved long ago
    assert runs_panel.list_update(jobs)["runs_choice"]["value"] == str(old)
    new = shutil.copytree(cli_run, jobs.runs_dir / "20260102-000000-proxsparse")       # a run saved since
    assert [p for _, p in runs_panel.run_choices(jobs)] == [str(new), str(old)]
    assert runs_panel.list_update(jobs)["runs_choice"]["value"] == str(new)              # the tab opened
    assert runs_panel.list_update(jobs, str(old))["runs_choice"]["value"] == str(old)    # Refresh, old picked
    shutil.rmtree(old)
    assert runs_panel.list_update(jobs, str(old))["runs_choice"]["value"] == str(new)    # gone: the newest
    assert runs_panel.list_update(jobs, ["not", "a", "path"])["runs_choice"]["value"] == str(new)


def test_a_recovered_run_opened_on_its_own_gives_the_lecture_all_three_columns(cli_run, tmp_path):
    """A lecture prepared elsewhere: only the recover folder is copied over. Opening it also puts its
    mask on the original weights in place (once), so lecture mode shows dense, mask only and
    recovered; opened beside the run it recovered, that run's mask is used and nothing is added."""
    from ui import lecture

    rec = tmp_path / "rec"
    assert cli.main(["recover", "--run", str(cli_run), "--method", "obs", "--out", str(rec)]) == 0
    jobs = JobManager(runs_dir=tmp_path / "runs")
    final = list(runs_panel.stream_open(jobs, str(rec)))[-1]
    assert "Opened" in final.runs_status, final.runs_status
    recovered = "proxsparse+recovery#rec"
    names = list(jobs.ws.results)
    assert recovered in names and len(names) == 2, names
    mask_only = next(n for n in names if n != recovered)
    assert jobs.ws.results[mask_only].weights is None and jobs.verified[mask_only]
    assert same(jobs.ws.results[mask_only].masks, jobs.ws.results[recovered].masks)
    recorded = json.loads((rec / "metrics.json").read_text())          # the mask's row, as the run measured it
    assert jobs.ws.ppl[mask_only] == recorded["perplexity"][LEARNED] != jobs.ws.ppl[recovered]
    assert lecture.columns(jobs, lecture.check_base(jobs, None)) == {"dense": DENSE, "mask": mask_only,
                                                                       "recovered": recovered}
    list(runs_panel.stream_open(jobs, str(rec)))                     # opened again: nothing new
    assert list(jobs.ws.results) == names

    beside = JobManager(runs_dir=tmp_path / "runs2")
    list(runs_panel.stream_open(beside, str(cli_run)))
    list(runs_panel.stream_open(beside, str(rec)))
    assert list(beside.ws.results) == ["proxsparse#demo", recovered]          # the run it recovered is the mask
    assert lecture.recovered_of(beside, "proxsparse#demo") == recovered
