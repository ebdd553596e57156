"""Shared helpers of the benchmarks: result files (JSON + CSV), plots, medians."""

from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import os

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_results(name: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    csv_path = RESULTS / f"{name}.csv"
    json_path.write_text(json.dumps({"meta": {**machine(), **meta}, "rows": rows}, indent=2))
    with csv_path.open("w", newline="") as handle:
        # Every key of every row (a row may carry one the first lacks, e.g. a sampling error).
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


@contextmanager
def local_serve(port: int) -> Iterator[tuple[str, str]]:
    """A local Ray with Serve on ``port`` and the embedded Redis, the bundled model prepared:
    yields (the HTTP base URL, the Redis URL); shuts Serve and Ray down on the way out."""
    import ray
    from ray import serve

    from control_plane.model import prepare_model
    from control_plane.redis_server import embedded_url, start_embedded

    prepare_model(None)
    redis_url = embedded_url() or start_embedded()
    ray.init(num_cpus=16, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}", redis_url
    finally:
        serve.shutdown()
        ray.shutdown()


def grouped_bars(axis: Any, rows: list[dict[str, Any]], key: str, groups: list[str], configs: list[str],
                 group_key: str = "workload", colors: list[str] | None = None) -> None:
    """One bar per configuration in each group (e.g. per workload), side by side: ``key`` of
    the row whose ``group_key`` is the group and ``config`` the configuration."""
    width = 0.8 / len(configs)
    for i, config in enumerate(configs):
        values = [next(r[key] for r in rows if r[group_key] == g and r["config"] == config) for g in groups]
        offsets = [x + (i - (len(configs) - 1) / 2) * width for x in range(len(groups))]
        axis.bar(offsets, values, width, label=config, color=colors[i] if colors else None)
    axis.set_xticks(range(len(groups)), groups, fontsize=8)
