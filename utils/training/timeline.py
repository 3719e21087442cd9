"""Wall-clock marks of a training run: its set-up phases, its first and last optimizer steps, and
logs/timings.json written from them."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class Timeline:
    """Wall-clock marks of a run: set-up phases, first and last optimizer step (for logs/timings.json)."""

    started: float = field(default_factory=time.time)
    phases: dict = field(default_factory=dict)
    first_step: float | None = None
    last_step: float | None = None
    steps: int = 0
    step_marks: list = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def step_done(self) -> None:
        now = time.time()
        if self.first_step is None:
            self.first_step = now
            logger.info("First optimizer step done %.1f s after start (set-up: %s)", now - self.started,
                        ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items()))
        self.last_step = now
        self.steps += 1
        self.step_marks.append(now)

    def summary(self) -> dict:
        ended = time.time()
        rate = None
        if self.steps > 1 and self.last_step > self.first_step:
            rate = (self.steps - 1) / (self.last_step - self.first_step)
        intervals = [b - a for a, b in zip(self.step_marks[2:], self.step_marks[3:])]
        steady = 1 / sorted(intervals)[len(intervals) // 2] if intervals and min(intervals) > 0 else None
        return {"started": self.started, "first_step": self.first_step, "last_step": self.last_step,
                "ended": ended, "steps": self.steps,
                "time_to_first_step_s": None if self.first_step is None else self.first_step - self.started,
                "first_to_last_steps_per_s": rate, "steady_steps_per_s": steady, "wall_s": ended - self.started,
                "setup_phases_s": self.phases}

    def write(self, path: Path) -> dict:
        from utils.core.atomic import write_json
        summary = self.summary()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, summary)
        rate = summary["first_to_last_steps_per_s"]
        logger.info("Timing: first step after %s s, %s steps/s from the first to the last step, %.1f s in all",
                    _fmt(summary["time_to_first_step_s"]), _fmt(rate, 3), summary["wall_s"])
        return summary


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def read_timings(path: Path) -> dict:
    return json.loads(path.read_text())
