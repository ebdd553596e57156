"""Raw goodput of Tandem's KV transports against the local ceiling, in one run.

For payloads of 1-256 MiB, a publisher process serves the bytes and this process pulls
them (bench/kv_link.py): through the `tcp`, `nixl` and `gloo` transports, and a plain loopback socket that
only copies the same bytes (the ceiling: no framing, no protocol). Each point is the median
of several pulls. Writes bench/results/transport_goodput.{json,csv,png}.

    python -m bench.transport_goodput [--repeats 15] [--sizes-mib 1 4 16 64 256]
"""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.progress import track

from bench.common import RESULTS, markdown_table, median, write_results
from bench.kv_link import measure

MIB = 1 << 20
console = Console()


def main(
    repeats: int = typer.Option(15, help="Pulls per point (median reported)."),
    sizes_mib: list[int] = typer.Option([1, 4, 16, 64, 256], help="Payload sizes in MiB."),
) -> None:
    sizes = [s * MIB for s in sizes_mib]
    kinds = ["socket", "tcp", "nixl", "gloo"]
    results = {kind: measure(kind, sizes, repeats) for kind in track(kinds, description="transports")}
    rows = []
    for size in sizes:
        ceiling = size / median(results["socket"][size])
        row: dict[str, Any] = {"size_mib": size // MIB, "socket_ceiling_gb_s": ceiling / 1e9}
        for kind in ("tcp", "nixl", "gloo"):
            goodput = size / median(results[kind][size])
            row[f"{kind}_gb_s"] = goodput / 1e9
            row[f"{kind}_vs_ceiling"] = goodput / ceiling
        rows.append(row)
    write_results("transport_goodput", rows, {"repeats": repeats, "statistic": "median"})
    _plot(rows)
    console.print(markdown_table(rows, list(rows[0])))


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size_mib"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("socket_ceiling_gb_s", "loopback socket (ceiling)"), ("tcp_gb_s", "tcp transport"), ("nixl_gb_s", "nixl transport"), ("gloo_gb_s", "gloo transport (nccl's CPU twin)")):
        ax.plot(sizes, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("payload (MiB)")
    ax.set_ylabel("goodput (GB/s, median)")
    ax.set_title("KV transport goodput, one pull at a time, loopback")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "transport_goodput.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
