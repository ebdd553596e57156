"""Figures of a profiler run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from control_plane.profiler.pareto import KL_FLOOR, pareto_mask

# (library key, axis label, log scale)
_AXES = (
    ("ratio", "compression ratio (x)", False),
    ("seconds_per_mb", "codec time, encode+decode (ms per MB)", True),
    ("quality_loss", "quality loss: mean next-token KL (nats)", True),
)
_PAIRS = ((0, 1), (0, 2), (1, 2))


def _value(entry: Mapping[str, Any], key: str) -> float:
    if key == "seconds_per_mb":
        return float(entry.get("seconds_per_mb", 0.0)) * 1e3
    if key == "quality_loss":
        return float(entry[key]) + KL_FLOOR  # lossless profiles sit on the floor of the log axis
    return float(entry[key])


def _projection(ax: Any, entries: Sequence[Mapping[str, Any]], x: int, y: int, label_front: bool) -> None:
    xkey, xlabel, xlog = _AXES[x]
    ykey, ylabel, ylog = _AXES[y]
    rest = [e for e in entries if not e["pareto"]]
    front = [e for e in entries if e["pareto"]]
    ax.scatter([_value(e, xkey) for e in rest], [_value(e, ykey) for e in rest], s=12, c="0.7", label="evaluated")
    ax.scatter([_value(e, xkey) for e in front], [_value(e, ykey) for e in front], s=28, c="tab:red", label="3-D Pareto set")
    if label_front:
        # Name only the points on this projection's own 2-D front (the rest would be clutter).
        signs = (-1.0 if xkey == "ratio" else 1.0, -1.0 if ykey == "ratio" else 1.0)
        points = [(signs[0] * _value(e, xkey), signs[1] * _value(e, ykey)) for e in front]
        for e, on_front in zip(front, pareto_mask(points), strict=True):
            if on_front:
                ax.annotate(e["name"], (_value(e, xkey), _value(e, ykey)), fontsize=5.5, alpha=0.85,
                            xytext=(3, 2), textcoords="offset points")
    if ykey == "quality_loss":
        # The default SLO classes' budgets (standard, relaxed).
        for budget in (0.01, 0.05):
            ax.axhline(budget + KL_FLOOR, color="tab:blue", linestyle=":", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xlog:
        ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)


def pareto_figure(library: Mapping[str, Any], path: Path, hv_curves: Mapping[str, Sequence[float]] | None = None,
                  grid_hypervolume: float | None = None) -> Path:
    """The three 2-D projections of the objectives, Pareto points highlighted (identity,
    sent raw and so without codec time, is left out); with `hv_curves`, a fourth panel of
    hypervolume against evaluations per search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in library["profiles"] if "seconds_per_mb" in e and e.get("note") is None]
    if hv_curves:
        fig, grid = plt.subplots(2, 2, figsize=(12, 9.5))
        axes = list(grid.flat)
    else:
        fig, row = plt.subplots(1, 3, figsize=(15.6, 4.6))
        axes = list(row)
    for index, (x, y) in enumerate(_PAIRS):
        _projection(axes[index], entries, x, y, label_front=(x, y) == (0, 2))
    axes[0].legend(fontsize=7)
    if hv_curves:
        ax = axes[3]
        for method, curve in hv_curves.items():
            ax.plot(range(1, len(curve) + 1), curve, label=method, drawstyle="steps-post")
        if grid_hypervolume:
            for fraction, style in ((1.0, "-"), (0.95, "--"), (0.9, ":")):
                ax.axhline(grid_hypervolume * fraction, color="0.4", linestyle=style, linewidth=0.8)
        ax.set_xlabel("distinct profiles evaluated")
        ax.set_ylabel("hypervolume (normalised objectives)")
        ax.set_title("search progress (lines: 100/95/90% of grid)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"KV codec profiles: {library.get('model')} on {library.get('hardware')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
