"""Summary and report of a load test from its per-request records.

Writes, into the output folder: requests.csv (one row per request), summary.json and
summary.csv (the numbers below), ttft_tpot.png (TTFT and TPOT of every request over the
run, with the SLO targets) and report.html (all of it on one page, linking Locust's own
report and CSVs when they are there).

Definitions:
- TTFT: send to the first content chunk. TPOT: (last content chunk - first) / (output
  tokens - 1). ITL: gaps between content chunks. E2E: send to the end of the stream.
- Output tokens/s: all successful requests' output tokens / the run's wall time.
- SLO attainment: share of *all* requests (failures count as misses) with TTFT <= target,
  with TPOT <= target (a one-token answer has no TPOT and meets it), and with both.
- Goodput: requests per second that met both targets (DistServe's definition).
"""

from __future__ import annotations

import base64
import csv
import html
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.stream import RequestRecord

REQUESTS_CSV = "requests.csv"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
PLOT_PNG = "ttft_tpot.png"
REPORT_HTML = "report.html"
# What Locust itself writes with --csv/--html (cli.py passes these names).
LOCUST_CSV_PREFIX = "locust"
LOCUST_HTML = "locust.html"
LOCUST_FILES = (LOCUST_HTML, f"{LOCUST_CSV_PREFIX}_stats.csv", f"{LOCUST_CSV_PREFIX}_stats_history.csv",
                f"{LOCUST_CSV_PREFIX}_failures.csv", f"{LOCUST_CSV_PREFIX}_exceptions.csv")

_PERCENTILES = (50, 90, 99)
_CSV_FIELDS = (
    "start_time", "workload", "api", "tag", "ok", "status", "error", "ttft_s", "tpot_s",
    "e2e_s", "output_tokens", "prompt_tokens", "itl_s",
)  # fmt: skip


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    tpot_s: float = 0.1

    def ttft_met(self, record: RequestRecord) -> bool:
        return record.ok and record.ttft_s is not None and record.ttft_s <= self.ttft_s

    def tpot_met(self, record: RequestRecord) -> bool:
        return record.ok and (record.tpot_s is None or record.tpot_s <= self.tpot_s)


# Records on disk --------------------------------------------------------------------------------


