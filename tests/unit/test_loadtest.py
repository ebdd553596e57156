"""The load test's pure parts (workloads, shapes, stream timing, report) and one short
headless Locust run against a fake OpenAI streaming server started here (no Ray, no vLLM)."""

from __future__ import annotations

import asyncio
import csv
import json
import random
import threading
from collections import Counter
from pathlib import Path

import pytest

from loadtest import cli
from loadtest.report import (
    LOCUST_HTML,
    PLOT_PNG,
    REPORT_HTML,
    REQUESTS_CSV,
    SLO,
    SUMMARY_CSV,
    SUMMARY_JSON,
    in_flight_over_time,
    percentile,
    read_records_csv,
    summarize,
    write_records_csv,
    write_report,
)
from loadtest.shapes import LoadSchedule
from loadtest.stream import RequestRecord, StreamMeter
from loadtest.workloads import (
    LongContextWorkload,
    MultiTurnWorkload,
    SharedPrefixWorkload,
    ZipfSampler,
    approx_tokens,
    make_workload,
    shared_system_prompt,
)

# Workloads -------------------------------------------------------------------------------------


def test_zipf_sampler_follows_the_law():
    sampler = ZipfSampler(8, 1.2)
    assert sum(sampler.probabilities) == pytest.approx(1.0)
    assert sampler.probabilities == sorted(sampler.probabilities, reverse=True)
    assert sampler.probabilities[0] / sampler.probabilities[1] == pytest.approx(2**1.2)
    rng = random.Random(7)
    counts = Counter(sampler.sample(rng) for _ in range(20_000))
    for rank, probability in enumerate(sampler.probabilities):
        assert counts[rank] / 20_000 == pytest.approx(probability, abs=0.015)
    assert ZipfSampler(4, 0.0).probabilities == [0.25] * 4  # s = 0 is uniform
    with pytest.raises(ValueError):
        ZipfSampler(0, 1.0)


def test_shared_prefix_prompts_are_shared_across_users():
    users = [SharedPrefixWorkload(random.Random(seed), num_prefixes=4, system_prompt_tokens=200) for seed in range(3)]
    system_prompts = {}
    for workload in users:
        for _ in range(50):
            request = workload.next_request()
            system, user = request.messages
            assert system["role"] == "system" and user["role"] == "user"
            # The same prefix index is the same text, whichever user drew it.
            assert system_prompts.setdefault(request.tag, system["content"]) == system["content"]
    assert len(system_prompts) >= 2
    assert 200 <= approx_tokens(shared_system_prompt(0, 200)) <= 210
    assert shared_system_prompt(0, 50) != shared_system_prompt(1, 50)


def test_shared_prefix_hot_prompt_dominates():
    workload = SharedPrefixWorkload(random.Random(1), num_prefixes=16, zipf_s=1.1)
    tags = Counter(workload.next_request().tag for _ in range(2000))
    assert tags.most_common(1)[0][0] == "prefix-0"
    assert tags["prefix-0"] > 4 * tags.get("prefix-15", 0)


def test_multi_turn_conversation_grows_then_restarts():
    workload = MultiTurnWorkload(random.Random(3), user_id="u1", turns=3)
    first = workload.next_request()
    assert first.conversation_id == "u1-conv-0" and len(first.messages) == 2
    assert first.body("chat")["user"] == "u1-conv-0"
    workload.record_reply(first, "A short answer.")
    second = workload.next_request()
    # The new request repeats the whole conversation: the previous one is its prefix.
    assert second.messages[:2] == first.messages
    assert second.messages[2] == {"role": "assistant", "content": "A short answer."}
    assert second.messages[3]["role"] == "user" and len(second.messages) == 4
    assert second.tag == "turn-2" and second.conversation_id == first.conversation_id
    workload.record_reply(second, "More.")
    third = workload.next_request()
    assert len(third.messages) == 6
    workload.record_reply(third, "Done.")  # the third of three turns: a new conversation
    fourth = workload.next_request()
    assert fourth.conversation_id == "u1-conv-1" and len(fourth.messages) == 2


