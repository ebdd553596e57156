"""Decode lent to the prefill pool (``routing.disaggregation.lend_decode_at``) on real
engines: what lending buys when the mix turns to long answers faster than a decode engine
can start, and what it costs the prefills.

One disaggregated app (one prefill and one decode engine, one core each; decode's batch
capped at ``--decode-max-seqs``, as a GPU's is by its KV memory) serves two
ingresses that differ only in ``lend_decode_at``: ``off`` (0) and ``lend`` (``--lend-at``).
Each round sends the same load to one of them. Two workloads:

- ``answers``: decode-heavy, ``--concurrency`` streams of short prompts with
  ``--max-tokens`` answers each (``ignore_eos``), ``--requests`` in all; the prefill
  engine is mostly idle, which is what lending puts to work;
- ``answers+documents``: the same, while long-document prompts (~1,500 tokens, one token
  each) arrive every ``--document-every`` seconds. Lending holds back while a document is
  queued, but a stream lent before one arrives shares the prefill engine with it: the
  answers' throughput and the documents' TTFT show what each side pays.

Rounds alternate off, lend, off, lend... so both see the same machine; the prefix caches
are emptied before each.

Reported per (workload, configuration), medians over the rounds: the streams' TPOT p50/p90,
their TTFT p50/p90, the answer tokens per second of the whole load, the documents' TTFT
p50, and the requests lent (documents included) per stream of the load (from the
ingress's ``tandem:prefill_decisions``).

    python -m bench.lend_decode [--rounds 2] [--concurrency 8] [--requests 24]

Writes bench/results/lend_decode.{json,csv,png}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from typing import Any

import httpx
import typer
from rich.console import Console

from bench.common import RESULTS, grouped_bars, local_serve, markdown_table, write_results
from bench.conditional_disagg import _decisions, _percentile
from bench.pd_n_samples import prompt_of

console = Console()
PORT = 8316
APP = "bench-lend"
MODEL = "smollm2-135m-instruct"
CONFIGS = ["off", "lend"]
WORKLOADS = ["answers", "answers+documents"]


async def _stream(http: httpx.AsyncClient, path: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    stamps: list[float] = []
    done = False
    async with http.stream("POST", f"{path}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            if not line.startswith("data: ") or done:
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                stamps.append(time.perf_counter() - started)
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"ttft_s": stamps[0] if stamps else float("nan"), "tpot_s": tpot, "tokens": len(stamps)}


async def _probe(http: httpx.AsyncClient, path: str, rng: random.Random, stop: asyncio.Event,
                 every_s: float) -> list[float]:
    """Long documents, one token each, one every ``every_s`` (open loop: the same rate
    whatever their latency) until ``stop``: their TTFTs."""
    async def one(body: dict[str, Any]) -> float:
        started = time.perf_counter()
        response = await http.post(f"{path}/v1/chat/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - started

    sent = []
    while not stop.is_set():
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt_of(rng, 1500)}], "max_tokens": 1}
        sent.append(asyncio.ensure_future(one(body)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)
    return list(await asyncio.gather(*sent))


async def _round(url: str, path: str, requests: int, concurrency: int, max_tokens: int, seed: int,
                 documents_every_s: float | None) -> tuple[list[dict[str, Any]], list[float], float, int]:
    """(the streams' results, the probes' TTFTs, wall seconds, failed requests)"""
    rng = random.Random(seed)
    prompts = [f"Request {i}. " + prompt_of(rng, 30) for i in range(requests)]
    results: list[dict[str, Any]] = []
    failed = 0
    async with httpx.AsyncClient(base_url=url, timeout=900, trust_env=False) as http:
        stop = asyncio.Event()
        probe = (asyncio.ensure_future(_probe(http, path, random.Random(seed + 1), stop, documents_every_s))
                 if documents_every_s else None)
        queue: asyncio.Queue[str] = asyncio.Queue()
        for prompt in prompts:
            queue.put_nowait(prompt)

        async def client() -> None:
            nonlocal failed
            while not queue.empty():
                prompt = queue.get_nowait()
                try:
                    results.append(await _stream(http, path, prompt, max_tokens))
                except (httpx.HTTPError, RuntimeError) as exc:
                    console.print(f"[red]failed: {exc!r}[/]")
                    failed += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        stop.set()
        probes = await probe if probe is not None else []
    return results, probes, wall, failed


def main(
    rounds: int = typer.Option(2, help="Rounds per configuration (alternating)."),
    concurrency: int = typer.Option(8, help="Concurrent streams."),
    requests: int = typer.Option(24, help="Requests per round."),
    max_tokens: int = typer.Option(96, help="Answer tokens per request."),
    decode_max_seqs: int = typer.Option(4, help="The decode engine's max_num_seqs: its batch at capacity."),
    document_every_s: float = typer.Option(8.0, help="answers+documents: a document every this many seconds."),
    lend_at: int = typer.Option(4, help="lend_decode_at of the lending ingress."),
    lend_max_queued_tokens: int = typer.Option(512, help="lend_max_queued_tokens of the lending ingress."),
) -> None:
    from ray import serve

    from bench.live_routers import wait_http_ok
    from control_plane.app import build_app_from_settings, with_kv_secret
    from control_plane.settings import load_settings
    from routing.ingress import Ingress

    per_round: list[dict[str, Any]] = []
    with local_serve(PORT) as (url, redis_url):
        # One core per engine: the prefill engine's core is what lending puts to work. The
        # decode engine's batch is capped as a GPU's is by its KV memory (there, requests
        # beyond it queue for blocks); on a CPU a step costs about the same at 4 streams
        # as at 8, so without a cap there is no decode capacity to run out of.
        base = with_kv_secret(load_settings(
            None, app_name=APP, port=PORT, redis_url=redis_url, route_prefix="/off", prefill={"cpu_threads": 1},
            decode={"cpu_threads": 1, "engine_args": {"max_num_seqs": decode_max_seqs}},
        ))
        serve.run(build_app_from_settings(base), name=APP, route_prefix="/off", blocking=False)
        prefill = serve.get_deployment_handle("PrefillWorker", app_name=APP)
        decode = serve.get_deployment_handle("DecodeWorker", app_name=APP)
        routing = base.routing.model_copy(update={"disaggregation": base.routing.disaggregation.model_copy(
            update={"lend_decode_at": lend_at, "lend_max_queued_tokens": lend_max_queued_tokens})})
        lending = base.model_copy(update={"routing": routing, "route_prefix": "/lend"})
        serve.run(Ingress.bind(lending.model_dump(mode="json"), prefill=prefill, decode=decode),
                  name=f"{APP}-lend", route_prefix="/lend", blocking=False)
        for config in CONFIGS:
            wait_http_ok(f"{url}/{config}/health", 900)
            asyncio.run(_round(url, f"/{config}", 4, 2, 8, seed=1, documents_every_s=5.0))  # warm-up
        for workload, index in ((w, i) for w in WORKLOADS for i in range(rounds * len(CONFIGS))):
            config = CONFIGS[index % len(CONFIGS)]
            for handle in (prefill, decode):
                while not handle.reset_prefix_cache.remote().result():
                    time.sleep(0.5)
            before = _decisions(url, f"/{config}")
            results, probes, wall, failed = asyncio.run(
                _round(url, f"/{config}", requests, concurrency, max_tokens, seed=7 + index // len(CONFIGS),
                       documents_every_s=None if workload == "answers" else document_every_s))
            after = _decisions(url, f"/{config}")
            lent = after.get("lent", 0.0) - before.get("lent", 0.0)
            tpots = [r["tpot_s"] for r in results]
            ttfts = [r["ttft_s"] for r in results]
            row = {
                "workload": workload, "config": config, "round": index // len(CONFIGS), "requests": len(results),
                "failed": failed,
                "tpot_p50_s": statistics.median(tpots), "tpot_p90_s": _percentile(tpots, 0.9),
                "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": _percentile(ttfts, 0.9),
                "tokens_per_s": sum(r["tokens"] for r in results) / wall,
                "probe_ttft_p50_s": statistics.median(probes) if probes else float("nan"),
                "documents": len(probes), "lent_share": lent / requests, "wall_s": wall,
            }
            per_round.append(row)
            console.print(row)
    rows = []
    for workload in WORKLOADS:
        for config in CONFIGS:
            mine = [r for r in per_round if r["config"] == config and r["workload"] == workload]
            summary: dict[str, Any] = {"workload": workload, "config": config, "rounds": len(mine),
                                       "requests": sum(r["requests"] for r in mine),
                                       "failed": sum(r["failed"] for r in mine)}
            for key in ("tpot_p50_s", "tpot_p90_s", "ttft_p50_s", "ttft_p90_s", "tokens_per_s", "probe_ttft_p50_s",
                        "lent_share"):
                summary[key] = statistics.median(r[key] for r in mine)
            rows.append(summary)
    for row in rows:
        off = next(r for r in rows if r["workload"] == row["workload"] and r["config"] == "off")
        for key in ("tpot_p50_s", "tokens_per_s", "probe_ttft_p50_s", "ttft_p50_s"):
            row[f"{key}_vs_off"] = row[key] / off[key] if off[key] == off[key] else float("nan")
    write_results("lend_decode", rows, {
        "rounds": rounds, "concurrency": concurrency, "requests": requests, "max_tokens": max_tokens,
        "lend_decode_at": lend_at, "decode_max_num_seqs": decode_max_seqs, "document_every_s": document_every_s, "lend_max_queued_tokens": lend_max_queued_tokens,
        "engines": "1 prefill + 1 decode, one core each; bf16, tcp",
        "per_round": per_round,
    })
    _plot(rows)
    console.print(markdown_table(rows, ["workload", "config", "requests", "failed", "tpot_p50_s", "tokens_per_s",
                                        "ttft_p50_s", "probe_ttft_p50_s", "lent_share"]))


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("tpot_p50_s", "stream TPOT p50 (s)"), ("tokens_per_s", "answer tokens / s"),
              ("ttft_p50_s", "stream TTFT p50 (s)"), ("probe_ttft_p50_s", "document TTFT p50 (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.8))
    for axis, (key, label) in zip(axes, panels, strict=True):
        grouped_bars(axis, rows, key, WORKLOADS, CONFIGS, colors=["tab:gray", "tab:green"])
        axis.set_title(label)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Decode lent to the prefill engine by routing (1P + 1D, one core each)")
    fig.tight_layout()
    fig.savefig(RESULTS / "lend_decode.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
