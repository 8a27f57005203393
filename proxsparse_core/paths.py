"""Where the studio keeps files it makes once and reuses: converted models, self-written text,
built kernels. `$PROXSPARSE_CACHE` overrides the default `~/.cache/proxsparse`. The app saves every
result it makes as a run folder under `runs_dir()`: `$PROXSPARSE_RUNS`, else `<cache>/runs`."""
from __future__ import annotations

import os
from pathlib import Path

RUNS_ENV = "PROXSPARSE_RUNS"


def cache_dir() -> Path:
    return Path(os.environ.get("PROXSPARSE_CACHE", Path.home() / ".cache" / "proxsparse"))


def runs_dir() -> Path:
    """The folder the app saves its run folders in (and lists them from)."""
    given = os.environ.get(RUNS_ENV, "").strip()
    return Path(given).expanduser() if given else cache_dir() / "runs"
