"""The offline profiler of KV codec profiles (pure: no Ray, no vLLM).

Measures what each profile of `kv_transport.codecs` costs and loses on one model and
hardware: quality on the real model (next-token KL and greedy agreement against the exact
KV, plus the cheap proxies), encode/decode speed with a fixed per-call cost, and searches
the space with optuna (multi-objective TPE) against an exhaustive grid baseline. The result
is the profile library the compression controller reads (`control_plane.controller.library`).

    tandem profile [--quick]                  # the CLI: control_plane.profiler.cli.profile_app
    from control_plane.profiler import run_profile
"""

from control_plane.profiler.calibration import CalibrationPrompt, load_prompts, select_prompts
from control_plane.profiler.cli import ProfileRun, profile_app, run_profile
from control_plane.profiler.export import build_library, hardware_id, library_entry
from control_plane.profiler.pareto import (
    REFERENCE_POINT,
    dominates,
    hypervolume_3d,
    hypervolume_curve,
    normalised_objectives,
    pareto_mask,
)
from control_plane.profiler.quality import (
    ModelMissingError,
    ModelQualityProbe,
    QualityResult,
    load_model,
)
from control_plane.profiler.search import (
    GRID_SPACE,
    Evaluation,
    Evaluator,
    canonical_profile,
    grid_profiles,
    run_grid,
    run_optuna,
    search_summary,
)
from control_plane.profiler.speed import LinearCost, SpeedResult, fit_linear_cost, measure_speed

__all__ = [
    "GRID_SPACE",
    "REFERENCE_POINT",
    "CalibrationPrompt",
    "Evaluation",
    "Evaluator",
    "LinearCost",
    "ModelMissingError",
    "ModelQualityProbe",
    "ProfileRun",
    "QualityResult",
    "SpeedResult",
    "build_library",
    "canonical_profile",
    "dominates",
    "fit_linear_cost",
    "grid_profiles",
    "hardware_id",
    "hypervolume_3d",
    "hypervolume_curve",
    "library_entry",
    "load_model",
    "load_prompts",
    "measure_speed",
    "normalised_objectives",
    "pareto_mask",
    "profile_app",
    "run_grid",
    "run_optuna",
    "run_profile",
    "search_summary",
    "select_prompts",
]
