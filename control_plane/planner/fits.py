"""The planner's online models, fitted from what the pools report each interval. Each keeps
its state as plain numbers (`to_state` / `from_state`): Ray Serve keeps an autoscaling
policy's state between calls as a dict, and the policy itself is pickled by value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RateForecast:
    """Holt's linear smoothing of the arrival rate: a level and a trend (per second, per
    second), so a rising load is planned for before it arrives. The forecast stays within
    ``max_growth`` times the level: after a step the trend overshoots for a few intervals,
    and a step is not a ramp that goes on for as long as an engine takes to start."""

    alpha: float = 0.5
    beta: float = 0.3
    max_growth: float = 2.0
    warmup: int = 3  # samples before the trend is extrapolated (the first ones rise from 0)
    level: float | None = None
    trend: float = 0.0
    last_at: float | None = None
    samples: int = 0

    def add(self, rate: float, at: float) -> None:
        self.samples += 1
        if self.level is None or self.last_at is None:
            self.level, self.last_at = rate, at
            return
        dt = max(1e-6, at - self.last_at)
        predicted = self.level + self.trend * dt
        level = predicted + self.alpha * (rate - predicted)
        self.trend = self.trend + self.beta * ((level - self.level) / dt - self.trend)
        self.level, self.last_at = level, at

    def forecast(self, ahead_s: float) -> float:
        if self.level is None:
            return 0.0
        if self.samples < self.warmup:
            return max(0.0, self.level)
        return max(0.0, min(self.level * self.max_growth, self.level + self.trend * ahead_s))

    def to_state(self) -> dict[str, Any]:
        return {"level": self.level, "trend": self.trend, "last_at": self.last_at, "samples": self.samples}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, **kwargs: float) -> RateForecast:
        state = state or {}
        return cls(level=state.get("level"), trend=state.get("trend", 0.0), last_at=state.get("last_at"),
                   samples=int(state.get("samples", 0)), **kwargs)


# Features of a decode step, scaled to about 1: (1, sequences / 100, context tokens / 1e5).
_SCALE = np.array([1.0, 100.0, 1e5])


@dataclass
class DecodeStepFit:
    """A decode step's seconds as ``fixed + per_seq * B + per_token * context``, fitted by
    exponentially forgotten least squares, shrunk towards the prior while samples are few
    or all alike (a pool that always runs one batch size says nothing of the others).
    TPOT at batch B with ``ctx`` context tokens per sequence is then
    ``fixed + B * (per_seq + per_token * ctx)``."""

    prior: tuple[float, float, float]  # (fixed_s, per_seq_s, per_context_token_s)
    forget: float = 0.97  # weight of a sample one interval older
    ridge: float = 1e-3
    xx: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    xy: np.ndarray = field(default_factory=lambda: np.zeros(3))
    samples: int = 0

    def add(self, sequences: float, context_tokens: float, step_s: float, weight: float = 1.0) -> None:
        if sequences <= 0 or step_s <= 0 or not np.isfinite(step_s):
            return
        x = np.array([1.0, sequences, context_tokens]) / _SCALE
        self.xx = self.forget * self.xx + weight * np.outer(x, x)
        self.xy = self.forget * self.xy + weight * x * step_s
        self.samples += 1

    def coefficients(self) -> tuple[float, float, float]:
        """Least squares with every coefficient non-negative (a step never gets faster
        with more work). Sequences and context tokens move together when the mix is
        steady, so the unconstrained solution can trade one against the other, one of them
        negative: the best of the fits without the offending terms is taken instead."""
        prior = np.array(self.prior) * _SCALE
        xx = self.xx + self.ridge * np.eye(3)
        xy = self.xy + self.ridge * prior
        best: tuple[float, np.ndarray] | None = None
        for keep in ((0, 1, 2), (0, 1), (0, 2), (0,)):
            idx = list(keep)
            theta = np.zeros(3)
            theta[idx] = np.linalg.solve(xx[np.ix_(idx, idx)], xy[idx])
            if (theta < 0).any():
                continue
            loss = float(theta @ xx @ theta - 2 * theta @ xy)
            if best is None or loss < best[0]:
                best = (loss, theta)
        theta = best[1] if best is not None else prior
        fixed, per_seq, per_token = (theta / _SCALE).tolist()
        return max(fixed, 1e-5), per_seq, per_token

    def tpot(self, batch: float, context_per_seq: float) -> float:
        fixed, per_seq, per_token = self.coefficients()
        return fixed + batch * (per_seq + per_token * context_per_seq)

    def max_batch(self, tpot_s: float, context_per_seq: float, cap: int) -> int:
        """The most sequences one engine decodes with each step within ``tpot_s``."""
        fixed, per_seq, per_token = self.coefficients()
        slope = per_seq + per_token * context_per_seq
        if fixed >= tpot_s:
            return 1
        if slope <= 0:
            return cap
        return int(max(1, min(cap, (tpot_s - fixed) // slope)))

    def to_state(self) -> dict[str, Any]:
        return {"xx": self.xx.tolist(), "xy": self.xy.tolist(), "samples": self.samples}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, prior: tuple[float, float, float]) -> DecodeStepFit:
        fit = cls(prior=prior)
        if state:
            fit.xx = np.array(state["xx"], dtype=float)
            fit.xy = np.array(state["xy"], dtype=float)
            fit.samples = int(state.get("samples", 0))
        return fit


@dataclass
class Ema:
    """An exponentially weighted mean (None until a sample) and how many samples it has
    taken (None and non-finite ones are skipped)."""

    alpha: float = 0.3
    value: float | None = None
    samples: int = 0

    def add(self, x: float | None) -> None:
        if x is None or not np.isfinite(x):
            return
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        self.samples += 1

    def get(self, default: float) -> float:
        return default if self.value is None else self.value
