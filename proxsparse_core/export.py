"""The public entry point for exported models: every model card says
`from proxsparse_core.export import load_with_masks` (the original model with the 1-bit masks
applied). The code lives in proxsparse_core/runs/export.py and proxsparse_core/reopen.py."""
from proxsparse_core.reopen import export_run  # noqa: F401
from proxsparse_core.runs.export import export_result, load_with_masks  # noqa: F401
