"""What ``n`` costs under P/D: one request with n samples vs n separate requests.

One disaggregated app on this machine (the embedded default: one prefill and one decode
engine, KV over tcp). For n = 1, 2, 4, 8, a fresh prompt of ``--prompt-tokens`` random words
is answered (streamed, ``--max-tokens`` each, temperature 0.8) either as one request with
``n`` samples or as n concurrent requests of one sample each (seeds seed + i, what the n
children of one request get). Reported per point (median of ``--repeats``): time to the
first token of every sample, end to end, prefill engine requests, and KV bytes moved (the
decode engine's pulls), from the workers' own counters.

    python -m bench.pd_n_samples [--repeats 3] [--prompt-tokens 1000]

Writes bench/results/pd_n_samples.{json,csv,png}.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx
import typer
from rich.console import Console

from bench.common import RESULTS, local_serve, markdown_table, median, write_results

console = Console()
PORT = 8313
APP = "bench-n"
MODEL = "smollm2-135m-instruct"
NS = [1, 2, 4, 8]
WORDS = ("river stone market window garden signal harbor lantern meadow copper violet thunder orbit "
         "canyon pepper saddle marble anchor falcon ribbon").split()


def prompt_of(rng: random.Random, tokens: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


async def _stream(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[int, float]:
    """Seconds to each choice's first token."""
    started = time.perf_counter()
    firsts: dict[int, float] = {}
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices") or []:
                if choice.get("text"):
                    firsts.setdefault(int(choice["index"]), time.perf_counter() - started)
    return firsts


def _counters(redis_url: str) -> tuple[int, int]:
    """(prefill engine requests, KV bytes the decode engine pulled), from the heartbeats."""
    from control_plane.state import list_workers

    workers = {w["role"]: w["stats"] for w in list_workers(redis_url, APP) if w.get("role") in ("prefill", "decode")}
    return int(workers["prefill"]["requests_total"]), int(workers["decode"]["kv_bytes_transferred"])


def _settled(redis_url: str) -> tuple[int, int]:
    from workers.deployments import HEARTBEAT_PERIOD_S

    last = _counters(redis_url)
    while True:
        time.sleep(HEARTBEAT_PERIOD_S + 1)
        now = _counters(redis_url)
        if now == last:
            return now
        last = now


async def _one_point(url: str, redis_url: str, way: str, n: int, prompt: str, max_tokens: int,
                     seed: int) -> dict[str, float]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True}
    before = _settled(redis_url)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as http:
        if way == "one request":
            firsts = list((await _stream(http, {**body, "n": n, "seed": seed})).values())
        else:
            answers = await asyncio.gather(*(_stream(http, {**body, "seed": seed + i}) for i in range(n)))
            firsts = [t for answer in answers for t in answer.values()]
    e2e = time.perf_counter() - started
    after = _settled(redis_url)
    assert len(firsts) == n, (way, n, firsts)
    return {"ttft_all_s": max(firsts), "ttft_first_s": min(firsts), "e2e_s": e2e,
            "prefill_requests": after[0] - before[0], "kv_bytes": after[1] - before[1]}


def main(
    repeats: int = typer.Option(3, help="Prompts per point (median reported)."),
    prompt_tokens: int = typer.Option(1000, help="Words in each prompt (about as many tokens)."),
    max_tokens: int = typer.Option(32, help="Tokens generated per sample."),
) -> None:
    from ray import serve

    from bench.live_routers import wait_http_ok
    from control_plane.app import build_app_from_settings
    from control_plane.settings import load_settings

    rng = random.Random(5)
    rows: list[dict[str, Any]] = []
    with local_serve(PORT) as (url, redis_url):
        settings = load_settings(None, app_name=APP, port=PORT, redis_url=redis_url)
        serve.run(build_app_from_settings(settings), name=APP, route_prefix="/", blocking=False)
        wait_http_ok(f"{url}/health", 900)
        asyncio.run(_one_point(url, redis_url, "one request", 1, prompt_of(rng, 64), 4, 0))  # warm-up
        for n in NS:
            for way in ("one request", "separate requests"):
                points = [asyncio.run(_one_point(url, redis_url, way, n, prompt_of(rng, prompt_tokens), max_tokens,
                                                 seed=100 * r)) for r in range(repeats)]
                row = {"n": n, "way": way, **{key: median([p[key] for p in points]) for key in points[0]}}
                rows.append(row)
                console.print(row)
    for row in rows:
        one = next(r for r in rows if r["n"] == row["n"] and r["way"] == "one request")
        row["ttft_all_vs_one_request"] = row["ttft_all_s"] / one["ttft_all_s"]
        row["kv_bytes_vs_one_request"] = row["kv_bytes"] / one["kv_bytes"] if one["kv_bytes"] else float("nan")
    write_results("pd_n_samples", rows, {"repeats": repeats, "statistic": "median", "prompt_tokens": prompt_tokens,
                                          "max_tokens": max_tokens, "engines": "1 prefill + 1 decode, bf16, tcp"})
    _plot(rows)
    console.print(markdown_table(rows, ["n", "way", "ttft_first_s", "ttft_all_s", "e2e_s", "prefill_requests",
                                        "kv_bytes", "ttft_all_vs_one_request"]))


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for way, marker in (("one request", "o"), ("separate requests", "s")):
        mine = [r for r in rows if r["way"] == way]
        left.plot([r["n"] for r in mine], [r["ttft_all_s"] for r in mine], marker=marker, label=way)
        right.plot([r["n"] for r in mine], [r["kv_bytes"] / 2**20 for r in mine], marker=marker, label=way)
    left.set(xlabel="n (samples)", ylabel="seconds until every sample's first token", xscale="log", title="TTFT")
    right.set(xlabel="n (samples)", ylabel="KV MiB moved prefill -> decode", xscale="log", title="KV transferred")
    for axis in (left, right):
        axis.set_xticks(NS, [str(n) for n in NS])
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle("n samples under P/D: one request (one prefill, one transfer) vs n requests")
    fig.tight_layout()
    fig.savefig(RESULTS / "pd_n_samples.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
