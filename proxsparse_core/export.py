"""The public entry point for exported models: every model card says
`from proxsparse_core.export import load_with_masks` (the original model with the 1-bit masks
applied), and `export_run` (a run folder exported in one call). The code lives in
proxsparse_core/runs/export.py and proxsparse_core/reopen.py."""
from proxsparse_core import reopen
from proxsparse_core.runs.export import export_result, load_with_masks  # noqa: F401
from proxsparse_core.workspace import Workspace


def export_run(run, out, **options):
    """Export a run folder (reopen.export_run) into a fresh Workspace."""
    return reopen.export_run(run, out, Workspace(), **options)