def write_records_csv(records: Iterable[RequestRecord], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for record in records:
            row = {name: getattr(record, name) for name in _CSV_FIELDS}
            row["itl_s"] = " ".join(f"{gap:.6f}" for gap in record.itl_s)
            writer.writerow({key: "" if value is None else value for key, value in row.items()})


def read_records_csv(path: Path) -> list[RequestRecord]:
    def number(text: str, kind: type = float) -> Any:
        return kind(text) if text != "" else None

    records = []
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            records.append(RequestRecord(
                start_time=float(row["start_time"]),
                workload=row["workload"],
                api=row["api"],
                tag=row["tag"],
                ok=row["ok"] == "True",
                status=int(row["status"]),
                error=row["error"],
                ttft_s=number(row["ttft_s"]),
                tpot_s=number(row["tpot_s"]),
                e2e_s=number(row["e2e_s"]),
                output_tokens=int(row["output_tokens"]),
                prompt_tokens=number(row["prompt_tokens"], int),
                itl_s=[float(gap) for gap in row["itl_s"].split()],
            ))  # fmt: skip
    return records


# Summary ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    stats: dict[str, float | None] = {f"p{q}": percentile(values, q) for q in _PERCENTILES}
    stats["mean"] = sum(values) / len(values) if values else None
    stats["max"] = max(values) if values else None
    return stats


def run_window(records: Sequence[RequestRecord]) -> float:
    """Wall time from the first request sent to the last one finished."""
    if not records:
        return 0.0
    start = min(record.start_time for record in records)
    end = max(record.start_time + (record.e2e_s or 0.0) for record in records)
    return max(end - start, 1e-9)


def summarize(records: Sequence[RequestRecord], slo: SLO, duration_s: float | None = None) -> dict[str, Any]:
    ok = [record for record in records if record.ok]
    duration = duration_s or run_window(records)
    output_tokens = sum(record.output_tokens for record in ok)
    both = [record for record in records if slo.ttft_met(record) and slo.tpot_met(record)]
    total = len(records)

    def share(count: int) -> float | None:
        return count / total if total else None

    return {
        "requests": total,
        "succeeded": len(ok),
        "failed": total - len(ok),
        "error_rate": share(total - len(ok)),
        "errors": dict(Counter(record.error for record in records if not record.ok).most_common(10)),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration else None,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration if duration else None,
        "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": distribution([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": distribution([gap for r in ok for gap in r.itl_s]),
        "e2e_s": distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
        "request_output_tokens_per_s": distribution(
            [r.output_tokens_per_s for r in ok if r.output_tokens_per_s is not None]
        ),
        "slo": {
            "ttft_s": slo.ttft_s,
            "tpot_s": slo.tpot_s,
            "ttft_attainment": share(sum(slo.ttft_met(r) for r in records)),
            "tpot_attainment": share(sum(slo.tpot_met(r) for r in records)),
            "attainment": share(len(both)),
            "goodput_requests": len(both),
            "goodput_requests_per_s": len(both) / duration if duration else None,
        },
        "workloads": dict(Counter(record.workload for record in records)),
    }


def flatten(summary: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested summary as flat `a.b` keys, for summary.csv."""
    flat: dict[str, Any] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# Plot and HTML ---------------------------------------------------------------------------------


def in_flight_over_time(records: Sequence[RequestRecord], start: float) -> tuple[list[float], list[int]]:
    """Step function of requests in flight (sent, not finished) against time since start."""
    changes = sorted(
        [(r.start_time - start, 1) for r in records] + [(r.start_time - start + (r.e2e_s or 0.0), -1) for r in records]
    )
    times, counts, current = [0.0], [0], 0
    for at, change in changes:
        current += change
        times.append(at)
        counts.append(current)
    return times, counts


def plot_ttft_tpot(records: Sequence[RequestRecord], slo: SLO, path: Path) -> None:
    """TTFT and TPOT of each request against the time it was sent, with the SLO targets,
    failed requests as red marks on the TTFT axis, and the load (requests in flight)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    start = min((record.start_time for record in records), default=0.0)
    ok = [record for record in records if record.ok]
    failed = [record for record in records if not record.ok]
    figure, (ttft_axis, tpot_axis, load_axis) = plt.subplots(
        3, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.4]}
    )
    ttft_axis.scatter([r.start_time - start for r in ok if r.ttft_s is not None],
                      [r.ttft_s for r in ok if r.ttft_s is not None], s=10, label="TTFT")
    if failed:
        ttft_axis.scatter([r.start_time - start for r in failed], [0.0] * len(failed),
                          marker="x", color="red", s=20, label=f"failed ({len(failed)})")
    ttft_axis.axhline(slo.ttft_s, color="grey", linestyle="--", label=f"TTFT target {slo.ttft_s:g} s")
    ttft_axis.set_ylabel("TTFT (s)")
    tpot_axis.scatter([r.start_time - start for r in ok if r.tpot_s is not None],
                      [r.tpot_s * 1000 for r in ok if r.tpot_s is not None], s=10, color="tab:orange", label="TPOT")
    tpot_axis.axhline(slo.tpot_s * 1000, color="grey", linestyle="--", label=f"TPOT target {slo.tpot_s * 1000:g} ms")
    tpot_axis.set_ylabel("TPOT (ms)")
    times, counts = in_flight_over_time(records, start)
    load_axis.step(times, counts, where="post", color="tab:green")
    load_axis.set_ylabel("in flight")
    load_axis.set_xlabel("time since the first request (s)")
    for axis in (ttft_axis, tpot_axis, load_axis):
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    for axis in (ttft_axis, tpot_axis):
        axis.legend(loc="upper left")
    figure.suptitle("TTFT and TPOT over the run")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _seconds(value: float | None, scale: float = 1.0, unit: str = "s") -> str:
    return "-" if value is None else f"{value * scale:.3f} {unit}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render_html(summary: dict[str, Any], title: str, plot_png: bytes | None, links: dict[str, str]) -> str:
    slo = summary["slo"]
    rows = [
        ("Requests (succeeded / failed)", f"{summary['requests']} ({summary['succeeded']} / {summary['failed']})"),
        ("Duration", _seconds(summary["duration_s"])),
        ("Throughput", f"{summary['requests_per_s'] or 0:.2f} req/s, {summary['output_tokens_per_s'] or 0:.1f} output tok/s"),
        (f"SLO attainment (TTFT <= {slo['ttft_s']:g} s and TPOT <= {slo['tpot_s'] * 1000:g} ms)",
         f"{_share(slo['attainment'])} (TTFT {_share(slo['ttft_attainment'])}, TPOT {_share(slo['tpot_attainment'])})"),
        ("Goodput (requests meeting both per second)", f"{slo['goodput_requests_per_s'] or 0:.2f} req/s"),
    ]
    latency_rows = []
    for label, key, scale, unit in (("TTFT", "ttft_s", 1, "s"), ("TPOT", "tpot_s", 1000, "ms"),
                                    ("Inter-token latency", "itl_s", 1000, "ms"), ("End to end", "e2e_s", 1, "s")):
        stats = summary[key]
        latency_rows.append((label, *(_seconds(stats[name], scale, unit) for name in ("p50", "p90", "p99", "mean", "max"))))
    errors = "".join(
        f"<tr><td>{html.escape(message)}</td><td>{count}</td></tr>" for message, count in summary["errors"].items()
    ) or "<tr><td colspan=2>none</td></tr>"
    image = (
        f'<img alt="TTFT and TPOT over time" src="data:image/png;base64,{base64.b64encode(plot_png).decode()}">'
        if plot_png else ""
    )
    link_items = "".join(f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>' for text, href in links.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .7em;text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table>{"".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)}</table>
<h2>Latency</h2>
<table><tr><th></th><th>p50</th><th>p90</th><th>p99</th><th>mean</th><th>max</th></tr>
{"".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in latency_rows)}</table>
<h2>Over time</h2>{image}
<h2>Errors</h2><table><tr><th>error</th><th>count</th></tr>{errors}</table>
<h2>Files</h2><ul>{link_items}</ul>
</body></html>
"""


def write_report(out_dir: Path, records: Sequence[RequestRecord], slo: SLO, title: str = "Tandem load test",
                 duration_s: float | None = None, extra_files: Sequence[str] = ()) -> dict[str, Any]:
    """Write every report file into ``out_dir``; returns the summary. ``extra_files`` (names
    in ``out_dir``, e.g. Locust's report, which Locust writes after this) are linked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_records_csv(records, out_dir / REQUESTS_CSV)
    summary = summarize(records, slo, duration_s)
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    with (out_dir / SUMMARY_CSV).open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("metric", "value"))
        writer.writerows(flatten(summary).items())
    plot_ttft_tpot(records, slo, out_dir / PLOT_PNG)
    links = {name: name for name in (REQUESTS_CSV, SUMMARY_JSON, SUMMARY_CSV, PLOT_PNG, *extra_files)}
    page = render_html(summary, title, (out_dir / PLOT_PNG).read_bytes(), links)
    (out_dir / REPORT_HTML).write_text(page)
    return summary