def test_multi_turn_restarts_on_failure_and_long_context():
    workload = MultiTurnWorkload(random.Random(3), turns=10)
    request = workload.next_request()
    workload.record_reply(request, None)  # the turn failed: start over
    assert workload.next_request().conversation_id.endswith("conv-1")
    workload = MultiTurnWorkload(random.Random(3), turns=10, max_context_tokens=200)
    request = workload.next_request()
    workload.record_reply(request, "word " * 150)  # would outgrow the context budget
    assert workload.next_request().conversation_id.endswith("conv-1")


def test_long_context_prompt_length():
    workload = LongContextWorkload(random.Random(5), context_tokens=1200)
    first, second = workload.next_request(), workload.next_request()
    assert 1200 <= approx_tokens(first.messages[0]["content"]) <= 1230
    assert first.messages != second.messages  # a fresh document each time: no reuse


def test_completions_body_and_unknown_workload():
    request = make_workload("shared-prefix", seed=0).next_request()
    body = request.body("completions")
    assert body["prompt"].startswith("system: You are assistant number") and body["prompt"].endswith("assistant:")
    assert "user" not in body and "messages" not in body
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("bursty", seed=0)


# Shapes ----------------------------------------------------------------------------------------


def test_steady_shape():
    schedule = LoadSchedule("steady", users=8, duration_s=30)
    assert [schedule.tick(t) for t in (0, 15, 29.9)] == [(8, 8.0)] * 3
    assert schedule.tick(30) is None


def test_ramp_shape_rises_then_holds():
    schedule = LoadSchedule("ramp", users=10, duration_s=100)
    users = [schedule.users_at(t) for t in range(0, 100, 5)]
    assert users[0] == 1 and users == sorted(users)
    assert schedule.users_at(35) == 5 and schedule.users_at(70) == 10 and schedule.users_at(99) == 10
    assert schedule.tick(100) is None


def test_spike_shape():
    schedule = LoadSchedule("spike", users=16, duration_s=100, spawn_rate=50)
    assert schedule.tick(10) == (4, 50)
    assert schedule.tick(40) == (16, 50) and schedule.tick(59) == (16, 50)
    assert schedule.tick(60) == (4, 50)
    assert LoadSchedule("spike", users=2, duration_s=10).users_at(0) == 1  # never zero users


@pytest.mark.parametrize(("shape", "users", "duration"), [("wave", 4, 10), ("steady", 0, 10), ("steady", 4, 0)])
def test_shape_rejects_bad_arguments(shape, users, duration):
    with pytest.raises(ValueError):
        LoadSchedule(shape, users=users, duration_s=duration)


# Stream timing ---------------------------------------------------------------------------------


def _chunk(content: str | None = None, usage: dict | None = None, api: str = "chat") -> bytes:
    if usage:
        return b"data: " + json.dumps({"choices": [], "usage": usage}).encode()
    choice = {"delta": {"content": content}} if api == "chat" else {"text": content}
    return b"data: " + json.dumps({"choices": [{"index": 0, **choice}]}).encode()


def _feed(meter: StreamMeter, timed_lines: list[tuple[float, bytes]]) -> None:
    for at, line in timed_lines:
        meter.feed_line(line, at)


