"""Values that reach a handler, checked before anything uses them.

A page sends what its widgets hold, but an API client may send anything: "ten" for a number,
NaN, a list, None, or the string "false" for a checkbox (which Python would read as true). The
events of this app therefore hand their inputs over as sent (`preprocess=False`), and each
handler reads them through these functions, which either return a clean value or raise a
`UserError` that names the widget's label as the page shows it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from proxsparse_core.errors import UserError

MAX_TEXT = 1000          # characters in a one-line setting (a model id or path, a device, a name)
MAX_UPLOAD_MB = 50       # an uploaded file (Gradio refuses a larger one before storing it)
SHOWN = 40               # characters of a bad value repeated in a message


def shown(value) -> str:
    """A bad value as the message repeats it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN - 1] + "…"


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"      # whole numbers in full: 5000000, not 5e+06


def _bounds(label: str, v, lo, hi):
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        where = (f"between {_num(lo)} and {_num(hi)}" if lo is not None and hi is not None
                 else f"at least {_num(lo)}" if lo is not None else f"at most {_num(hi)}")
        raise UserError(f"{label} must be {where}, got {_num(v)}")


def number(label: str, v, lo: float | None = None, hi: float | None = None) -> float:
    """A finite real number (true/false and text are refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{label} must be a number, got {shown(v)}")
    _bounds(label, v, lo, hi)
    return float(v)


def whole(label: str, v, lo: int | None = None, hi: int | None = None) -> int:
    """A whole number; 7.0 from a number widget counts as 7."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{label} must be a whole number, got {shown(v)}")
    _bounds(label, v, lo, hi)
    return v


def flag(label: str, v) -> bool:
    """Exactly true or false: the strings "false" and "no" are not booleans."""
    if v is not True and v is not False:
        raise UserError(f"{label} must be true or false, got {shown(v)}")
    return v


def text(label: str, v, limit: int = MAX_TEXT) -> str:
    """A string of at most `limit` characters (None counts as empty)."""
    if v is None:
        return ""
    if not isinstance(v, str):
        raise UserError(f"{label} must be text, got {shown(v)}")
    if len(v) > limit:
        raise UserError(f"{label} is {len(v):,} characters long; the limit is {limit:,}")
    return v


def one_of(label: str, v, choices: Iterable[str]) -> str:
    choices = list(choices)
    if not isinstance(v, str) or v not in choices:
        raise UserError(f"{label} must be one of: {', '.join(choices)}; got {shown(v)}")
    return v


def some_of(label: str, v, choices: Iterable[str]) -> list[str]:
    """A list whose items all come from `choices` (None counts as none)."""
    choices = list(choices)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) and x in choices for x in v):
        raise UserError(f"{label} must be a list of: {', '.join(choices)}; got {shown(v)}")
    return list(v)


def upload(label: str, v) -> str | None:
    """The server-side path of an uploaded file: the widget sends a file record (a dict with a
    `path`), a script may send the path itself; None when nothing was uploaded."""
    if isinstance(v, dict):
        v = v.get("path")
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise UserError(f"{label} must be an uploaded file, got {shown(v)}")
    return v
