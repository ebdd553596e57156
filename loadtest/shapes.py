"""Load shapes over time, as pure functions of the elapsed run time.

Locust's LoadTestShape (in locustfile.py) asks `tick()` every second for (users, spawn rate)
and stops the test on None; the schedules here answer that without importing Locust, so they
are unit-testable and the same numbers drive every run.

- steady: `users` for the whole run.
- ramp: from 1 user up to `users` over the first 70 % of the run, then hold: where
  does latency bend as load grows?
- spike: a quarter of `users` as the baseline, all `users` for the middle fifth of the run
  (arriving within a second or two), then back: a burst, and the recovery after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SHAPES = ("steady", "ramp", "spike")

RAMP_FRACTION = 0.7
SPIKE_START, SPIKE_END = 0.4, 0.6


@dataclass(frozen=True)
class LoadSchedule:
    shape: str
    users: int
    duration_s: float
    # Users started (or stopped) per second on the way to each target; None: as fast as
    # the shape needs (the whole spike at once, the ramp's pace).
    spawn_rate: float | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if self.users < 1:
            raise ValueError("users must be >= 1")
        if self.duration_s <= 0:
            raise ValueError("duration_s must be > 0")

    def users_at(self, run_time_s: float) -> int | None:
        """Target user count at this point of the run; None once it is over."""
        if run_time_s >= self.duration_s:
            return None
        progress = run_time_s / self.duration_s
        if self.shape == "ramp":
            return max(1, math.ceil(self.users * min(1.0, progress / RAMP_FRACTION)))
        if self.shape == "spike":
            baseline = max(1, self.users // 4)
            return self.users if SPIKE_START <= progress < SPIKE_END else baseline
        return self.users

    def tick(self, run_time_s: float) -> tuple[int, float] | None:
        """(target users, spawn rate) for Locust, or None to end the test."""
        users = self.users_at(run_time_s)
        if users is None:
            return None
        return users, self.spawn_rate or float(self.users)
