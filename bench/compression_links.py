"""KV compression on emulated links: no compression vs static profiles vs the adaptive
controller, on real prefill/decode workers, in one run.

For each link bandwidth (the connector's per-link token-bucket rate limiter: 0.5, 1, 5, 10,
25 Gbps and unlimited) one disaggregated app is deployed with adaptive compression; every
request then either pins a profile (`x-tandem-kv-profile`: identity for "no compression",
or one of the static profiles) or leaves the choice to the controller. Prompts of 512–2,000
distinct random tokens (no prefix-cache hits), streamed completions, greedy. Reported: TTFT
and end-to-end latency medians per (bandwidth, configuration), and each configuration's
TTFT relative to no compression and to the best static profile; and the KV handoff alone
(the pull, with the publisher's on-demand encode inside it, then verify, decode and write
on the decode side, from the transfer telemetry),
the part of TTFT compression can shorten, with the codec each configuration really used.

Needs the profile library (`tandem profile`) for the adaptive controller; without one it can
only choose identity.

Writes bench/results/compression_links.{json,csv,png}.

    python -m bench.compression_links [--repeats 3] [--gbps 0.5 --gbps 1 ...]
    python -m bench.compression_links --box [--delay-ms 0.5 --delay-ms 5]   # real links (root)

With ``--box`` prefill and decode run on two nodes of a cluster in a box and the links are
real (`tc` on veths between network namespaces) instead of the connector's token bucket;
results go to compression_links_box.* with a side-by-side table against the bucket's.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any

import httpx
import typer
from rich.console import Console

from bench.common import RESULTS, markdown_table, median, write_results

console = Console()
PORT = 8312
MODEL = "smollm2-135m-instruct"
LENGTHS = [512, 1024, 2000]
STATIC_PROFILES = ["int8-kivi", "int4-kivi-g64", "fp8", "zstd3"]
# The link speeds of the issue, in Gbps; 0 = no rate limit.
DEFAULT_GBPS = [0.5, 1.0, 5.0, 10.0, 25.0, 0.0]
# The SLO class for the adaptive runs: KL budget 0.05 nats lets it use every profile above.
ADAPTIVE_CLASS = "relaxed"


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(200, 48000) for _ in range(length)]


async def stream_completion(client: httpx.AsyncClient, prompt: list[int], headers: dict[str, str]) -> dict[str, float]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    first = last = None
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and '"text"' in line:
                now = time.perf_counter()
                first = first or now
                last = now
    assert first is not None and last is not None, "no tokens streamed"
    return {"ttft_s": first - started, "e2e_s": last - started}


def _headers(config: str) -> dict[str, str]:
    if config == "adaptive":
        return {"x-tandem-slo-class": ADAPTIVE_CLASS}
    profile = "identity" if config == "none" else config
    return {"x-tandem-kv-profile": profile, "x-tandem-slo-class": ADAPTIVE_CLASS}


def _last_transfer(redis_url: str) -> dict[str, Any]:
    """The newest transfer record: requests go one at a time, so it is the last request's."""
    from kv_transport.telemetry import read_stream

    records = read_stream(redis_url, count=1)
    return records[-1] if records else {}


