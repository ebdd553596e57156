"""`tandem loadtest`: Locust, headless, for a bounded time against a running endpoint.

Runs `locust -f loadtest/locustfile.py --headless` in a subprocess (Locust monkey-patches
the standard library with gevent when imported, which the caller's process should not get)
and leaves in ``out_dir``: Locust's CSVs (locust_stats.csv, ...) and HTML report
(locust.html), and Tandem's requests.csv, summary.json/.csv, ttft_tpot.png and report.html.

    from loadtest.cli import run_loadtest
    summary = run_loadtest("http://127.0.0.1:8000", workload="multi-turn", shape="ramp",
                           duration_s=120, users=16, out_dir="results/ramp")

`loadtest_command` is the same as a Typer command (mounted as `tandem loadtest`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from control_plane.settings import DEFAULT_SERVED_NAME
from loadtest.report import LOCUST_CSV_PREFIX, LOCUST_HTML, REPORT_HTML, SUMMARY_JSON
from loadtest.shapes import SHAPES
from loadtest.workloads import WORKLOADS

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
LOG_FILE = "locust.log"


class LoadTestError(RuntimeError):
    """Locust did not run to the end (bad arguments, crash, timeout): no report."""


def base_url(url: str) -> str:
    """The server root Locust prefixes paths with: accepts `.../v1` as the OpenAI SDK wants
    it, or a route prefix like `http://host:8000/nixl`."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def locust_command(
    url: str,
    *,
    workload: str,
    shape: str,
    duration_s: float,
    users: int,
    out_dir: Path,
    model: str,
    max_tokens: int,
    slo_ttft_s: float,
    slo_tpot_s: float,
    api: str = "chat",
    seed: int = 0,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    command = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless",
        "--host", base_url(url),
        "--users", str(users),
        "--run-time", f"{max(1, round(duration_s))}s",
        # Let streams in flight at the end finish, so their records count.
        "--stop-timeout", "30",
        "--csv", str(out_dir / LOCUST_CSV_PREFIX),
        "--html", str(out_dir / LOCUST_HTML),
        "--only-summary",
        "--workload", workload,
        "--load-shape", shape,
        "--api", api,
        "--model", model,
        "--max-tokens", str(max_tokens),
        "--slo-ttft", str(slo_ttft_s),
        "--slo-tpot", str(slo_tpot_s),
        "--seed", str(seed),
        "--tandem-out", str(out_dir),
    ]  # fmt: skip
    return [*command, *extra_args]


