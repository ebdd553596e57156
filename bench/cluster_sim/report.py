"""Capacity ratios, summary tables and plots of the simulator's results."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from bench.common import RESULTS

BASELINE_NAMES = ("round_robin", "least_loaded", "power_of_two", "consistent_hash", "prefix_tree", "ray_prefix_affinity")
SUMMARY_COLUMNS = [
    "workload",
    "arrival",
    "round_robin",
    "best_baseline",
    "best_baseline_rps",
    "dualmap",
    "dualmap_vs_round_robin",
    "dualmap_vs_best_baseline",
]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf if a > 0 else float("nan")


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row gets its capacity relative to round-robin and to the best baseline of the
    same workload and arrival process."""
    groups: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for row in rows:
        groups[(row["profile"], row["workload"], row["arrival"])][row["policy"]] = row["capacity_rps"]
    out = []
    for row in rows:
        caps = groups[(row["profile"], row["workload"], row["arrival"])]
        baselines = {p: c for p, c in caps.items() if p in BASELINE_NAMES}
        best = max(baselines.values()) if baselines else float("nan")
        out.append(
            {
                **row,
                "vs_round_robin": _ratio(row["capacity_rps"], caps.get("round_robin", float("nan"))),
                "vs_best_baseline": _ratio(row["capacity_rps"], best),
            }
        )
    return out


def summary_rows(rows: list[dict[str, Any]], policy: str = "dualmap") -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for row in rows:
        groups[(row["workload"], row["arrival"])][row["policy"]] = row["capacity_rps"]
    out = []
    for (workload, arrival), caps in groups.items():
        baselines = {p: c for p, c in caps.items() if p in BASELINE_NAMES}
        best_name = max(baselines, key=baselines.__getitem__) if baselines else ""
        best = baselines.get(best_name, float("nan"))
        out.append(
            {
                "workload": workload,
                "arrival": arrival,
                "round_robin": caps.get("round_robin", float("nan")),
                "best_baseline": best_name,
                "best_baseline_rps": best,
                "dualmap": caps.get(policy, float("nan")),
                "dualmap_vs_round_robin": _ratio(caps.get(policy, float("nan")), caps.get("round_robin", float("nan"))),
                "dualmap_vs_best_baseline": _ratio(caps.get(policy, float("nan")), best),
            }
        )
    return out


def _style(policies: list[str]) -> dict[str, dict[str, Any]]:
    """A distinct colour per policy; dashed for experiments, dotted for ablations."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    styles = {}
    for index, policy in enumerate(policies):
        linestyle = "--" if policy.startswith("dualmap_x") else ":" if policy.startswith("dualmap_no") else "-"
        styles[policy] = {"color": cmap(index % 20), "linestyle": linestyle}
    return styles


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_capacity(rows: list[dict[str, Any]], name: str) -> None:
    """Grouped bars: capacity per policy, one group per workload x arrival process."""
    plt = _pyplot()
    groups = list(dict.fromkeys((r["workload"], r["arrival"]) for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    value = {(r["workload"], r["arrival"], r["policy"]): r["capacity_rps"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups)), 4.5))
    width = 0.8 / max(1, len(policies))
    styles = _style(policies)
    for j, policy in enumerate(policies):
        xs = [i + (j - (len(policies) - 1) / 2) * width for i in range(len(groups))]
        ys = [value.get((w, a, policy), 0.0) for w, a in groups]
        hatch = "//" if policy.startswith("dualmap_x") else ".." if policy.startswith("dualmap_no") else None
        ax.bar(xs, ys, width, label=policy, color=styles[policy]["color"], hatch=hatch)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{w}\n{a}" for w, a in groups], fontsize=8)
    ax.set_ylabel("effective capacity (req/s, P90 TTFT ≤ SLO)")
    profile = rows[0].get("profile", "") if rows else ""
    instances = rows[0].get("instances", "") if rows else ""
    ax.set_title(f"Effective capacity, {instances} prefill instances, {profile}")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    plt.close(fig)


def plot_curves(rows: list[dict[str, Any]], slo_s: float, name: str) -> None:
    """P90 TTFT against arrival rate per policy, one panel per workload x arrival."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    groups = list(dict.fromkeys((r["workload"], r["arrival"]) for r in rows))
    if not groups:
        return
    styles = _style(list(dict.fromkeys(r["policy"] for r in rows)))
    cols = min(4, len(groups))
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for index, (workload, arrival) in enumerate(groups):
        ax = axes[index // cols][index % cols]
        points: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            if r["workload"] == workload and r["arrival"] == arrival:
                points[r["policy"]].append((r["rate"], r["ttft_p90_s"]))
        for policy, pts in points.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=policy, **styles[policy])
        ax.axhline(slo_s, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # major decades only: no overlaps
        ax.set_title(f"{workload}, {arrival}", fontsize=9)
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel("P90 TTFT (s)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=5)
    for index in range(len(groups), nrows * cols):
        axes[index // cols][index % cols].axis("off")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}_ttft.png", dpi=110)
    plt.close(fig)
