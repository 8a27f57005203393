"""Kept for models exported before the package was arranged in folders: their model cards say
`from proxsparse_core.export import load_with_masks`. The code lives in proxsparse_core/runs/export.py."""
from proxsparse_core.runs.export import export_result, export_run, load_with_masks  # noqa: F401
