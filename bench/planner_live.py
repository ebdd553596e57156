"""The P:D planner live, on real vLLM engines on this host: Tandem started by `tandem up`
with `planner.enabled`, Locust sending chat (shared prefixes, long answers) that turns into
long documents (short answers) half-way (`--workload chat-to-documents`). Meanwhile the
planner's decisions (from Redis, as `tandem status` reads them) and Serve's replica states
are sampled every second.

Reported: the pools over time (planned and running, per phase), SLO attainment before and
after the shift, the requests lost through the scale events (Locust's failures: must be 0),
Locust's report. Written to bench/results/planner_live.{json,csv,png} and
bench/results/planner_live_locust/.

    python -m bench.planner_live [--duration 480] [--users 3]

On this 2-core machine the pools are bounded to 3 engines in all (1..2 of each phase), the
model is the bundled SmolLM2, and the SLOs are CPU-sized.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import typer
import yaml

from bench.common import RESULTS, write_results

app = typer.Typer(add_completion=False, help=__doc__)
PORT = 8321
APP = "tandem"
BOX = "plan"


def settings_yaml(slo_ttft_s: float, slo_tpot_s: float, engine_start_s: float) -> dict[str, Any]:
    return {
        "port": PORT,
        "app_name": APP,
        # One core per engine: two engines (1P:1D) take the host's two cores, and a second
        # prefill engine shares decode's core (cpu binding keeps it off the first prefill
        # engine's), where the documents' short answers leave decode mostly idle.
        "prefill": {"cpu_threads": 1},
        "decode": {"cpu_threads": 1},
        "planner": {
            "enabled": True, "slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s,
            "min_prefill": 1, "max_prefill": 2, "min_decode": 1, "max_decode": 2, "max_total": 3,
            "interval_s": 5.0, "engine_start_s": engine_start_s, "downscale_delay_s": 30.0,
            "min_samples": 5, "headroom": 0.0,
        },
    }


class Sampler(threading.Thread):
    """Every second: the planner's last decision and Serve's replica states (on a cluster in
    a box, whose Ray a driver in this namespace cannot join, the replicas as the planner
    observed them: its pool and the engines of it still starting)."""

    def __init__(self, redis_url: str, serve_status: bool = True):
        super().__init__(daemon=True)
        self._serve_status = serve_status
        import redis

        from control_plane.planner.serve_policy import read_plan

        self._client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
        self._read_plan = read_plan
        self.rows: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.started_at = time.time()

    def run(self) -> None:
        import ray
        from ray import serve

        if self._serve_status:
            ray.init(address="auto", logging_level="ERROR")
        while not self.stop.wait(1.0):
            row: dict[str, Any] = {"t": time.time() - self.started_at}
            try:
                record = self._read_plan(self._client, APP)
                if record:
                    plan = record["plan"]
                    row.update({f"{p}_target": plan[p]["target"] for p in ("prefill", "decode")})
                    row.update({f"{p}_reason": plan[p]["reason"] for p in ("prefill", "decode")})
                    row.update({f"{p}_needed": plan[p]["needed"] for p in ("prefill", "decode")})
                    row["rate"] = record["observed"]["arrivals_per_s"]
                    row["ttft_attainment"] = record["observed"]["ttft_attainment"]
                    row["tpot_attainment"] = record["observed"]["tpot_attainment"]
                    if not self._serve_status:
                        for p in ("prefill", "decode"):
                            starting = record["observed"][f"{p}_starting"]
                            row[f"{p}_running"] = record["observed"][f"{p}_replicas"] - starting
                            row[f"{p}_starting"] = starting
                if not self._serve_status:
                    self.rows.append(row)
                    continue
                deployments = serve.status().applications[APP].deployments
                for name, phase in (("PrefillWorker", "prefill"), ("DecodeWorker", "decode")):
                    states = deployments[name].replica_states
                    row[f"{phase}_running"] = states.get("RUNNING", 0)
                    row[f"{phase}_starting"] = states.get("STARTING", 0) + states.get("UPDATING", 0)
                    row[f"{phase}_stopping"] = states.get("STOPPING", 0)
            except Exception as exc:  # noqa: BLE001 - a missed sample is a gap in the plot
                row["error"] = repr(exc)[:200]
            self.rows.append(row)


def _tandem(*args: str, timeout: float = 900) -> str:
    done = subprocess.run([sys.executable, "-m", "control_plane.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tandem {' '.join(args)} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return done.stdout


@app.command()
def main(
    duration: float = typer.Option(480.0, help="Seconds of load; the documents start half-way."),
    users: int = typer.Option(3),
    slo_ttft_s: float = typer.Option(4.0),
    slo_tpot_s: float = typer.Option(0.25),
    engine_start_s: float = typer.Option(45.0, help="What the planner assumes a new engine takes."),
    context_tokens: int = typer.Option(1200),
    box: bool = typer.Option(False, help="On a cluster in a box (root): head, prefill and decode nodes, "
                             "KV over a 10 Gbit veth link."),
) -> None:
    from control_plane.paths import run_dir
    from loadtest.cli import run_loadtest

    config = Path(tempfile.mkdtemp()) / "planner.yaml"
    config.write_text(yaml.safe_dump(settings_yaml(slo_ttft_s, slo_tpot_s, engine_start_s)))
    started = time.time()
    if box:
        from control_plane.cluster import box as boxlib

        _tandem("cluster", "up", "--name", BOX, "--roles", "head,prefill,decode", "--config", str(config),
                timeout=1200)
        box_state = boxlib.load(BOX)
        url, redis_url = f"http://{box_state.head.address}:{boxlib.HTTP_PORT}", box_state.redis_url
    else:
        _tandem("up", "--config", str(config))
        state = json.loads((run_dir() / "up.json").read_text())
        url, redis_url = state["url"], state["redis_url"]
    print(f"up in {time.time() - started:.0f}s")
    sampler = Sampler(redis_url, serve_status=not box)
    sampler.start()
    name = "planner_live_box" if box else "planner_live"
    out = RESULTS / f"{name}_locust"
    try:
        summary = run_loadtest(
            url, workload="chat-to-documents", shape="steady", duration_s=duration, users=users,
            out_dir=out, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s, max_tokens=64,
            extra_args=("--switch-after", str(duration / 2), "--context-tokens", str(context_tokens),
                        "--chat-max-tokens", "96", "--documents-max-tokens", "4", "--system-prompt-tokens", "200"),
        )
        time.sleep(5)
    finally:
        sampler.stop.set()
        sampler.join(timeout=10)
        if box:
            _tandem("cluster", "down", "--name", BOX, timeout=300)
        else:
            _tandem("down", timeout=300)
    rows = sampler.rows
    requests = _requests(out, slo_ttft_s, slo_tpot_s)
    switch = sampler.started_at + duration / 2
    # When the second prefill engine served (after the switch): documents before and after.
    two_at = next((sampler.started_at + r["t"] for r in rows
                   if sampler.started_at + r["t"] >= switch and (r.get("prefill_running") or 0) >= 2), None)
    later = two_at if two_at is not None else float("inf")
    phases = {"chat": [r for r in requests if r["start"] < switch],
              "documents": [r for r in requests if r["start"] >= switch],
              "documents, one prefill engine": [r for r in requests if switch <= r["start"] < later],
              "documents, two prefill engines": [r for r in requests if r["start"] >= later]}
    attainment = {name: (sum(r["met"] for r in rs) / len(rs) if rs else None) for name, rs in phases.items()}
    scale_events = _scale_events(rows)
    meta = {"duration_s": duration, "users": users, "slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s,
            "settings": settings_yaml(slo_ttft_s, slo_tpot_s, engine_start_s), "summary": summary,
            "attainment_by_phase": attainment, "requests_by_phase": {k: len(v) for k, v in phases.items()},
            "ttft_p50_by_phase": {k: _median([r["ttft"] for r in v if r["ok"]]) for k, v in phases.items()},
            "second_prefill_serving_at_s": None if two_at is None else two_at - sampler.started_at,
            "lost": summary.get("failed"),
            "scale_events": scale_events}
    meta["sampler_started_at"] = sampler.started_at  # the origin of the rows' t
    meta["where"] = "cluster in a box: head, prefill and decode nodes, 10 Gbit links" if box else "one host"
    write_results(name, rows, meta)
    _plot(rows, requests, switch - sampler.started_at, sampler.started_at, slo_ttft_s, name)
    print(json.dumps({k: meta[k] for k in ("attainment_by_phase", "ttft_p50_by_phase", "lost", "scale_events")},
                     indent=1))


def _scale_events(rows: list[dict[str, Any]]) -> int:
    """Changes of a phase's target between consecutive decisions (samples without one, a
    sampling error, are skipped)."""
    decided = [r for r in rows if r.get("prefill_target") is not None]
    return sum(1 for a, b in zip(decided, decided[1:], strict=False)
               for p in ("prefill", "decode") if a[f"{p}_target"] != b[f"{p}_target"])


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def _requests(out: Path, slo_ttft_s: float, slo_tpot_s: float) -> list[dict[str, Any]]:
    import csv

    path = out / "requests.csv"
    if not path.exists():
        return []

    def number(value: str | None) -> float | None:
        return float(value) if value not in (None, "", "None") else None

    rows = []
    with path.open() as handle:
        for row in csv.DictReader(handle):
            ok = row.get("ok") in ("True", "true", "1")
            ttft, tpot = number(row.get("ttft_s")), number(row.get("tpot_s"))
            met = ok and ttft is not None and ttft <= slo_ttft_s and (tpot is None or tpot <= slo_tpot_s)
            rows.append({"start": float(row["start_time"]), "ttft": ttft if ttft is not None else float("nan"),
                         "workload": row.get("workload", ""), "ok": ok, "met": met})
    return rows


def _plot(rows: list[dict[str, Any]], requests: list[dict[str, Any]], switch_t: float, t0: float,
          slo_ttft_s: float, name: str = "planner_live") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (pools, latency) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    t = [r["t"] for r in rows]
    for phase, color in (("prefill", "tab:blue"), ("decode", "tab:orange")):
        pools.step(t, [r.get(f"{phase}_target") for r in rows], where="post", color=color, label=f"{phase} planned")
        pools.plot(t, [r.get(f"{phase}_running") for r in rows], color=color, ls=":", label=f"{phase} running")
    pools.axvline(switch_t, color="black", lw=0.8, ls="--")
    pools.set_ylabel("engines")
    pools.legend(loc="upper left", fontsize=8)
    pools.set_title("P:D planner live: chat → documents (dashed: the switch)")
    for workload, color in (("shared-prefix", "tab:green"), ("long-context", "tab:red")):
        points = [r for r in requests if r["workload"] == workload]
        latency.scatter([r["start"] - t0 for r in points], [r["ttft"] for r in points], s=6, color=color,
                        label=workload)
    latency.axhline(slo_ttft_s, color="black", lw=0.6, ls="--")
    latency.axvline(switch_t, color="black", lw=0.8, ls="--")
    latency.set_ylabel("TTFT (s)")
    latency.set_xlabel("seconds")
    latency.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app()
