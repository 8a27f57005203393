"""Issue 30: the Compare tab's table says when a recovered row sits beside results that were not
recovered (SparseGPT's one-shot update is not a recovery), and stops saying it once every result
in the table has been recovered with the same settings. Tiny model, handlers as plain functions."""
import pytest

from proxsparse_core.recovery.recover import RecoveryConfig
from proxsparse_core.results import LEARNED
from test_ui_handlers import tiny_cfg, wait
from test_ui_tiny_model import save_tiny_model
from ui import compare_tab
from ui.jobs import JobManager


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def test_recovered_rows_are_flagged_until_every_row_is_recovered(tiny_dir, tmp_path):
    jobs = JobManager(runs_dir=tmp_path / "runs")
    wait(jobs.start_learning(tiny_cfg(tiny_dir), evaluate=True))
    table = compare_tab.start_perplexities(jobs, ["sparsegpt"])
    wait(table)
    assert compare_tab.like_with_like(jobs) == ""               # nothing recovered yet: nothing to say
    rcfg = RecoveryConfig(method="both", steps=2, samples=0)
    job = compare_tab.start_recovery(jobs, LEARNED, rcfg)
    wait(job)
    assert job.status == "finished", job.message
    note = compare_tab.like_with_like(jobs)
    assert "SparseGPT" in note and "not recovered" in note and "ProxSparse" not in note
    view = compare_tab.recovery_view(jobs, job)
    assert view.table_note.endswith(note)                        # shown under the table when the recovery ends,
    assert "held-out windows" in view.table_note                 # after the table's own note
    assert note in compare_tab.table_view(jobs, table).table_note
    last = compare_tab.start_recovery(jobs, "sparsegpt", rcfg)
    wait(last)
    assert compare_tab.like_with_like(jobs) == ""               # recovery against recovery: nothing to flag
    assert "⚖" not in compare_tab.recovery_view(jobs, last).table_note     # and the old line is gone