def run_loadtest(
    url: str,
    workload: str = "shared-prefix",
    shape: str = "steady",
    duration_s: float = 60.0,
    users: int = 8,
    out_dir: str | Path = "loadtest-results",
    *,
    model: str = DEFAULT_SERVED_NAME,
    max_tokens: int = 64,
    slo_ttft_s: float = 2.0,
    slo_tpot_s: float = 0.1,
    api: str = "chat",
    seed: int = 0,
    api_key: str | None = None,
    extra_args: tuple[str, ...] = (),
    echo: bool = False,
) -> dict[str, Any]:
    """Run the load test and return its summary (summary.json's content).

    ``extra_args`` go to Locust as is (e.g. ``("--context-tokens", "1000")``). Raises
    LoadTestError when Locust ends without a report; failed requests do not raise, they
    are in the summary.
    """
    if importlib.util.find_spec("locust") is None:
        raise LoadTestError("Locust is not installed in this environment (pip install locust)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_JSON).unlink(missing_ok=True)  # never report a previous run's numbers
    command = locust_command(
        url, workload=workload, shape=shape, duration_s=duration_s, users=users, out_dir=out,
        model=model, max_tokens=max_tokens, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s,
        api=api, seed=seed, extra_args=extra_args,
    )
    env = dict(os.environ)
    if api_key:
        env["TANDEM_API_KEY"] = api_key  # the locustfile's default; kept off the command line
    # The locustfile imports loadtest.* and control_plane.*: make the repo importable even
    # when Tandem is not installed into this interpreter.
    repo_root = str(LOCUSTFILE.parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    # Startup, the run, the stop timeout, and the report.
    timeout_s = duration_s + 120
    with (out / LOG_FILE).open("w") as log:
        try:
            # echo: Locust's output on this terminal; otherwise all of it in locust.log.
            completed = subprocess.run(
                command, env=env, stdout=None if echo else log, stderr=None if echo else subprocess.STDOUT,
                timeout=timeout_s, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LoadTestError(f"locust still running after {timeout_s:.0f} s; see {out / LOG_FILE}") from exc
    summary_path = out / SUMMARY_JSON
    if not summary_path.exists():
        tail = (out / LOG_FILE).read_text()[-3000:]
        raise LoadTestError(f"locust exited with {completed.returncode} and no report:\n{tail}")
    return json.loads(summary_path.read_text())


def _format_summary(summary: dict[str, Any], out_dir: Path) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    slo = summary["slo"]
    lines = [
        f"requests {summary['requests']} (failed {summary['failed']}) in {summary['duration_s']:.0f} s: "
        f"{summary['requests_per_s'] or 0:.2f} req/s, {summary['output_tokens_per_s'] or 0:.1f} output tok/s",
        f"TTFT p50 {ms(summary['ttft_s']['p50'])}  p90 {ms(summary['ttft_s']['p90'])}  p99 {ms(summary['ttft_s']['p99'])}",
        f"TPOT p50 {ms(summary['tpot_s']['p50'])}  p90 {ms(summary['tpot_s']['p90'])}  p99 {ms(summary['tpot_s']['p99'])}",
        f"SLO (TTFT <= {slo['ttft_s']:g} s, TPOT <= {slo['tpot_s'] * 1000:g} ms): "
        f"{(slo['attainment'] or 0):.1%} met both; goodput {slo['goodput_requests_per_s'] or 0:.2f} req/s",
    ]
    for error, count in summary["errors"].items():
        lines.append(f"  error x{count}: {error}")
    lines.append(f"report: {out_dir / REPORT_HTML}")
    return "\n".join(lines)


def loadtest_command(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Endpoint root (or its /v1)."),
    workload: str = typer.Option("shared-prefix", help=f"One of: {', '.join(WORKLOADS)}."),
    shape: str = typer.Option("steady", help=f"One of: {', '.join(SHAPES)}."),
    duration: float = typer.Option(60.0, "--duration", "-t", help="Seconds of load."),
    users: int = typer.Option(8, "--users", "-u", help="Concurrent users (the peak, for ramp/spike)."),
    out_dir: Path = typer.Option(Path("loadtest-results"), "--out", "-o", help="Report folder."),
    model: str = typer.Option(DEFAULT_SERVED_NAME, help="Model name to send."),
    max_tokens: int = typer.Option(64, help="Output tokens per request."),
    slo_ttft: float = typer.Option(2.0, help="TTFT target (s)."),
    slo_tpot: float = typer.Option(0.1, help="TPOT target (s)."),
    api: str = typer.Option("chat", help="chat or completions."),
    seed: int = typer.Option(0, help="Base random seed."),
    api_key: str | None = typer.Option(None, envvar="TANDEM_API_KEY", help="Bearer key."),
    num_prefixes: int = typer.Option(16, help="shared-prefix: distinct system prompts."),
    zipf_s: float = typer.Option(1.1, help="shared-prefix: Zipf exponent (0 = uniform)."),
    system_prompt_tokens: int = typer.Option(400, help="shared-prefix: system prompt length."),
    turns: int = typer.Option(4, help="multi-turn: turns per conversation."),
    context_tokens: int = typer.Option(1500, help="long-context: document length (tokens)."),
    locust_arg: list[str] = typer.Option(
        [], "--locust-arg", help="Extra Locust argument, repeatable: --locust-arg=--think-time --locust-arg=0.5."
    ),
) -> None:
    """Drive the endpoint with streaming requests; write CSV, HTML and a TTFT/TPOT plot."""
    workload_args = (
        "--num-prefixes", str(num_prefixes), "--zipf-s", str(zipf_s),
        "--system-prompt-tokens", str(system_prompt_tokens), "--turns", str(turns),
        "--context-tokens", str(context_tokens),
    )  # fmt: skip
    try:
        summary = run_loadtest(
            url, workload, shape, duration, users, out_dir, model=model, max_tokens=max_tokens,
            slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot, api=api, seed=seed, api_key=api_key,
            extra_args=(*workload_args, *locust_arg),
        )
    except (LoadTestError, ValueError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    typer.echo(_format_summary(summary, out_dir))
    if summary["succeeded"] == 0:
        raise typer.Exit(1)


def main() -> None:
    typer.run(loadtest_command)


if __name__ == "__main__":
    main()
