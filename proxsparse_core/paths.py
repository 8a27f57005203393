"""Where the studio keeps files it makes once and reuses: converted models, self-written text,
built kernels. `$PROXSPARSE_CACHE` overrides the default `~/.cache/proxsparse`."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("PROXSPARSE_CACHE", Path.home() / ".cache" / "proxsparse"))
