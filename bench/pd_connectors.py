"""End to end on real workers: Tandem's connector (tcp, nixl) vs vLLM's NixlConnector vs a
colocated engine, in one run on this machine.

Each configuration is deployed alone (the machine is shared), warmed up, then measured.
On 2 cores a prefill and a decode engine get one core each, so "colocated-1core" is the
reference for what the handoff itself costs; "colocated" (both cores) is what a single
engine would get.
- TTFT and decode tokens/s of streamed completions with prompts of 256-1900 tokens
  (distinct random token ids, so no prefix-cache hits), median of the repeats;
- decode tokens/s of one long stream alone and while four long-prompt requests push KV
  transfers through the same decode worker ("transfers in flight").

Writes bench/results/pd_connectors.{json,csv,png}.

    python -m bench.pd_connectors [--repeats 3] [--configs colocated tandem-tcp ...]
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx
import typer
from rich.console import Console

from bench.common import RESULTS, markdown_table, median, write_results

console = Console()
PORT = 8311
MODEL = "smollm2-135m-instruct"
LENGTHS = [256, 512, 1024, 1900]

CONFIGS: dict[str, dict[str, Any]] = {
    # Both cores, as one engine would have them without disaggregation...
    "colocated": {"mode": "colocated"},
    # ...and one core, what each of the prefill and decode engines gets here: the
    # apples-to-apples reference for the cost of the handoff itself.
    "colocated-1core": {"mode": "colocated", "colocated": {"cpu_threads": 1}},
    "tandem-tcp": {"kv_connector": {"name": "TandemConnector", "transport": "tcp"}},
    "tandem-nixl": {"kv_connector": {"name": "TandemConnector", "transport": "nixl"}},
    "vllm-nixl": {"kv_connector": {"name": "NixlConnector"}},
}


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(200, 48000) for _ in range(length)]


async def _stream(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict[str, float]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and '"text"' in line:
                stamps.append(time.perf_counter())
    ttft = stamps[0] - started
    decode_tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {"ttft_s": ttft, "decode_tok_s": decode_tps, "tokens": len(stamps)}


async def _measure(url: str, repeats: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for _ in range(2):  # warm-up
            await _stream(client, _prompt(rng, 128), 8)
        for length in LENGTHS:
            runs = [await _stream(client, _prompt(rng, length), 64) for _ in range(repeats)]
            out[f"ttft_{length}"] = median([r["ttft_s"] for r in runs])
            out[f"decode_tok_s_{length}"] = median([r["decode_tok_s"] for r in runs])
        alone = [await _stream(client, _prompt(rng, 256), 128) for _ in range(repeats)]
        out["decode_tok_s_alone"] = median([r["decode_tok_s"] for r in alone])
        loaded = []
        for _ in range(repeats):
            long_stream = asyncio.create_task(_stream(client, _prompt(rng, 256), 128))
            await asyncio.sleep(0.5)
            await asyncio.gather(*(_stream(client, _prompt(rng, 1900), 2) for _ in range(4)))
            loaded.append((await long_stream)["decode_tok_s"])
        out["decode_tok_s_with_transfers"] = median(loaded)
    return out


def _deploy(name: str, overrides: dict[str, Any]):
    from ray import serve

    from control_plane.app import build_app_from_settings
    from control_plane.settings import load_settings

    settings = load_settings(None, app_name=f"bench-{name}", port=PORT, **overrides)
    serve.run(build_app_from_settings(settings), name=settings.app_name, route_prefix="/", blocking=False)
    return settings


def main(
    repeats: int = typer.Option(3, help="Requests per point (median reported)."),
    configs: list[str] = typer.Option(list(CONFIGS), help="Which configurations to run."),
) -> None:
    import ray
    from ray import serve

    from control_plane.model import prepare_model

    prepare_model(None)
    ray.init(num_cpus=16, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    rows = []
    try:
        for name in configs:
            console.print(f"[bold]{name}[/]: deploying")
            settings = _deploy(name, CONFIGS[name])
            started = time.perf_counter()
            result = asyncio.run(_measure(f"http://127.0.0.1:{PORT}", repeats, seed=7))
            console.print(f"  measured in {time.perf_counter() - started:.0f}s")
            rows.append({"config": name, **result})
            serve.delete(settings.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()
    base = next((r for r in rows if r["config"] == "colocated-1core"), None)
    if base:
        for row in rows:
            row["ttft_1900_vs_1core"] = row["ttft_1900"] / base["ttft_1900"]
            row["decode_vs_1core"] = row["decode_tok_s_alone"] / base["decode_tok_s_alone"]
    write_results("pd_connectors", rows, {"repeats": repeats, "statistic": "median", "lengths": LENGTHS})
    _plot(rows)
    console.print(markdown_table(rows, list(rows[0])))


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ttft_ax, tps_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        ttft_ax.plot(LENGTHS, [row[f"ttft_{n}"] * 1000 for n in LENGTHS], marker="o", label=row["config"])
    ttft_ax.set_xlabel("prompt tokens")
    ttft_ax.set_ylabel("TTFT (ms, median)")
    ttft_ax.set_title("Time to first token")
    ttft_ax.grid(True, alpha=0.3)
    ttft_ax.legend()
    names = [row["config"] for row in rows]
    x = range(len(rows))
    tps_ax.bar([i - 0.2 for i in x], [row["decode_tok_s_alone"] for row in rows], width=0.4, label="alone")
    tps_ax.bar([i + 0.2 for i in x], [row["decode_tok_s_with_transfers"] for row in rows], width=0.4,
               label="4 KV transfers in flight")
    tps_ax.set_xticks(list(x), names, rotation=20, ha="right")
    tps_ax.set_ylabel("decode tokens/s (median)")
    tps_ax.set_title("Decode speed of one stream")
    tps_ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "pd_connectors.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
