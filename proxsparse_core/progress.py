"""Typed progress reports: what core code tells a caller about a long task, so that a page can
show a stage, a bar and a count without reading the words of a message.

A `Progress` *is* its message (a `str`), so every caller that only logs or prints the text —
the CLI, a test that looks for a phrase — keeps working unchanged; a caller that draws it reads
its fields instead: `stage` (a short fixed name such as "fresh-text" or "artefacts"), `done` of
`total` (counted in `unit`; total 0 when the stage has no count) and `message` (for people).
"""
from __future__ import annotations

from typing import Callable


class Progress(str):
    """One progress report (immutable). `Progress("obs", 3, 30, "weight update: block 3/30", "blocks")`."""

    __slots__ = ("stage", "done", "total", "unit")

    def __new__(cls, stage: str, done: int = 0, total: int = 0, message: str = "", unit: str = ""):
        self = super().__new__(cls, message)
        for name, value in (("stage", str(stage)), ("done", int(done)), ("total", int(total)), ("unit", str(unit))):
            object.__setattr__(self, name, value)
        return self

    def __setattr__(self, name, value):
        raise AttributeError("a Progress report cannot change; make a new one")

    def __reduce__(self):
        return Progress, (self.stage, self.done, self.total, self.message, self.unit)

    def __repr__(self) -> str:
        return (f"Progress(stage={self.stage!r}, done={self.done}, total={self.total}, "
                f"message={self.message!r}, unit={self.unit!r})")

    @property
    def message(self) -> str:
        return str.__str__(self)

    @property
    def fraction(self) -> float | None:
        """Share done (0…1), or None when the stage has no count."""
        return min(1.0, max(0.0, self.done / self.total)) if self.total > 0 else None

    def to_dict(self) -> dict:
        return {"stage": self.stage, "done": self.done, "total": self.total, "message": self.message,
                "unit": self.unit}


def as_progress(report, stage: str = "") -> Progress:
    """A report as a Progress: a plain message becomes one without a count (for callers that
    may still hand over text)."""
    return report if isinstance(report, Progress) else Progress(stage, 0, 0, str(report))


def counting(tell: Callable[[Progress], None], stage: str, unit: str,
             message: Callable[[int, int], str]) -> Callable[[int, int], None]:
    """Adapt a core `(done, total)` callback (perplexity windows, OBS blocks, …) to one that hands
    `tell` a Progress of `stage`, worded by `message(done, total)`."""
    def update(done: int, total: int):
        tell(Progress(stage, done, total, message(done, total), unit))
    return update
