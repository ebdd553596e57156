"""KV transfer goodput across the nodes of a cluster in a box, per transport and link rate.

A two-node box (network only: no Ray, no engines), the publisher on the prefill node and
the puller on the decode node (bench/kv_link.py, authenticated as workers are), both nodes'
links shaped to each rate in turn. Reports the median goodput of each transport and of a
bare socket that only copies the bytes, as a fraction of the shaped rate. Needs root.

    python -m bench.cluster_goodput [--rates 500mbit 1gbit 5gbit 10gbit 25gbit unshaped]
        [--sizes-mib 1 4 16 64] [--repeats 5]

Writes bench/results/cluster_goodput.{json,csv,png}.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from bench.common import RESULTS, markdown_table, median, write_results
from bench.kv_link import measure_across
from control_plane.cluster import box as boxlib
from control_plane.cluster.netns import LinkSpec

MIB = 1 << 20
BOX = "gput"
KINDS = ["socket", "tcp", "nixl", "gloo"]
console = Console()


def main(
    rates: list[str] = typer.Option(["500mbit", "1gbit", "5gbit", "10gbit", "25gbit", "unshaped"]),
    sizes_mib: list[int] = typer.Option([1, 4, 16, 64]),
    repeats: int = typer.Option(5, help="Pulls per point after a warm-up (median reported)."),
    kinds: list[str] = typer.Option(KINDS),
) -> None:
    sizes = [s * MIB for s in sizes_mib]
    boxlib.down(BOX)
    state = boxlib.up(BOX, roles=[["head", "prefill"], ["decode"]], subnet="198.18.6.0/24", start_services=False)
    rows: list[dict[str, Any]] = []
    try:
        for rate in rates:
            spec = LinkSpec.parse(rate)
            for node in state.nodes:
                boxlib.set_link(BOX, node.name, spec)
            for kind in kinds:
                timings = measure_across(state, kind, sizes, repeats)
                for size in sizes:
                    goodput_bps = size * 8 / median(timings[size])
                    rows.append({
                        "rate": rate, "transport": kind, "size_mib": size // MIB,
                        "goodput_gbit_s": round(goodput_bps / 1e9, 3),
                        "fraction_of_link": round(goodput_bps / spec.rate_bps, 3) if spec.rate_bps else None,
                    })  # fmt: skip
                console.print(f"{rate:>9} {kind:>6}: " + ", ".join(
                    f"{r['size_mib']} MiB {r['goodput_gbit_s']} Gbit/s" for r in rows[-len(sizes):]))  # fmt: skip
    finally:
        boxlib.down(BOX)
    write_results("cluster_goodput", rows, {"repeats": repeats, "statistic": "median", "box": "2 nodes, veth + bridge, htb"})
    _plot(rows, rates, sizes_mib)
    console.print(markdown_table(rows, list(rows[0])))


def _plot(rows: list[dict[str, Any]], rates: list[str], sizes_mib: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(sizes_mib)
    fig, ax = plt.subplots(figsize=(8, 4))
    kinds = sorted({r["transport"] for r in rows}, key=KINDS.index)
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        values = [next((r["goodput_gbit_s"] for r in rows if r["rate"] == rate and r["transport"] == kind
                        and r["size_mib"] == size), 0) for rate in rates]  # fmt: skip
        ax.bar([x + i * width for x in range(len(rates))], values, width, label=kind)
    shaped = [LinkSpec.parse(rate).rate_bps for rate in rates]
    ax.scatter([x + 0.4 - width / 2 for x in range(len(rates))], [b / 1e9 if b else float("nan") for b in shaped],
               marker="_", s=600, color="black", label="shaped rate")  # fmt: skip
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rates))], rates)
    ax.set_ylabel(f"goodput at {size} MiB (Gbit/s, median)")
    ax.set_title("KV goodput between two nodes of the box, per link rate")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "cluster_goodput.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