async def _measure(url: str, redis_url: str, configs: list[str], repeats: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        # Warm-up; it also gives the controller its first look at the link.
        for config in configs:
            await stream_completion(client, _prompt(rng, 256), _headers(config))
        for length in LENGTHS:
            samples: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
            for _ in range(repeats):
                # Interleaved, so drift on the shared machine hits every configuration alike.
                for config in configs:
                    sample: dict[str, Any] = await stream_completion(client, _prompt(rng, length), _headers(config))
                    transfer = await asyncio.to_thread(_last_transfer, redis_url)
                    # The KV handoff alone: the pull (the publisher encodes inside it), verify,
                    # decode and write into the decode worker's cache: what compression can
                    # shorten.
                    sample["kv_s"] = transfer.get("total_s", 0.0)
                    sample["codec"] = transfer.get("codec", "")
                    samples[config].append(sample)
            for config in configs:
                codecs = [s["codec"] for s in samples[config]]
                rows.append({
                    "prompt_tokens": length,
                    "config": config,
                    "ttft_s": median([s["ttft_s"] for s in samples[config]]),
                    "e2e_s": median([s["e2e_s"] for s in samples[config]]),
                    "kv_handoff_s": median([s["kv_s"] for s in samples[config]]),
                    # What the transfers used (for adaptive: the controller's most frequent pick).
                    "codec": max(set(codecs), key=codecs.count),
                })
    return rows


def main(
    repeats: int = typer.Option(3, help="Requests per point (median reported)."),
    gbps: list[float] = typer.Option(DEFAULT_GBPS, help="Link speeds in Gbps (0 = unlimited)."),
    profiles: list[str] = typer.Option(STATIC_PROFILES, help="Static profiles to compare."),
    box: bool = typer.Option(False, "--box", help="Real shaped links between the nodes of a cluster in a box (root)."),
    delays_ms: list[float] = typer.Option([0.0], "--delay-ms", help="With --box: link delays to run (netem)."),
    update: bool = typer.Option(False, "--update", help="With --box: replace only the measured rows in the "
                                "existing results (rerun some points)."),
    only: list[str] = typer.Option([], "--only", help="With --box: measure only these configurations "
                                   "(none, a profile, adaptive)."),
) -> None:
    if box:
        return main_box(repeats, gbps, profiles, delays_ms, update, only)
    import ray
    from ray import serve

    from control_plane.app import build_app_from_settings
    from control_plane.model import prepare_model
    from control_plane.redis_server import embedded_url, start_embedded
    from control_plane.settings import load_settings

    prepare_model(None)
    redis_url = embedded_url() or start_embedded()
    configs = ["none", *profiles, "adaptive"]
    ray.init(num_cpus=16, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    rows: list[dict[str, Any]] = []
    try:
        for speed in gbps:
            name = f"bench-links-{str(speed).replace('.', '_')}"
            rate = speed * 1e9 / 8 if speed > 0 else None
            settings = load_settings(
                None, app_name=name, port=PORT, redis_url=redis_url,
                kv_connector={"rate_limit_bytes_per_s": rate, "compression": {"mode": "adaptive"}},
            )
            console.print(f"[bold]{speed or 'unlimited'} Gbps[/]: deploying")
            serve.run(build_app_from_settings(settings), name=name, route_prefix="/", blocking=False)
            started = time.perf_counter()
            for row in asyncio.run(_measure(f"http://127.0.0.1:{PORT}", redis_url, configs, repeats, seed=11)):
                rows.append({"gbps": speed if speed > 0 else math.inf, **row})
            console.print(f"  measured in {time.perf_counter() - started:.0f}s")
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    _relative(rows, profiles)
    write_results("compression_links", rows, {"repeats": repeats, "statistic": "median", "lengths": LENGTHS,
                                              "profiles": profiles, "adaptive_slo_class": ADAPTIVE_CLASS})
    _plot(rows, configs)
    console.print(markdown_table(rows, list(rows[0])))


BOX = "links"


def main_box(
    repeats: int, gbps: list[float], profiles: list[str], delays_ms: list[float], update: bool = False,
    only: list[str] | None = None,
) -> None:
    """The same measurement with prefill and decode on two nodes of a cluster in a box,
    their links shaped by `tc` (both directions, both nodes), no token bucket; one deploy,
    the links changed between speeds. Writes compression_links_box.* and a side-by-side
    table against the token-bucket results (compression_links.json) when they exist."""
    import json

    from control_plane.cluster import box as boxlib
    from control_plane.cluster.deploy import box_settings, deploy
    from control_plane.cluster.netns import LinkSpec, has_netem
    from control_plane.model import prepare_model

    if any(delays_ms) and not has_netem():
        console.print("[yellow]this kernel has no netem: the delays are left out[/]")
        delays_ms = [d for d in delays_ms if not d] or [0.0]
    from bench.cluster_adaptive import _library
    from control_plane.settings import DEFAULT_SERVED_NAME

    prepare_model(None)
    all_configs = ["none", *profiles, "adaptive"]
    configs = [c for c in all_configs if c in only] if only else all_configs
    # The controller runs on the box's head with the box's Redis: it is handed the profile
    # library of this model on this machine (without one it can only choose identity).
    library = _library(DEFAULT_SERVED_NAME)
    boxlib.down(BOX)
    state = boxlib.up(BOX, roles=boxlib.default_roles(3), subnet="198.18.8.0/24")
    rows: list[dict[str, Any]] = []
    try:
        settings = box_settings(state, kv_connector={"compression": {"mode": "adaptive", "library": str(library)}})
        (url,) = deploy(BOX, [settings])
        for delay in delays_ms:
            for speed in gbps:
                spec = LinkSpec(rate=f"{speed * 1000:g}mbit" if speed > 0 else None, delay_ms=delay)
                for node in state.nodes:
                    boxlib.set_link(BOX, node.name, spec)
                console.print(f"[bold]{spec}[/]")
                started = time.perf_counter()
                for row in asyncio.run(_measure(url, state.redis_url, configs, repeats, seed=11)):
                    rows.append({"gbps": speed if speed > 0 else math.inf, "delay_ms": delay, **row})
                console.print(f"  measured in {time.perf_counter() - started:.0f}s")
    finally:
        boxlib.down(BOX)
    if update and (RESULTS / "compression_links_box.json").exists():
        measured = {(r["gbps"], r["delay_ms"], r["prompt_tokens"], r["config"]) for r in rows}
        kept = [r for r in json.loads((RESULTS / "compression_links_box.json").read_text())["rows"]
                if (r["gbps"], r["delay_ms"], r["prompt_tokens"], r["config"]) not in measured]
        speed_order = {s: i for i, s in enumerate([0.5, 1.0, 5.0, 10.0, 25.0, math.inf])}
        config_order = {c: i for i, c in enumerate(all_configs)}
        rows = sorted(kept + rows, key=lambda r: (r["delay_ms"], speed_order.get(r["gbps"], 99), r["prompt_tokens"],
                                                  config_order.get(r["config"], 99)))
    _relative(rows, profiles)
    write_results("compression_links_box", rows, {"repeats": repeats, "statistic": "median", "lengths": LENGTHS,
                                                  "profiles": profiles, "adaptive_slo_class": ADAPTIVE_CLASS,
                                                  "links": "tc htb on veths between network namespaces"})  # fmt: skip
    _plot([r for r in rows if not r["delay_ms"]], all_configs, "compression_links_box.png")
    bucket_path = RESULTS / "compression_links.json"
    if bucket_path.exists():
        bucket = {(r["gbps"], r["prompt_tokens"], r["config"]): r for r in json.loads(bucket_path.read_text())["rows"]}
        side = []
        for row in rows:
            other = bucket.get((row["gbps"], row["prompt_tokens"], row["config"]))
            if other is None or row["delay_ms"]:
                continue
            side.append({"gbps": row["gbps"], "prompt_tokens": row["prompt_tokens"], "config": row["config"],
                         "ttft_s_link": row["ttft_s"], "ttft_s_bucket": other["ttft_s"],
                         "kv_handoff_s_link": row["kv_handoff_s"], "kv_handoff_s_bucket": other["kv_handoff_s"],
                         "codec_link": row["codec"], "codec_bucket": other["codec"]})  # fmt: skip
        if side:
            write_results("compression_links_box_vs_bucket", side, {"bucket": "compression_links.json"})
            console.print(markdown_table(side, list(side[0])))
    console.print(markdown_table(rows, list(rows[0])))


def _relative(rows: list[dict[str, Any]], profiles: list[str]) -> None:
    """Each row's TTFT against no compression and against the best static profile at the
    same bandwidth and prompt length."""
    groups: dict[tuple[float, float, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["gbps"], row.get("delay_ms", 0.0), row["prompt_tokens"]), {})[row["config"]] = row
    for group in groups.values():
        none = group["none"]["ttft_s"]
        none_kv = group["none"]["kv_handoff_s"]
        best_static = min(group[p]["ttft_s"] for p in profiles if p in group)
        for row in group.values():
            row["ttft_vs_none"] = row["ttft_s"] / none
            row["ttft_vs_best_static"] = row["ttft_s"] / best_static
            row["kv_handoff_speedup_vs_none"] = none_kv / row["kv_handoff_s"] if row["kv_handoff_s"] else math.nan


def _plot(rows: list[dict[str, Any]], configs: list[str], name: str = "compression_links.png") -> None:
    """TTFT (top) and the KV handoff alone (bottom) per prompt length, against the link."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["prompt_tokens"] for r in rows})
    metrics = [("ttft_s", "TTFT"), ("kv_handoff_s", "KV handoff")]
    fig, axes = plt.subplots(len(metrics), len(lengths), figsize=(5 * len(lengths), 8), squeeze=False)
    speeds = sorted({r["gbps"] for r in rows})
    labels = ["∞" if math.isinf(s) else f"{s:g}" for s in speeds]
    for row_axes, (metric, title) in zip(axes, metrics, strict=True):
        for ax, length in zip(row_axes, lengths, strict=True):
            for config in configs:
                points = {r["gbps"]: r[metric] for r in rows if r["prompt_tokens"] == length and r["config"] == config}
                ax.plot(range(len(speeds)), [points.get(s, math.nan) * 1000 for s in speeds], marker="o",
                        label=config, linewidth=2.5 if config == "adaptive" else 1.2)
            ax.set_xticks(range(len(speeds)), labels)
            ax.set_xlabel("link (Gbps)")
            ax.set_ylabel(f"{title} (ms, median)")
            ax.set_yscale("log")
            ax.set_title(f"{title}, {length}-token prompts")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=120)


if __name__ == "__main__":
    typer.run(main)
