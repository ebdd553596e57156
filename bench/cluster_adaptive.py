"""The adaptive compression controller on a real link, over time.

A 3-node cluster in a box (head, prefill, decode; the bundled model, bf16), compression
adaptive. The prefill node's link runs at 10 Gbit, drops to 500 Mbit, then comes back to
10 Gbit, ``--per-phase`` request pairs each. Each pair is one request left to the
controller (SLO class ``relaxed``) and one pinned to identity (no compression), back to
back with fresh random prompts, so TTFT of "what the controller picked" and of "no
compression" are compared on the same link at the same moment. Per request: TTFT, the
codec its transfer used, and the controller's published decision after it. Needs root and
a profile library (`tandem profile`; without one it runs `tandem profile --quick` into a
temporary folder).

    python -m bench.cluster_adaptive [--per-phase 12] [--prompt-tokens 1500]

Writes bench/results/cluster_adaptive.{json,csv,png}.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console

from bench.common import RESULTS, median, write_results
from bench.compression_links import stream_completion
from control_plane.cluster import box as boxlib
from control_plane.cluster.netns import LinkSpec

BOX = "adapt"
PHASES = [("10gbit", "10gbit"), ("500mbit", "500mbit"), ("10gbit again", "10gbit")]
console = Console()


def _library(model: str) -> Path:
    from control_plane.controller.library import library_path

    stored = library_path(model)
    if stored.exists():
        return stored
    out = Path(tempfile.mkdtemp(prefix="tandem-profile-"))
    tandem = str(Path(sys.executable).parent / "tandem")
    subprocess.run([tandem, "profile", "--quick", "--no-store", "--no-results", "--out", str(out)], check=True)
    return next(out.glob("*.json"))


def main(per_phase: int = typer.Option(12), prompt_tokens: int = typer.Option(1500)) -> None:
    import redis

    from control_plane.cluster.deploy import box_settings, deploy
    from control_plane.settings import DEFAULT_SERVED_NAME
    from kv_transport.decisions import decision_key
    from kv_transport.telemetry import read_stream

    library = _library(DEFAULT_SERVED_NAME)
    boxlib.down(BOX)
    state = boxlib.up(BOX, roles=boxlib.default_roles(3), subnet="198.18.9.0/24")
    prefill = state.nodes_with("prefill")[0]
    rng = random.Random(3)
    rows: list[dict[str, Any]] = []
    try:
        settings = box_settings(state, kv_connector={"compression": {"mode": "adaptive", "library": str(library)}})
        (url,) = deploy(BOX, [settings])
        client = redis.Redis.from_url(state.redis_url)

        async def run() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as http:
                for phase, rate in PHASES:
                    boxlib.set_link(BOX, prefill.name, LinkSpec(rate=rate))
                    for i in range(per_phase):
                        for config, headers in (("adaptive", {"x-tandem-slo-class": "relaxed"}),
                                                ("identity", {"x-tandem-slo-class": "relaxed",
                                                              "x-tandem-kv-profile": "identity"})):  # fmt: skip
                            prompt = [rng.randrange(200, 48000) for _ in range(prompt_tokens)]
                            sample = await stream_completion(http, prompt, headers)
                            record = (await asyncio.to_thread(read_stream, state.redis_url, 1))[-1]
                            raw = client.get(decision_key(settings.app_name, record["link"], "relaxed"))
                            rows.append({
                                "t_s": round(time.time() - started, 2), "phase": phase, "link": rate, "i": i,
                                "config": config, "ttft_s": round(sample["ttft_s"], 4), "codec": record["codec"],
                                "kv_handoff_s": round(record.get("total_s", 0.0), 4),
                                "decision": json.loads(raw)["profile"] if raw else None,
                            })  # fmt: skip
                    console.print(f"{phase}: adaptive used {[r['codec'] for r in rows if r['phase'] == phase and r['config'] == 'adaptive']}")

        started = time.time()
        asyncio.run(run())
    finally:
        boxlib.down(BOX)
    summary = _summary(rows)
    write_results("cluster_adaptive", rows, {"per_phase": per_phase, "prompt_tokens": prompt_tokens,
                                             "library": library.name, "summary": summary})  # fmt: skip
    _plot(rows)
    console.print(summary)


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per phase: transfers until the adaptive requests used the phase's settled codec,
    and the TTFT medians of adaptive vs identity once settled."""
    out = []
    for phase, _ in PHASES:
        adaptive = [r for r in rows if r["phase"] == phase and r["config"] == "adaptive"]
        identity = [r for r in rows if r["phase"] == phase and r["config"] == "identity"]
        settled = adaptive[-1]["decision"]
        first = next((i for i, r in enumerate(adaptive) if all(x["codec"] == settled for x in adaptive[i:])), len(adaptive))
        half = len(adaptive) // 2
        out.append({
            "phase": phase, "settled_profile": settled, "transfers_to_settle": first + 1,
            "ttft_adaptive_s": median([r["ttft_s"] for r in adaptive[half:]]),
            "ttft_identity_s": median([r["ttft_s"] for r in identity[half:]]),
        })  # fmt: skip
    return out


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for config, marker in (("identity", "x"), ("adaptive", "o")):
        points = [r for r in rows if r["config"] == config]
        ax.plot([r["t_s"] for r in points], [r["ttft_s"] for r in points], marker=marker, linestyle="-",
                label=f"{config}" + (" (codec labelled)" if config == "adaptive" else ""))  # fmt: skip
        if config == "adaptive":
            for r in points:
                ax.annotate(r["codec"], (r["t_s"], r["ttft_s"]), fontsize=6, rotation=60)
    for phase, _ in PHASES[1:]:
        start = next(r["t_s"] for r in rows if r["phase"] == phase)
        ax.axvline(start, color="gray", linestyle=":")
        ax.text(start, ax.get_ylim()[1] * 0.95, f" {phase}", fontsize=8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("TTFT (s)")
    ax.set_title("Adaptive compression as the prefill node's link goes 10 Gbit → 500 Mbit → 10 Gbit")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "cluster_adaptive.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