def test_stream_meter_times_first_content_not_role_chunk():
    meter = StreamMeter("chat", sent_at=100.0)
    _feed(meter, [
        (100.05, b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'),
        (100.05, b""),
        (100.30, _chunk("Paris")),
        (100.34, _chunk(" is")),
        (100.40, _chunk(" it.")),
        (100.41, _chunk(usage={"prompt_tokens": 12, "completion_tokens": 4})),
        (100.41, b"data: [DONE]"),
    ])  # fmt: skip
    record = meter.finish(100.42, 200, start_time=1.0, workload="w", tag="t")
    assert record.ok and record.error == ""
    assert record.ttft_s == pytest.approx(0.30)
    # Decode time over the tokens after the first, with the count from the usage chunk.
    assert record.tpot_s == pytest.approx(0.10 / 3)
    assert record.itl_s == pytest.approx([0.04, 0.06])
    assert record.e2e_s == pytest.approx(0.42)
    assert (record.output_tokens, record.prompt_tokens) == (4, 12)
    assert record.output_tokens_per_s == pytest.approx(4 / 0.42)
    assert meter.text == "Paris is it."


def test_stream_meter_completions_without_usage():
    meter = StreamMeter("completions", sent_at=0.0)
    _feed(meter, [(0.2, _chunk("a", api="completions")), (0.3, _chunk("b", api="completions")), (0.3, b"data: [DONE]")])
    record = meter.finish(0.3, 200, 0.0, "w")
    assert record.ok and record.output_tokens == 2 and record.tpot_s == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("lines", "status", "error"),
    [
        ([_chunk("a"), b'data: {"error": {"message": "engine died", "code": 500}}', b"data: [DONE]"], 200,
         "stream error: engine died"),
        ([_chunk("a")], 200, "stream ended before [DONE]"),
        ([b"data: [DONE]"], 200, "no content in the stream"),
        ([], 503, "HTTP 503"),
        ([b"data: {not json", b"data: [DONE]"], 200, "unparsable SSE data"),
    ],
    ids=["error-event", "truncated", "empty", "http-status", "garbage"],
)
def test_stream_meter_failures(lines, status, error):
    meter = StreamMeter("chat", sent_at=0.0)
    _feed(meter, [(0.1, line) for line in lines])
    record = meter.finish(0.2, status, 0.0, "w")
    assert not record.ok and record.error.startswith(error)


# Report ----------------------------------------------------------------------------------------


def _record(start: float, ttft: float | None, tpot: float | None, ok: bool = True, tokens: int = 10) -> RequestRecord:
    return RequestRecord(
        start_time=start, workload="shared-prefix", api="chat", ok=ok, status=200 if ok else 500,
        error="" if ok else "HTTP 500", ttft_s=ttft, tpot_s=tpot, e2e_s=(ttft or 0) + (tpot or 0) * (tokens - 1),
        output_tokens=tokens if ok else 0, itl_s=[tpot] * (tokens - 1) if tpot else [],
    )  # fmt: skip


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 90) == 90


def test_summary_slo_attainment_and_goodput():
    records = [
        _record(0.0, 0.5, 0.05),  # meets both
        _record(1.0, 3.0, 0.05),  # TTFT miss
        _record(2.0, 0.5, 0.20),  # TPOT miss
        _record(3.0, 0.5, None, tokens=1),  # one token: no TPOT, meets it
        _record(4.0, None, None, ok=False),  # failure: misses both
    ]
    summary = summarize(records, SLO(ttft_s=1.0, tpot_s=0.1), duration_s=10.0)
    slo = summary["slo"]
    assert (summary["requests"], summary["succeeded"], summary["failed"]) == (5, 4, 1)
    assert summary["errors"] == {"HTTP 500": 1}
    assert slo["ttft_attainment"] == pytest.approx(3 / 5)
    assert slo["tpot_attainment"] == pytest.approx(3 / 5)
    assert slo["attainment"] == pytest.approx(2 / 5) and slo["goodput_requests"] == 2
    assert slo["goodput_requests_per_s"] == pytest.approx(0.2)
    assert summary["output_tokens"] == 31 and summary["output_tokens_per_s"] == pytest.approx(3.1)
    assert summary["ttft_s"]["max"] == 3.0 and summary["tpot_s"]["p50"] == pytest.approx(0.05)


def test_records_csv_round_trip(tmp_path: Path):
    records = [_record(1.5, 0.25, 0.01), _record(2.0, None, None, ok=False)]
    write_records_csv(records, tmp_path / "r.csv")
    loaded = read_records_csv(tmp_path / "r.csv")
    assert loaded[1] == records[1]
    assert loaded[0].itl_s == pytest.approx(records[0].itl_s)
    assert loaded[0].ttft_s == records[0].ttft_s and loaded[0].tpot_s == records[0].tpot_s


