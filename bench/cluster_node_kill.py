"""A Locust run against the cluster in a box with a decode node killed in the middle.

A 4-node box (head, prefill, two decode nodes), Tandem with one prefill and two decode
replicas (one per decode node). Locust streams shared-prefix chats for ``--duration-s``; at
a third of the run every process of the node holding a decode replica dies at once (its
raylet, the replica, the engine); at two thirds the node is started again. Every request
is classified from Locust's per-request records:

- ok: a whole answer; failed: an HTTP error or an SSE error event;
- lost: accepted and never answered (a hang or a stream cut without an error): goal 0.

Recovery: from the kill to the end of the last request that failed because of it (every
request started later succeeded). Needs root.

    python -m bench.cluster_node_kill [--duration-s 180] [--users 6]

Writes bench/results/cluster_node_kill.{json,csv,png} (+ the Locust report in
bench/results/cluster_node_kill-locust/).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import typer
from rich.console import Console

from bench.common import RESULTS, write_results
from control_plane.cluster import box as boxlib

BOX = "kill"
console = Console()


def main(duration_s: float = typer.Option(180.0), users: int = typer.Option(6)) -> None:
    from control_plane.cluster.deploy import box_settings, deploy
    from control_plane.state import list_workers
    from loadtest.cli import run_loadtest
    from loadtest.report import read_records_csv

    boxlib.down(BOX)
    state = boxlib.up(BOX, roles=boxlib.default_roles(4), subnet="198.18.7.0/24")
    out_dir = RESULTS / "cluster_node_kill-locust"
    events: dict[str, float] = {}
    try:
        settings = box_settings(state, decode={"replicas": 2, "cpu_threads": 1}, prefill={"cpu_threads": 1})
        (url,) = deploy(BOX, [settings])
        decode_nodes = {w["node"] for w in list_workers(state.redis_url, settings.app_name) if w["role"] == "decode"}
        victim = next(n for n in state.nodes_with("decode") if n.address in decode_nodes)
        console.print(f"decode replicas on {sorted(decode_nodes)}; killing {victim.name} at {duration_s / 3:.0f}s")

        def faults() -> None:
            time.sleep(duration_s / 3)
            events["kill"] = time.time()
            boxlib.kill_node(BOX, victim.name)
            time.sleep(duration_s / 3)
            events["restart"] = time.time()
            boxlib.start_node(BOX, victim.name)

        injector = threading.Thread(target=faults, daemon=True)
        started = time.time()
        injector.start()
        run_loadtest(url, workload="shared-prefix", shape="steady", duration_s=duration_s, users=users,
                     out_dir=out_dir, max_tokens=64, extra_args=("--think-time", "0.5", "--request-timeout", "180"))  # fmt: skip
        injector.join()
        records = read_records_csv(out_dir / "requests.csv")
    finally:
        boxlib.down(BOX)
    kill = events["kill"]
    rows = [
        {"t_s": round(r.start_time - started, 2), "ok": r.ok, "status": r.status, "error": r.error[:120],
         "e2e_s": r.e2e_s, "ttft_s": r.ttft_s}
        for r in sorted(records, key=lambda r: r.start_time)
    ]  # fmt: skip
    lost = [r for r in records if r.status == 0 or (not r.ok and not r.error)]
    failed = [r for r in records if not r.ok]
    after = [r for r in records if r.start_time + (r.e2e_s or 0) >= kill]
    failed_after = [r for r in after if not r.ok]
    last_failure_end = max((r.start_time + (r.e2e_s or 0) for r in failed_after), default=kill)
    summary = {
        "requests": len(records), "ok": sum(r.ok for r in records), "failed": len(failed), "lost": len(lost),
        "failed_around_kill": len(failed_after), "recovery_s": round(last_failure_end - kill, 2),
        "kill_at_s": round(kill - started, 1), "restart_at_s": round(events["restart"] - started, 1),
        "errors": sorted({r.error[:160] for r in failed}), "users": users, "duration_s": duration_s,
    }  # fmt: skip
    write_results("cluster_node_kill", rows, summary)
    _plot(rows, summary)
    console.print(summary)


def _plot(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    ok = [r for r in rows if r["ok"]]
    bad = [r for r in rows if not r["ok"]]
    ax.scatter([r["t_s"] for r in ok], [r["e2e_s"] or 0 for r in ok], s=8, label="ok (end-to-end s)")
    ax.scatter([r["t_s"] for r in bad], [r["e2e_s"] or 0 for r in bad], s=20, marker="x", color="red", label="failed")
    ax.axvline(summary["kill_at_s"], color="black", linestyle="--", label="decode node killed")
    ax.axvline(summary["restart_at_s"], color="gray", linestyle=":", label="node started again")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title(f"Locust on the box, a decode node killed: {summary['lost']} lost, "
                 f"{summary['failed']} failed, recovered in {summary['recovery_s']} s")  # fmt: skip
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "cluster_node_kill.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
