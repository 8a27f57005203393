"""Typed progress reports: what core code tells a caller about a long task, so that a page can
show a stage, a bar and a count without reading the words of a message.

A `Progress` *is* its message (a `str`), so every caller that only logs or prints the text —
the CLI, a test that looks for a phrase — keeps working unchanged; a caller that draws it reads
its fields instead: `stage` (a short fixed name such as "fresh-text" or "artefacts"), `done` of
`total` (counted in `unit`; total 0 when the stage has no count) and `message` (for people), and
when known `eta` (seconds left in this stage) and `eta_total` (seconds left of the whole task: this
stage and every stage still to come).

A task of several stages of very different speeds (recovery: the model writing text, the OBS update
block by block, the teacher pass, fine-tuning steps, the evaluation) gets its ETAs from a `Timeline`:
each stage's own ETA from a `RateMeter` (the mean of the middle half of its recent rates, the first
interval — the warm-up — left out), the stages to come from the work each is expected to take at the
speed measured so far.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Callable, Iterable


class Progress(str):
    """One progress report (immutable). `Progress("obs", 3, 30, "weight update: block 3/30", "blocks")`;
    `eta` / `eta_total`: seconds left in this stage / in the whole task, None while unknown."""

    __slots__ = ("stage", "done", "total", "unit", "eta", "eta_total")

    def __new__(cls, stage: str, done: int = 0, total: int = 0, message: str = "", unit: str = "",
                eta: float | None = None, eta_total: float | None = None):
        self = super().__new__(cls, message)
        for name, value in (("stage", str(stage)), ("done", int(done)), ("total", int(total)), ("unit", str(unit)),
                            ("eta", _seconds(eta)), ("eta_total", _seconds(eta_total))):
            object.__setattr__(self, name, value)
        return self

    def __setattr__(self, name, value):
        raise AttributeError("a Progress report cannot change; make a new one")

    def __reduce__(self):
        return Progress, (self.stage, self.done, self.total, self.message, self.unit, self.eta, self.eta_total)

    def __repr__(self) -> str:
        return (f"Progress(stage={self.stage!r}, done={self.done}, total={self.total}, "
                f"message={self.message!r}, unit={self.unit!r}, eta={self.eta!r}, eta_total={self.eta_total!r})")

    @property
    def message(self) -> str:
        return str.__str__(self)

    @property
    def fraction(self) -> float | None:
        """Share done (0…1), or None when the stage has no count."""
        return min(1.0, max(0.0, self.done / self.total)) if self.total > 0 else None

    def to_dict(self) -> dict:
        d = {"stage": self.stage, "done": self.done, "total": self.total, "message": self.message,
             "unit": self.unit}
        d.update({k: getattr(self, k) for k in ("eta", "eta_total") if getattr(self, k) is not None})
        return d


def _seconds(value) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def clock_text(seconds: float | None) -> str:
    """'2:05', '1:02:05'; '?' when unknown."""
    if seconds is None:
        return "?"
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def eta_text(p: Progress) -> str:
    """What a line of text says of a report's ETAs: 'ETA 12:40 in all (this stage 1:10)', or
    'ETA: estimating …' while neither is known yet ('' for a stage that has no count and no ETA)."""
    if p.eta_total is not None:
        return f"ETA {clock_text(p.eta_total)} in all" + (f" (this stage {clock_text(p.eta)})"
                                                          if p.eta is not None else "")
    if p.eta is not None:
        return f"ETA {clock_text(p.eta)} for this stage"
    return "ETA: estimating …" if p.total > 0 else ""


class RateMeter:
    """Seconds per unit of one stage, from its recent progress: an ETA that holds still.

    The first interval (the warm-up: first allocations, caches, compiled kernels; the first fine-tuning
    step on a CPU can take several times the next) is left out once a second one exists. The rate is the
    typical one — the interquartile mean, weighted by units, of the last `window` intervals' seconds per
    unit (the mean of their middle half): a few slow or fast intervals move it little, and a lasting
    change of speed (a machine that got busier) takes over within about window/2 intervals — times the
    stall factor of the stage so far: its mean rate over the interquartile mean of the same (up to
    10 × window) intervals, between 1 and 3. On a shared machine most steps take their typical time and a
    few stall for many times that (a 0.8 s step, then one of 30 s); the typical rate alone then promised
    about 0.6 of the time it took (bench/RESULTS.md, section 3). With only the warm-up interval seen, the
    rate is unknown (None): no ETA is better than the warm-up's (issue 28: 55:54, then 17:37, for the
    same recovery); `provisional` keeps the warm-up's rate for a caller that has nothing else (the first
    stage of a task, see Timeline)."""

    def __init__(self, window: int = 30):
        self.window = window
        self._last: tuple[float, float] | None = None     # (time, done) of the last report
        self._recent: deque = deque(maxlen=window)        # (seconds per unit, units) after the first interval
        self._long: deque = deque(maxlen=10 * window)     # the same, further back: for the stall factor
        self._after_warmup: tuple[float, float] | None = None   # (time, done) at the end of the first interval
        self.provisional: float | None = None     # the warm-up interval's seconds per unit: only for want of better
        self.intervals = 0

    def update(self, done: float, now: float) -> None:
        """Hear that `done` units are done at time `now` (the first call sets the start)."""
        if self._last is None:
            self._last = (now, done)
            return
        t0, d0 = self._last
        if done <= d0:                  # no progress (a repeated report): nothing to learn
            return
        self.intervals += 1
        if self.intervals > 1:
            self._recent.append(((now - t0) / (done - d0), done - d0))
            self._long.append(self._recent[-1])
        else:
            self._after_warmup = (now, done)
            self.provisional = (now - t0) / (done - d0)
        self._last = (now, done)

    @property
    def measured(self) -> tuple[float, float]:
        """(seconds, units) of everything after the warm-up interval: (0, 0) before a second interval."""
        if self._after_warmup is None or self._last is None:
            return 0.0, 0.0
        return self._last[0] - self._after_warmup[0], self._last[1] - self._after_warmup[1]

    @staticmethod
    def _middle_mean(intervals) -> float:
        """Interquartile mean of (seconds per unit, units) pairs, weighted by units."""
        ordered = sorted(intervals)
        weight = sum(w for _, w in ordered)
        lo, hi, seen, total, counted = weight / 4, 3 * weight / 4, 0.0, 0.0, 0.0
        for rate, w in ordered:          # the part of each interval's weight inside the middle half
            part = max(0.0, min(seen + w, hi) - max(seen, lo))
            total, counted, seen = total + rate * part, counted + part, seen + w
        return total / counted if counted > 0 else ordered[len(ordered) // 2][0]

    @property
    def stall_factor(self) -> float:
        if not self._long:
            return 1.0
        mean = sum(r * w for r, w in self._long) / sum(w for _, w in self._long)
        typical = self._middle_mean(self._long)
        return min(3.0, max(1.0, mean / typical)) if typical > 0 else 1.0

    @property
    def seconds_per_unit(self) -> float | None:
        if not self._recent:
            return None
        return self._middle_mean(self._recent) * self.stall_factor

    def eta(self, left: float) -> float | None:
        rate = self.seconds_per_unit
        return None if rate is None else max(0.0, left) * rate


class Timeline:
    """The stages of one long task in their order, each with the work it is expected to take, and the
    reports of the stage that runs now, as Progress with `eta` (this stage, at its own measured rate:
    RateMeter) and `eta_total` (this stage plus every stage still to come).

    `stages`: (stage, units, work per unit) in order — units counted as the stage reports them (blocks,
    tokens, steps); work in one currency for all stages (multiply-adds, say: only ratios matter). A
    report with a total updates its stage's units. Stages to come are predicted as their work times the
    seconds per unit of work measured so far (over every stage's units after its warm-up interval; in the
    first stage, before that, its warm-up rate), so the first stage has no `eta_total` until two of its
    reports with a count, and a prediction off by the work model's error is corrected as soon as that stage
    runs. A report without a count (total 0) begins its stage and measures nothing. A stage skipped (a later one reports first:
    text already cached) counts nothing; an unplanned stage counts no work. `tell` hears every report;
    `seconds()` gives each stage's measured time."""

    def __init__(self, stages: Iterable[tuple[str, float, float]], tell: Callable[[Progress], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, window: int = 30):
        self.order: list[str] = []
        self.plan: dict[str, list[float]] = {}          # stage -> [units, work per unit]
        for stage, units, per_unit in stages:
            self.order.append(stage)
            self.plan[stage] = [float(units), float(per_unit)]
        self.tell = tell or (lambda p: None)
        self.clock, self.window = clock, window
        self.current: str | None = None
        self.meters: dict[str, RateMeter] = {}
        self.start_of: dict[str, float] = {}
        self.end_of: dict[str, float] = {}
        self.skipped: set[str] = set()
        self.last: Progress | None = None

    def _enter(self, stage: str, now: float) -> None:
        if self.current is not None:
            self.end_of[self.current] = now
        if stage not in self.plan:                       # unplanned: no work of its own, placed here
            at = self.order.index(self.current) + 1 if self.current in self.order else 0
            self.order.insert(at, stage)
            self.plan[stage] = [0.0, 0.0]
        for s in self.order[:self.order.index(stage)]:
            if s not in self.start_of:
                self.skipped.add(s)
        self.current = stage
        self.meters[stage] = RateMeter(self.window)
        self.start_of[stage] = now
        self.end_of.pop(stage, None)

    def _work(self, stage: str) -> float:
        units, per_unit = self.plan[stage]
        return units * per_unit

    def seconds_per_work(self) -> float | None:
        """Seconds per unit of work measured so far: every stage's time over the work it did, both
        counted after its warm-up interval; None before anything was measured."""
        seconds = work = 0.0
        for stage, meter in self.meters.items():
            t, units = meter.measured
            if units > 0 and self.plan[stage][1] > 0:
                seconds += t
                work += units * self.plan[stage][1]
        if work > 0 and seconds > 0:
            return seconds / work
        meter = self.meters.get(self.current)           # the first stage, one interval in: its warm-up rate
        per_unit = self.plan[self.current][1] if self.current is not None else 0.0
        return meter.provisional / per_unit if meter is not None and meter.provisional and per_unit > 0 else None

    def still_to_come(self, stage: str | None = None) -> float | None:
        """Predicted seconds of the stages after `stage` (default: the current one); 0 when none is
        left, None when some work is left but no speed was measured yet."""
        stage = stage or self.current
        after = self.order[self.order.index(stage) + 1:] if stage in self.order else list(self.order)
        work = sum(self._work(s) for s in after if s not in self.skipped)
        if work <= 0:
            return 0.0
        k = self.seconds_per_work()
        return None if k is None else work * k

    def report(self, stage: str, done: int = 0, total: int = 0, message: str = "", unit: str = "") -> Progress:
        now = self.clock()
        if stage != self.current:
            self._enter(stage, now)
        if total > 0:
            self.plan[stage][0] = float(total)
        meter = self.meters[stage]
        if total > 0:                    # a report without a count measures nothing (the stage has begun)
            meter.update(done, now)
        rate, work = meter.seconds_per_unit, self._work(stage)
        if total > 0 and rate is not None:               # its own measured rate
            eta = rate * max(0, total - done)
        elif work <= 0:                                  # nothing expected of it (drawing samples)
            eta = 0.0
        else:                                            # not measured yet: its work at the speed so far
            k = self.seconds_per_work()
            eta = None if k is None else (work * k * (1 - done / total) if total > 0
                                          else max(0.0, work * k - (now - self.start_of[stage])))
        rest = self.still_to_come(stage)
        eta_total = eta + rest if eta is not None and rest is not None else None
        shown = eta if total > 0 and (rate is not None or work > 0) else None
        p = Progress(stage, done, total, message, unit, shown, eta_total)
        self.last = p
        self.tell(p)
        return p

    def counter(self, stage: str, unit: str, message: Callable[[int, int], str]) -> Callable[[int, int], None]:
        """A core `(done, total)` callback that reports `stage` here (see `counting`)."""
        def update(done: int, total: int):
            self.report(stage, done, total, message(done, total), unit)
        return update

    def finish(self) -> None:
        """The last stage ended now (for `seconds`)."""
        if self.current is not None and self.current not in self.end_of:
            self.end_of[self.current] = self.clock()

    def seconds(self) -> dict[str, float]:
        """Each stage that ran: its measured seconds (the running one: so far), in order."""
        now = self.clock()
        return {s: round(self.end_of.get(s, now) - self.start_of[s], 2) for s in self.order if s in self.start_of}


# A forward pass's share of a learning step's forward + backward: the backward computes two products
# (the input's gradient and the weight's) for every product of the forward.
FORWARD_SHARE = 1 / 3


def scoring_seconds(step_seconds: Iterable[float], tokens_per_step: int, windows: int,
                    window_tokens: int) -> float | None:
    """How long scoring `windows` held-out windows of `window_tokens` tokens takes at the pace of the
    learning steps: the median forward + backward time of the last 10 timed steps (the first left out
    when others exist: its one-off costs), per token, times FORWARD_SHARE. On the machine and model
    that run, whatever they are; None before a step was timed."""
    times = [t for t in step_seconds if isinstance(t, (int, float)) and t > 0]
    times = (times[1:] or times)[-10:]
    if not times or tokens_per_step <= 0 or windows <= 0 or window_tokens <= 0:
        return None
    return statistics.median(times) / tokens_per_step * FORWARD_SHARE * windows * window_tokens


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
