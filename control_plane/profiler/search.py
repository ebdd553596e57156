"""Searching the codec space: exhaustive over a grid subset, and Bayesian multi-objective
optimisation (optuna) over the whole of `SEARCH_SPACE`, sharing one evaluation cache.

Every distinct profile (by its parameters, `Profile.params_key`) is measured once per run
by the `Evaluator`; a search that asks again gets the cached result. The comparison counts,
per search, the distinct profiles *it* asked for (what it would have cost alone), so
sharing the cache never flatters either side.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from control_plane.profiler.pareto import (
    REFERENCE_POINT,
    Point,
    hypervolume_curve,
    normalised_objectives,
)
from control_plane.profiler.quality import LayerKV, ModelQualityProbe, QualityResult
from control_plane.profiler.speed import SpeedResult, measure_speed
from kv_transport.codecs import (
    BUILTIN_PROFILE_NAMES,
    SEARCH_SPACE,
    CodecError,
    Profile,
    get_profile,
    iter_profiles,
    profile_from_choices,
)

IDENTITY = "identity"

# The exhaustive baseline: K and V precision chosen independently from raw / fp8 / int8 /
# int4 / int2, KIVI axes (keys per channel, values per token), groups of 64, with and
# without zstd-1: 5 x 5 x 2 = 50 profiles, the kind of grid one would write by hand.
GRID_SPACE: dict[str, tuple[Any, ...]] = {
    "transform": ("none",),
    "key_quant": ("raw", "fp8", "int8", "int4", "int2"),
    "value_quant": ("raw", "fp8", "int8", "int4", "int2"),
    "key_axis": ("channel",),
    "value_axis": ("token",),
    "group_size": (64,),
    "first_layers": (0,),
    "first_layers_quant": ("raw",),
    "recent_tokens": (0,),
    "recent_quant": ("raw",),
    "lossless": ("none", "zstd1"),
    "byteplane": (False,),
}
# --quick: 6 profiles.
QUICK_GRID_SPACE: dict[str, tuple[Any, ...]] = {
    **GRID_SPACE,
    "key_quant": ("raw", "int8", "int4"),
    "value_quant": ("raw", "int4"),
    "lossless": ("none",),
}

HV_TARGETS = (0.9, 0.95, 0.99, 1.0)


@dataclass
class Evaluation:
    profile: Profile
    quality: QualityResult
    speed: SpeedResult
    seconds: float  # wall time the evaluation took
    sources: list[str] = field(default_factory=list)  # the searches that asked for it

    @property
    def ratio(self) -> float:
        return self.quality.ratio

    @property
    def seconds_per_mb(self) -> float:
        return self.speed.seconds_per_mb

    @property
    def quality_loss(self) -> float:
        return self.quality.quality_loss

    @property
    def normalised(self) -> Point:
        return normalised_objectives(self.ratio, self.seconds_per_mb, self.quality_loss)


def builtin_names() -> dict[str, str]:
    """params_key -> built-in profile name, so a searched profile equal to a built-in one
    goes by the name every connector resolves with `get_profile`."""
    return {get_profile(name).params_key: name for name in BUILTIN_PROFILE_NAMES}


class Evaluator:
    """Measures profiles (quality on the model, speed on this hardware), once each."""

    def __init__(
        self,
        probe: ModelQualityProbe,
        speed_sizes: Sequence[Sequence[LayerKV]],
        repeats: int = 3,
        on_evaluation: Callable[[Evaluation], None] | None = None,
    ):
        self.probe = probe
        self.speed_sizes = speed_sizes
        self.repeats = repeats
        self.on_evaluation = on_evaluation
        self._cache: dict[str, Evaluation] = {}
        self._builtins = builtin_names()
        self.head_dim = int(speed_sizes[0][0][0].shape[-1])

    @property
    def evaluations(self) -> list[Evaluation]:
        return list(self._cache.values())

    def evaluate(self, profile: Profile, source: str) -> Evaluation:
        key = profile.params_key
        cached = self._cache.get(key)
        if cached is None:
            if not profile.supports(self.head_dim):
                raise CodecError(f"profile {profile.name} cannot encode head_dim {self.head_dim}")
            builtin = self._builtins.get(key)
            if builtin is not None:
                profile = get_profile(builtin)
            started = time.perf_counter()
            quality = self.probe.evaluate(profile)
            speed = measure_speed(profile, self.speed_sizes, self.repeats)
            cached = Evaluation(profile, quality, speed, time.perf_counter() - started)
            self._cache[key] = cached
            if self.on_evaluation is not None:
                self.on_evaluation(cached)
        if source not in cached.sources:
            cached.sources.append(source)
        return cached


@dataclass
class SearchTrace:
    """The profiles one search asked for, in order (repeats included)."""

    method: str
    keys: list[str] = field(default_factory=list)
    trials: int = 0

    def distinct(self) -> list[str]:
        return list(dict.fromkeys(self.keys))


def canonical_profile(choices: Mapping[str, Any]) -> Profile:
    """The profile of one point of SEARCH_SPACE; a combination that is not a valid profile
    is mapped to its nearest valid twin (byteplane needs a compressor, a rotation needs a
    quantised tensor) instead of wasting the trial, since both have no effect there."""
    fixed = dict(choices)
    if fixed["lossless"] == "none":
        fixed["byteplane"] = False
    try:
        return profile_from_choices(fixed)
    except CodecError:
        fixed["transform"] = "none"
        return profile_from_choices(fixed)


def run_grid(evaluator: Evaluator, profiles: Sequence[Profile], step: Callable[[], None] | None = None) -> SearchTrace:
    trace = SearchTrace("grid")
    for profile in profiles:
        trace.keys.append(evaluator.evaluate(profile, "grid").profile.params_key)
        trace.trials += 1
        if step is not None:
            step()
    return trace


def make_sampler(kind: str, seed: int, trials: int) -> Any:
    import optuna

    if kind == "tpe":
        # Multivariate TPE models the dimensions jointly (e.g. key bits x key axis), which
        # matters in this space; it works with categorical parameters and small budgets.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=seed, multivariate=True, n_startup_trials=min(10, max(trials // 4, 1))
            )
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, trials // 3)))
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)  # needs scipy
    raise ValueError(f"unknown sampler {kind!r}; expected tpe, nsga2, random or gp")


def run_optuna(
    evaluator: Evaluator,
    trials: int,
    sampler: str = "tpe",
    seed: int = 0,
    space: Mapping[str, tuple[Any, ...]] = SEARCH_SPACE,
    step: Callable[[], None] | None = None,
    method: str | None = None,
) -> SearchTrace:
    """Multi-objective optuna study over `space`, minimising the three normalised
    objectives (1/ratio, log codec s/MB, log KL: see `pareto`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trace = SearchTrace(method or sampler)

    def objective(trial: Any) -> tuple[float, float, float]:
        choices = {name: trial.suggest_categorical(name, list(values)) for name, values in space.items()}
        evaluation = evaluator.evaluate(canonical_profile(choices), trace.method)
        trace.keys.append(evaluation.profile.params_key)
        trial.set_user_attr("profile", evaluation.profile.name)
        return evaluation.normalised

    study = optuna.create_study(directions=["minimize"] * 3, sampler=make_sampler(sampler, seed, trials))
    for _ in range(trials):
        study.optimize(objective, n_trials=1)
        trace.trials += 1
        if step is not None:
            step()
    return trace


def search_summary(
    trace: SearchTrace, evaluator: Evaluator, target_hypervolume: float, budget: int | None = None
) -> dict[str, Any]:
    """Distinct evaluations, hypervolume reached, evaluations needed to reach each fraction
    of `target_hypervolume` (the exhaustive grid's), and with `budget` the hypervolume
    after that many evaluations (equal-budget comparison)."""
    by_key = {e.profile.params_key: e for e in evaluator.evaluations}
    distinct = trace.distinct()
    curve = hypervolume_curve([by_key[key].normalised for key in distinct], REFERENCE_POINT)
    final = curve[-1] if curve else 0.0
    row: dict[str, Any] = {
        "method": trace.method,
        "trials": trace.trials,
        "evaluations": len(distinct),
        "hypervolume": final,
        "hypervolume_vs_grid": final / target_hypervolume if target_hypervolume > 0 else float("nan"),
        "evaluation_s": sum(by_key[key].seconds for key in distinct),
    }
    if budget is not None:
        row["budget"] = budget
        row["hypervolume_at_budget"] = curve[min(budget, len(curve)) - 1] if curve else 0.0
    for target in HV_TARGETS:
        reached = next((i + 1 for i, v in enumerate(curve) if v >= target * target_hypervolume - 1e-12), None)
        row[f"evals_to_{round(target * 100)}pct"] = reached
    return row


def hypervolume_curves(traces: Sequence[SearchTrace], evaluator: Evaluator) -> dict[str, list[float]]:
    by_key = {e.profile.params_key: e for e in evaluator.evaluations}
    return {
        trace.method: hypervolume_curve([by_key[key].normalised for key in trace.distinct()], REFERENCE_POINT)
        for trace in traces
    }


def grid_profiles(space: Mapping[str, tuple[Any, ...]] = GRID_SPACE) -> list[Profile]:
    return list(iter_profiles(space))
