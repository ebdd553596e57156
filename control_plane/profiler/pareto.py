"""The three objectives, the Pareto filter and an exact 3-D hypervolume.

Objectives, all turned into minimisation and normalised onto [0, 1] with *fixed* bounds
(so hypervolumes of different searches and runs are comparable):

  compression   1 / ratio                      (1 = no compression, 0.0625 = 16x)
  speed         log10(codec seconds per MB) mapped from [1e-4, 1] s/MB
  quality       log10(KL + 1e-4) mapped from [1e-4, 10] nats (lossless = 0)

Logarithms for time and KL because both span orders of magnitude and what matters is the
relative difference (0.001 vs 0.01 nats matters as much as 0.1 vs 1). Hypervolumes use the
reference point (1.1, 1.1, 1.1) in that normalised space, so points on the box's edge
still count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = tuple[float, float, float]

SPEED_BOUNDS_S_PER_MB = (1e-4, 1.0)
KL_FLOOR = 1e-4
KL_BOUNDS = (KL_FLOOR, 10.0)
REFERENCE_POINT: Point = (1.1, 1.1, 1.1)


def _log_unit(value: float, low: float, high: float) -> float:
    scaled = (math.log10(max(value, low)) - math.log10(low)) / (math.log10(high) - math.log10(low))
    return min(max(scaled, 0.0), 1.0)


def normalised_objectives(ratio: float, seconds_per_mb: float, quality_loss: float) -> Point:
    """(compression, speed, quality) in [0, 1]^3, lower is better in each."""
    compression = min(max(1.0 / ratio if ratio > 0 else 1.0, 0.0), 1.0)
    speed = _log_unit(seconds_per_mb, *SPEED_BOUNDS_S_PER_MB)
    quality = _log_unit(max(quality_loss, 0.0) + KL_FLOOR, *KL_BOUNDS)
    return compression, speed, quality


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is no worse than b everywhere and better somewhere (minimisation)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_mask(points: Sequence[Sequence[float]]) -> list[bool]:
    """True for each non-dominated point (minimisation). Equal points are all kept."""
    return [not any(dominates(other, point) for other in points) for point in points]


def _hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    area = 0.0
    best_y = reference[1]
    ordered = sorted(points)
    for index, (x, y) in enumerate(ordered):
        best_y = min(best_y, y)
        next_x = ordered[index + 1][0] if index + 1 < len(ordered) else reference[0]
        area += (next_x - x) * (reference[1] - best_y)
    return area


def hypervolume_3d(points: Sequence[Sequence[float]], reference: Sequence[float] = REFERENCE_POINT) -> float:
    """Exact volume dominated by `points` and bounded by `reference` (minimisation).

    Slices along the third objective: between consecutive third coordinates the dominated
    region is a prism over the 2-D hypervolume of the points already below. O(n^2 log n),
    plenty for the few hundred points of a profiler run. Points not strictly better than
    the reference in every objective contribute nothing."""
    inside = [tuple(float(c) for c in p) for p in points if all(c < r for c, r in zip(p, reference, strict=True))]
    if not inside:
        return 0.0
    inside.sort(key=lambda p: p[2])
    volume = 0.0
    for index, point in enumerate(inside):
        top = inside[index + 1][2] if index + 1 < len(inside) else reference[2]
        if top <= point[2]:
            continue
        below = [(p[0], p[1]) for p in inside[: index + 1]]
        volume += (top - point[2]) * _hypervolume_2d(below, (reference[0], reference[1]))
    return volume


def hypervolume_curve(points: Sequence[Sequence[float]], reference: Sequence[float] = REFERENCE_POINT) -> list[float]:
    """Hypervolume of the first 1, 2, ... n points (a search's progress)."""
    curve = []
    front: list[Sequence[float]] = []
    volume = 0.0
    for point in points:
        if not any(dominates(other, point) or tuple(other) == tuple(point) for other in front):
            front = [p for p in front if not dominates(point, p)] + [point]
            volume = hypervolume_3d(front, reference)
        curve.append(volume)
    return curve