def test_in_flight_counts():
    records = [_record(0.0, 1.0, None, tokens=1), _record(0.5, 1.0, None, tokens=1)]
    times, counts = in_flight_over_time(records, start=0.0)
    assert list(zip(times, counts, strict=True)) == [(0.0, 0), (0.0, 1), (0.5, 2), (1.0, 1), (1.5, 0)]


def test_write_report_files(tmp_path: Path):
    records = [_record(float(i), 0.1 * (i % 5), 0.02) for i in range(30)] + [_record(31.0, None, None, ok=False)]
    summary = write_report(tmp_path, records, SLO(ttft_s=0.25, tpot_s=0.05), title="unit test", extra_files=["locust.html"])
    for name in (REQUESTS_CSV, SUMMARY_JSON, SUMMARY_CSV, PLOT_PNG, REPORT_HTML):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / PLOT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / SUMMARY_JSON).read_text()) == json.loads(json.dumps(summary))
    with (tmp_path / SUMMARY_CSV).open() as file:
        flat = dict(csv.reader(file))
    assert flat["slo.goodput_requests"] == str(summary["slo"]["goodput_requests"])
    page = (tmp_path / REPORT_HTML).read_text()
    assert "unit test" in page and "data:image/png;base64," in page and 'href="locust.html"' in page
    assert "HTTP 500" in page


# CLI -------------------------------------------------------------------------------------------


def test_base_url_accepts_the_sdk_form():
    assert cli.base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert cli.base_url("http://127.0.0.1:8000/nixl") == "http://127.0.0.1:8000/nixl"


def test_locust_command(tmp_path: Path):
    command = cli.locust_command(
        "http://h:1/v1", workload="long-context", shape="ramp", duration_s=29.6, users=3, out_dir=tmp_path,
        model="m", max_tokens=8, slo_ttft_s=1.5, slo_tpot_s=0.05, extra_args=("--turns", "2"),
    )
    joined = " ".join(command)
    for part in ("--headless", "--host http://h:1 ", "--users 3", "--run-time 30s", "--workload long-context",
                 "--load-shape ramp", "--slo-ttft 1.5", f"--tandem-out {tmp_path}", "--turns 2"):
        assert part in joined, part
    with pytest.raises(ValueError, match="unknown shape"):
        cli.locust_command("http://h:1", workload="multi-turn", shape="square", duration_s=1, users=1,
                           out_dir=tmp_path, model="m", max_tokens=1, slo_ttft_s=1, slo_tpot_s=1)


# A real headless run against a fake streaming server -------------------------------------------

FIRST_TOKEN_DELAY_S = 0.05
TOKEN_GAP_S = 0.01
FAKE_MODEL = "fake-model"
FAKE_KEY = "tk-fake"


def _fake_openai_app():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    seen: list[dict] = []

    async def completions(request: Request):
        if request.headers.get("authorization") != f"Bearer {FAKE_KEY}":
            return JSONResponse({"error": {"message": "Incorrect API key provided."}}, status_code=401)
        body = await request.json()
        seen.append(body)
        if body.get("model") != FAKE_MODEL:
            return JSONResponse({"error": {"message": "model not found"}}, status_code=404)
        chat = request.url.path.endswith("/chat/completions")
        tokens = body["max_tokens"]

        async def events():
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}) + "\n\n"
            await asyncio.sleep(FIRST_TOKEN_DELAY_S)
            for i in range(tokens):
                choice = {"delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
                yield "data: " + json.dumps({"choices": [{"index": 0, **choice}]}) + "\n\n"
                await asyncio.sleep(TOKEN_GAP_S)
            usage = {"prompt_tokens": 20, "completion_tokens": tokens, "total_tokens": 20 + tokens}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                            Route("/v1/completions", completions, methods=["POST"])])
    return app, seen


