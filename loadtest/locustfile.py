"""Locust load test of Tandem's OpenAI-compatible endpoint (or any OpenAI-compatible one).

Every user sends streaming chat (or completions) requests back to back and times each stream:
TTFT (first content chunk), TPOT, inter-token latencies and end-to-end latency. They show up
in Locust's statistics as their own request types (TTFT / TPOT / ITL, by workload; the
request itself is its end-to-end time), and at the end of the test the per-request records
become the summary and report (loadtest/report.py): SLO attainment, goodput, output tokens/s,
a PNG of TTFT/TPOT over time, an HTML page.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \
        -u 8 -t 60s --workload shared-prefix --load-shape spike --tandem-out results/

`tandem loadtest` (loadtest/cli.py) runs exactly that with Locust's CSV and HTML reports.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, LoadTestShape, events, task

try:
    import loadtest  # noqa: F401 - installed with Tandem, or the repo root is on the path
except ImportError:  # `locust -f loadtest/locustfile.py` puts only loadtest/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from control_plane.settings import DEFAULT_SERVED_NAME  # noqa: E402
from loadtest.report import LOCUST_FILES, SLO, write_report  # noqa: E402
from loadtest.shapes import SHAPES, LoadSchedule  # noqa: E402
from loadtest.stream import RequestRecord, StreamMeter  # noqa: E402
from loadtest.workloads import WORKLOADS, make_workload  # noqa: E402

log = logging.getLogger("tandem.loadtest")

DEFAULT_DURATION_S = 60.0

# Every finished request of this process, for the report at the end.
RECORDS: list[RequestRecord] = []
_user_numbers = itertools.count()


@events.init_command_line_parser.add_listener
def _tandem_options(parser: Any) -> None:
    group = parser.add_argument_group("Tandem load test")
    group.add_argument("--workload", choices=WORKLOADS, default="shared-prefix",
                       help="Prompt mix: shared system prompts (Zipf), growing multi-turn chats, long documents.")
    group.add_argument("--load-shape", choices=SHAPES, default="steady",
                       help="Users over time: steady, ramp (1 -> -u over 70%% of -t), spike (-u/4, all -u mid-run).")
    group.add_argument("--api", choices=("chat", "completions"), default="chat", help="Which OpenAI endpoint.")
    group.add_argument("--model", default=DEFAULT_SERVED_NAME, help="Model name to send (the served name).")
    group.add_argument("--max-tokens", type=int, default=64, help="Output tokens per request.")
    group.add_argument("--ignore-eos", choices=("true", "false"), default="true",
                       help="Ask for exactly --max-tokens tokens (vLLM's ignore_eos) so runs compare.")
    group.add_argument("--temperature", type=float, default=None, help="Sampling temperature (server default if unset).")
    group.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT target (s) for SLO attainment and goodput.")
    group.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT target (s) for SLO attainment and goodput.")
    group.add_argument("--think-time", type=float, default=0.0, help="Pause (s) between a user's requests.")
    group.add_argument("--request-timeout", type=float, default=300.0, help="Seconds before a request is abandoned.")
    # Not $OPENAI_API_KEY: that key should not go to whatever endpoint is under test.
    group.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"),
                       help="Bearer key (default: $TANDEM_API_KEY).")
    group.add_argument("--seed", type=int, default=0, help="Base seed; user i draws with seed+i.")
    group.add_argument("--num-prefixes", type=int, default=16, help="shared-prefix: distinct system prompts.")
    group.add_argument("--zipf-s", type=float, default=1.1, help="shared-prefix: Zipf exponent (0 = uniform).")
    group.add_argument("--system-prompt-tokens", type=int, default=400, help="shared-prefix: system prompt length.")
    group.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation.")
    group.add_argument("--context-tokens", type=int, default=1500, help="long-context: document length (tokens).")
    group.add_argument("--max-context-tokens", type=int, default=1500, help="multi-turn: restart beyond this context.")
    group.add_argument("--switch-after", type=float, default=120.0,
                       help="chat-to-documents: seconds of chat before the documents start.")
    group.add_argument("--chat-max-tokens", type=int, default=128, help="chat-to-documents: output tokens of a chat turn.")
    group.add_argument("--documents-max-tokens", type=int, default=8,
                       help="chat-to-documents: output tokens of a document's answer.")
    group.add_argument("--shape-spawn-rate", type=float, default=None,
                       help="Users started per second towards each shape target (default: the shape's own).")
    group.add_argument("--tandem-out", default=None,
                       help="Folder for the Tandem report (requests.csv, summary, PNG, HTML); none if unset.")


class OpenAIStreamingUser(HttpUser):
    """One client: sends a request, reads the whole stream, sends the next."""

    def wait_time(self) -> float:
        return self.environment.parsed_options.think_time

    def on_start(self) -> None:
        options = self.environment.parsed_options
        number = next(_user_numbers)
        self.workload = make_workload(
            options.workload,
            seed=options.seed + number,
            user_id=f"loadtest-user-{number}",
            num_prefixes=options.num_prefixes,
            zipf_s=options.zipf_s,
            system_prompt_tokens=options.system_prompt_tokens,
            turns=options.turns,
            context_tokens=options.context_tokens,
            max_context_tokens=options.max_context_tokens,
            switch_after_s=options.switch_after,
            chat_max_tokens=options.chat_max_tokens,
            documents_max_tokens=options.documents_max_tokens,
        )
        self.headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}

    def _body(self, request_body: dict[str, Any]) -> dict[str, Any]:
        options = self.environment.parsed_options
        request_body = dict(request_body)
        body = {
            "model": options.model,
            **request_body,
            "max_tokens": request_body.pop("max_tokens", options.max_tokens),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if options.ignore_eos == "true":
            body["ignore_eos"] = True
        if options.temperature is not None:
            body["temperature"] = options.temperature
        return body

    def _record_metric(self, kind: str, name: str, seconds: float) -> None:
        self.environment.events.request.fire(
            request_type=kind, name=name, response_time=seconds * 1000, response_length=0,
            exception=None, context={},
        )

    @task
    def stream_one(self) -> None:
        options = self.environment.parsed_options
        request = self.workload.next_request()
        path = "/v1/chat/completions" if options.api == "chat" else "/v1/completions"
        start_time = time.time()
        meter = StreamMeter(options.api, time.perf_counter())
        with self.client.post(
            path, json=self._body(request.body(options.api)), headers=self.headers, stream=True,
            catch_response=True, name=f"{options.api} stream ({request.workload})",
            timeout=options.request_timeout,
        ) as response:
            status = response.status_code or 0
            try:
                if status == 200:
                    # chunk_size=None: hand over each chunk as it arrives, not per 512 bytes,
                    # or TTFT and inter-token gaps would be measured late.
                    for line in response.iter_lines(chunk_size=None):
                        meter.feed_line(line, time.perf_counter())
                else:
                    meter.error = f"HTTP {status}: {(response.text or '')[:200]}"
            except Exception as exc:  # noqa: BLE001 - any transport failure fails this request
                meter.error = f"{type(exc).__name__}: {exc}"[:200]
            record = meter.finish(time.perf_counter(), status, start_time, request.workload, request.tag)
            # Locust's own entry for the request is its end-to-end time, not time to headers.
            response.request_meta["response_time"] = (record.e2e_s or 0.0) * 1000
            if record.ok:
                response.success()
            else:
                response.failure(record.error)
        RECORDS.append(record)
        if record.ok:
            self._record_metric("TTFT", request.workload, record.ttft_s or 0.0)
            if record.tpot_s is not None:
                self._record_metric("TPOT", request.workload, record.tpot_s)
            for gap in record.itl_s:
                self._record_metric("ITL", request.workload, gap)
        self.workload.record_reply(request, meter.text if record.ok else None)


class TandemLoadShape(LoadTestShape):
    """--load-shape over -u users and -t seconds (loadtest/shapes.py)."""

    use_common_options = True  # it reads -u and -t

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        schedule = LoadSchedule(
            options.load_shape,
            users=max(1, options.num_users or 1),
            duration_s=float(options.run_time or DEFAULT_DURATION_S),
            spawn_rate=options.shape_spawn_rate,
        )
        return schedule.tick(self.get_run_time())


_report_written = False


@events.test_stop.add_listener
def _write_tandem_report(environment: Any, **_: Any) -> None:
    """Once users have stopped: the Tandem report from this process's records."""
    global _report_written
    options = environment.parsed_options
    if _report_written or not options or not options.tandem_out:
        return
    _report_written = True
    out_dir = Path(options.tandem_out)
    title = f"Tandem load test: {options.workload}, {options.load_shape}, {options.num_users} users"
    summary = write_report(
        out_dir, RECORDS, SLO(options.slo_ttft, options.slo_tpot), title=title,
        extra_files=[name for name in LOCUST_FILES if _locust_writes(options, name)],
    )
    log.info(
        "Tandem report in %s: %d requests, %d failed, TTFT p50 %s s, goodput %.2f req/s",
        out_dir, summary["requests"], summary["failed"], summary["ttft_s"]["p50"],
        summary["slo"]["goodput_requests_per_s"] or 0.0,
    )


def _locust_writes(options: Any, name: str) -> bool:
    """Whether Locust's own --html/--csv output lands in the report folder as `name`
    (Locust writes it after this hook, so it cannot be looked for yet)."""
    out_dir = Path(options.tandem_out).resolve()
    if name.endswith(".html"):
        written = [options.html_file] if options.html_file else []
    else:
        prefix = options.csv_prefix
        written = [f"{prefix}{suffix}" for suffix in ("_stats.csv", "_stats_history.csv", "_failures.csv",
                                                      "_exceptions.csv")] if prefix else []
    return out_dir / name in {Path(path).resolve() for path in written}
