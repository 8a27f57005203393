"""Measured times shown next to presets and recovery lengths, read from the one file the benchmarks
write (`bench/measured.json`: seconds, what was timed, date, machine, command).

Code, presets and labels never carry a measured number of their own: they ask `describe(key)`,
which says "measured 3.8 min on 2 CPU cores, 2026-12-05" or nothing when the file or the figure
is missing (an installed package without bench/). Keys are `learn:<preset>:<cpu|gpu>` (and
`learn:<preset>:cpu-float32`, measured on a CPU without native bf16, which such a CPU is shown),
`recover:<length>:<cpu|gpu>` and `eval:bundled:<cpu|gpu>` (held-out perplexity of one model after
learning, with the windows and tokens it read: bench/eval_time.py's record; the Learn tab's ETA
estimates that part from the run's own pace instead, progress.scoring_seconds).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

FILE = Path(__file__).resolve().parent.parent / "bench" / "measured.json"
MAX_BYTES = 2**20


@lru_cache(maxsize=1)
def figures() -> dict:
    """key → figure dict; {} when the file is absent or unreadable (it is informative only)."""
    try:
        if not FILE.is_file() or FILE.stat().st_size > MAX_BYTES:
            return {}
        data = json.loads(FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    found = data.get("figures") if isinstance(data, dict) else None
    return {k: v for k, v in found.items() if isinstance(v, dict)} if isinstance(found, dict) else {}


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe(key: str) -> str:
    """'measured 3.8 min on 2 CPU cores, 2026-12-05', or '' when nothing was recorded; a figure's
    optional "note_seconds" (a part of it, e.g. text written only the first time) adds
    '; <note> <duration> of it' with its "note" words."""
    f = figures().get(key)
    if not f or not isinstance(f.get("seconds"), (int, float)) or isinstance(f.get("seconds"), bool):
        return ""
    text = f"measured {duration(float(f['seconds']))} on {f.get('machine', '?')}, {f.get('date', '?')}"
    part, note = f.get("note_seconds"), f.get("note")
    if isinstance(part, (int, float)) and not isinstance(part, bool) and isinstance(note, str) and note:
        text += f"; {duration(float(part))} of it {note}"
    return text


def seconds(key: str) -> float | None:
    f = figures().get(key)
    v = f.get("seconds") if f else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def record(key: str, figure: dict) -> Path:
    """Write one figure into bench/measured.json (what the bench scripts' --record does), in the
    file's own format (one figure a line) and keeping every other figure; the date is added when
    the figure has none. Returns the file."""
    import datetime

    data = json.loads(FILE.read_text(encoding="utf-8"))
    figure.setdefault("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    data["figures"][key] = figure
    lines = [f"    {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in data["figures"].items()]
    FILE.write_text('{\n  "about": ' + json.dumps(data["about"], ensure_ascii=False) + ',\n  "figures": {\n'
                    + ",\n".join(lines) + "\n  }\n}\n", encoding="utf-8")
    figures.cache_clear()
    return FILE


def cpu_name() -> str:
    """This machine's processor, as the bench scripts name it next to a figure."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
