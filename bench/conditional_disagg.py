"""Conditional disaggregation on real workers: always-disaggregate vs threshold vs the cost
model vs colocated, on short, long and multi-turn workloads.

One disaggregated app (one prefill and one decode engine, the embedded default) serves
three ingresses that differ only in ``routing.disaggregation.mode`` (always, threshold,
cost_model), one after the other; a colocated app (one engine) is the fourth configuration.
Each workload runs against each configuration with the workers' prefix caches emptied
first (the cost model's fitted rates are kept: they are what it learned online):

- short: prompts of at most 64 tokens, ``--concurrency`` streams at a time;
- long: prompts of about 1,500 tokens;
- multi-turn: conversations of 4 turns (a ~600-token first turn, then ~40 new tokens a
  turn after the previous answer), one stream per conversation at a time.

Reported per (configuration, workload): TTFT p50/p90, the decode speed of the concurrent
streams (TPOT p50, per stream), and the share of requests prefilled locally (from the
ingress's ``tandem:prefill_decisions``).

    python -m bench.conditional_disagg [--concurrency 4] [--requests 16]

Writes bench/results/conditional_disagg.{json,csv,png}.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from typing import Any

import httpx
import typer
from rich.console import Console

from bench.common import RESULTS, grouped_bars, local_serve, markdown_table, write_results
from bench.pd_n_samples import prompt_of

console = Console()
PORT = 8314
APP = "bench-cd"
MODEL = "smollm2-135m-instruct"
MODES = ["always", "threshold", "cost_model"]
CONFIGS = [*MODES, "colocated"]
WORKLOADS = ["short", "long", "multi-turn"]
MAX_TOKENS = 32


async def _stream(http: httpx.AsyncClient, path: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}
    started = time.perf_counter()
    stamps: list[float] = []
    text = []
    async with http.stream("POST", f"{path}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    stamps.append(time.perf_counter() - started)
                    text.append(content)
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"ttft_s": stamps[0] if stamps else float("nan"), "tpot_s": tpot, "text": "".join(text)}


async def _run_workload(url: str, path: str, workload: str, requests: int, concurrency: int,
                        seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=900, trust_env=False) as http:
        if workload == "multi-turn":
            async def conversation(c: int) -> None:
                messages = [{"role": "system", "content": f"Conversation {c}. " + prompt_of(rng, 600)}]
                for _ in range(4):
                    messages.append({"role": "user", "content": prompt_of(rng, 40)})
                    answer = await _stream(http, path, messages)
                    results.append(answer)
                    messages.append({"role": "assistant", "content": answer["text"]})

            await asyncio.gather(*(conversation(c) for c in range(concurrency)))
            return results
        words = 40 if workload == "short" else 1500
        prompts = [[{"role": "user", "content": prompt_of(rng, words)}] for _ in range(requests)]
        queue = iter(prompts)

        async def client() -> None:
            for messages in queue:
                results.append(await _stream(http, path, messages))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def _decisions(url: str, path: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}{path}/metrics", timeout=30, trust_env=False).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tandem:prefill_decisions_total":
                out[sample.labels["where"]] = out.get(sample.labels["where"], 0.0) + sample.value
    return out


def _percentile(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def main(
    concurrency: int = typer.Option(4, help="Concurrent streams (conversations, for multi-turn)."),
    requests: int = typer.Option(16, help="Requests per short and long workload."),
) -> None:
    from ray import serve

    from bench.live_routers import wait_http_ok
    from control_plane.app import build_app_from_settings, with_kv_secret
    from control_plane.settings import load_settings
    from routing.ingress import Ingress

    rows: list[dict[str, Any]] = []
    with local_serve(PORT) as (url, redis_url):
        base = with_kv_secret(load_settings(None, app_name=APP, port=PORT, redis_url=redis_url, route_prefix="/always"))
        serve.run(build_app_from_settings(base), name=APP, route_prefix="/always", blocking=False)
        colocated = load_settings(None, app_name=f"{APP}-colocated", port=PORT, redis_url=redis_url, mode="colocated",
                                  route_prefix="/colocated")
        serve.run(build_app_from_settings(colocated), name=colocated.app_name, route_prefix="/colocated",
                  blocking=False)
        prefill = serve.get_deployment_handle("PrefillWorker", app_name=APP)
        decode = serve.get_deployment_handle("DecodeWorker", app_name=APP)
        for mode in MODES[1:]:
            # The same app (its routers and worker registry), another ingress in front of it.
            routing = base.routing.model_copy(update={"disaggregation": base.routing.disaggregation.model_copy(
                update={"mode": mode})})
            settings = base.model_copy(update={"routing": routing, "route_prefix": f"/{mode}"})
            serve.run(Ingress.bind(settings.model_dump(mode="json"), prefill=prefill, decode=decode),
                      name=f"{APP}-{mode}", route_prefix=f"/{mode}", blocking=False)
        for config in CONFIGS:
            wait_http_ok(f"{url}/{config}/health", 900)
        handles = {"always": [prefill, decode],
                   "colocated": [serve.get_deployment_handle("ColocatedWorker", app_name=colocated.app_name)]}
        # Warm-up, and the cost model's first measurements: a few prompts of every size.
        for config in CONFIGS:
            asyncio.run(_run_workload(url, f"/{config}", "long", 4, 2, seed=1))
            asyncio.run(_run_workload(url, f"/{config}", "short", 4, 2, seed=2))
        for workload in WORKLOADS:
            for config in CONFIGS:
                for handle in handles["colocated" if config == "colocated" else "always"]:
                    while not handle.reset_prefix_cache.remote().result():
                        time.sleep(0.5)
                before = _decisions(url, f"/{config}") if config != "colocated" else {}
                started = time.perf_counter()
                results = asyncio.run(_run_workload(url, f"/{config}", workload, requests, concurrency, seed=7))
                wall = time.perf_counter() - started
                after = _decisions(url, f"/{config}") if config != "colocated" else {}
                local = after.get("local", 0) - before.get("local", 0)
                remote = after.get("remote", 0) - before.get("remote", 0)
                ttfts = [r["ttft_s"] for r in results]
                tpots = [r["tpot_s"] for r in results]
                row = {
                    "workload": workload, "config": config, "requests": len(results),
                    "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": _percentile(ttfts, 0.9),
                    "tpot_p50_s": statistics.median([t for t in tpots if t == t]),
                    "local_share": local / (local + remote) if local + remote else float("nan"),
                    "wall_s": wall,
                }
                rows.append(row)
                console.print(row)
    for row in rows:
        always = next(r for r in rows if r["workload"] == row["workload"] and r["config"] == "always")
        row["ttft_p50_vs_always"] = row["ttft_p50_s"] / always["ttft_p50_s"]
        row["tpot_p50_vs_always"] = row["tpot_p50_s"] / always["tpot_p50_s"]
    write_results("conditional_disagg", rows, {"concurrency": concurrency, "requests": requests,
                                               "max_tokens": MAX_TOKENS,
                                               "engines": "P/D: 1 prefill + 1 decode; colocated: 1; bf16, tcp"})
    _plot(rows)
    console.print(markdown_table(rows, ["workload", "config", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s",
                                        "local_share", "ttft_p50_vs_always"]))


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for axis, (key, label) in zip(axes, (("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p90_s", "TTFT p90 (s)"),
                                         ("tpot_p50_s", "TPOT p50 per stream (s)")), strict=True):
        grouped_bars(axis, rows, key, WORKLOADS, CONFIGS)
        axis.set_title(label)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Conditional disaggregation: where each prompt is prefilled")
    fig.tight_layout()
    fig.savefig(RESULTS / "conditional_disagg.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