@pytest.fixture()
def fake_server():
    import uvicorn

    app, seen = _fake_openai_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        threading.Event().wait(0.05)
    assert server.started, "fake server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.timeout(120)
def test_headless_run_against_fake_server(fake_server, tmp_path: Path):
    url, seen = fake_server
    summary = cli.run_loadtest(
        f"{url}/v1", workload="multi-turn", shape="steady", duration_s=4, users=2, out_dir=tmp_path,
        model=FAKE_MODEL, max_tokens=8, slo_ttft_s=1.0, slo_tpot_s=0.05, api_key=FAKE_KEY,
    )
    assert summary["requests"] >= 4 and summary["failed"] == 0, summary["errors"]
    # Timed from the stream: first content after the server's delay, then its token gap.
    assert FIRST_TOKEN_DELAY_S <= summary["ttft_s"]["p50"] < FIRST_TOKEN_DELAY_S + 0.5
    assert TOKEN_GAP_S <= summary["tpot_s"]["p50"] < TOKEN_GAP_S + 0.05
    assert summary["slo"]["attainment"] > 0.5
    assert summary["output_tokens"] == 8 * summary["succeeded"]
    # What went on the wire: streaming with usage, exact lengths, conversations growing.
    body = seen[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 8 and body["user"].startswith("loadtest-user-")
    assert max(len(b["messages"]) for b in seen) >= 4
    for name in (REQUESTS_CSV, SUMMARY_JSON, PLOT_PNG, REPORT_HTML, LOCUST_HTML, "locust_stats.csv"):
        assert (tmp_path / name).exists(), name
    with (tmp_path / "locust_stats.csv").open() as file:
        types = {row["Type"] for row in csv.DictReader(file)}
    assert {"POST", "TTFT", "TPOT", "ITL"} <= types


@pytest.mark.timeout(120)
def test_headless_run_counts_failures(fake_server, tmp_path: Path):
    url, _ = fake_server
    summary = cli.run_loadtest(url, duration_s=2, users=1, out_dir=tmp_path, model="no-such-model",
                               max_tokens=4, api_key=FAKE_KEY)
    assert summary["requests"] >= 1 and summary["succeeded"] == 0
    assert next(iter(summary["errors"])).startswith("HTTP 404")
    assert summary["slo"]["attainment"] == 0.0


def test_typer_command_rejects_bad_shape_before_starting_locust(tmp_path: Path):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(cli.loadtest_command)
    result = CliRunner().invoke(app, ["--shape", "square", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown shape 'square'" in result.output
    assert not (tmp_path / "locust.log").exists()


def test_printed_summary(tmp_path: Path):
    records = [_record(0.0, 0.5, 0.05), _record(1.0, None, None, ok=False)]
    text = cli._format_summary(summarize(records, SLO()), tmp_path)
    assert "requests 2 (failed 1)" in text and "TTFT p50 500 ms" in text
    assert "50.0% met both" in text and "error x1: HTTP 500" in text and REPORT_HTML in text


def test_chat_to_documents_switches_the_mix_at_the_set_time():
    from loadtest.workloads import (
        ChatToDocumentsWorkload,
        LongContextWorkload,
        SharedPrefixWorkload,
    )

    now = [100.0]
    rng = random.Random(0)
    workload = ChatToDocumentsWorkload(SharedPrefixWorkload(rng), LongContextWorkload(rng, context_tokens=300),
                                       switch_after_s=60, started_at=100.0, chat_max_tokens=96,
                                       documents_max_tokens=4, clock=lambda: now[0])
    chat = workload.next_request()
    assert chat.workload == "shared-prefix" and chat.body("chat")["max_tokens"] == 96
    now[0] = 161.0
    document = workload.next_request()
    assert document.workload == "long-context" and document.body("chat")["max_tokens"] == 4
    assert len(document.messages[0]["content"].split()) > 300
