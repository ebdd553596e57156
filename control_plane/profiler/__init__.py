"""The offline profiler of KV codec profiles (pure: no Ray, no vLLM).

Measures what each profile of `kv_transport.codecs` costs and loses on one model and
hardware: quality on the real model (next-token KL and greedy agreement against the exact
KV, plus the cheap proxies), encode/decode speed with a fixed per-call cost, and searches
the space with optuna (multi-objective TPE) against an exhaustive grid baseline. The result
is the profile library the compression controller reads (`control_plane.controller.library`).

    tandem profile [--quick]                  # the CLI: control_plane.profiler.cli.profile_app
    from control_plane.profiler import run_profile
"""

import importlib
from typing import Any

# Exports are loaded on first use (PEP 562): importing the package for its command must not
# pull in torch and the model code.
_EXPORTS = {
    "control_plane.profiler.calibration": ("CalibrationPrompt", "load_prompts", "select_prompts"),
    "control_plane.profiler.cli": ("ProfileRun", "run_profile"),
    "control_plane.profiler.command": ("profile_app",),
    "control_plane.profiler.export": ("build_library", "hardware_id", "library_entry"),
    "control_plane.profiler.pareto": (
        "REFERENCE_POINT", "dominates", "hypervolume_3d", "hypervolume_curve", "normalised_objectives", "pareto_mask",
    ),
    "control_plane.profiler.quality": ("ModelMissingError", "ModelQualityProbe", "QualityResult", "load_model"),
    "control_plane.profiler.search": (
        "GRID_SPACE", "Evaluation", "Evaluator", "canonical_profile", "grid_profiles", "run_grid", "run_optuna",
        "search_summary",
    ),
    "control_plane.profiler.speed": ("LinearCost", "SpeedResult", "fit_linear_cost", "measure_speed"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


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
