"""Throughput, compression ratio and error of every built-in KV codec profile, per stage.

Two cases of realistic size:
  smollm2   the default model's real KV: 30 layers x --tokens tokens x 3 heads x 64 (bf16),
            computed with transformers on CPU from the README's text (synthetic KV of the
            same shape if the model is not prepared; the result says which);
  d128      synthetic KV shaped like an 8B model's: --d128-layers layers x --d128-tokens
            tokens x 8 heads x 128 (bf16), keys with outlier channels.

For each profile: encode and decode MB/s of the whole request (median of --repeats, raw
bytes / seconds), compression ratio (raw / blob bytes), relative L2 error and cosine
similarity of K and V, the worst observed/allowed error ratio against the profile's
stated bound, and MB/s of each stage (from one extra, synchronised pass). Runs on CUDA
when available (the same code); the device is recorded. Writes
bench/results/codec_throughput.{json,csv,png}.

    python -m bench.codec_throughput [--repeats 5] [--tokens 1000] [--threads 1]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console

from bench.common import RESULTS, markdown_table, median, write_results
from kv_transport.codecs import bound_ratio, decode_layer, encode_layer, list_profiles
from kv_transport.codecs.profiles import Profile

console = Console()
MB = 1e6
ENCODE_STAGES = ("transform", "quantize", "pack", "byteplane", "copy", "lossless")
DECODE_STAGES = ("lossless", "copy", "byteplane", "unpack", "dequantize", "transform", "assemble")
README = Path(__file__).resolve().parents[1] / "README.md"

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def real_smollm2_kv(tokens: int) -> Layers | None:
    """The default model's KV for the first `tokens` tokens of the README (None: no model)."""
    try:
        from control_plane.model import ModelPreparationError, resolve_model

        path = resolve_model(None)
    except (ImportError, ModelPreparationError) as exc:
        console.print(f"[yellow]no real KV ({exc}); using synthetic KV of the same shape")
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    text = README.read_text()
    while len(tokenizer(text).input_ids) < tokens:
        text += "\n" + text
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    # [batch, kv_heads, tokens, head_dim] -> canonical [tokens, kv_heads, head_dim], bf16 as cached
    return [
        tuple(t[0].permute(1, 0, 2).to(torch.bfloat16).contiguous() for t in (layer.keys, layer.values))
        for layer in cache.layers
    ]


def synthetic_kv(layers: int, tokens: int, heads: int, head_dim: int, seed: int = 0) -> Layers:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        k = torch.randn(tokens, heads, head_dim, generator=generator)
        # Keys carry a few large fixed channels (what KIVI's per-channel axis is for).
        outliers = torch.randint(0, head_dim, (heads, 4), generator=generator)
        k.scatter_add_(2, outliers.expand(tokens, heads, 4), torch.full((tokens, heads, 4), 8.0))
        v = torch.randn(tokens, heads, head_dim, generator=generator) * 0.5
        out.append((k.to(torch.bfloat16), v.to(torch.bfloat16)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(profile: Profile, layers: Layers, repeats: int, device: torch.device) -> dict[str, Any]:
    raw_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
    encode_layer(profile, 0, *layers[0])  # warm-up: caches, allocator, lazy imports
    decode_layer(encode_layer(profile, 0, *layers[0]), device=device)
    encode_times, decode_times = [], []
    blobs: list[bytearray] = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        blobs = [encode_layer(profile, index, k, v) for index, (k, v) in enumerate(layers)]
        _sync(device)
        encode_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        decoded = [decode_layer(blob, device=device) for blob in blobs]
        _sync(device)
        decode_times.append(time.perf_counter() - started)
    encode_stages: dict[str, float] = {}
    decode_stages: dict[str, float] = {}
    for index, (k, v) in enumerate(layers):
        decode_layer(encode_layer(profile, index, k, v, timings=encode_stages), device=device, timings=decode_stages)

    error_sq = {"k": 0.0, "v": 0.0}
    norm_sq = {"k": 0.0, "v": 0.0}
    cosines = {"k": [], "v": []}
    for (k, v), (k_hat, v_hat) in zip(layers, decoded, strict=True):
        for name, ref, est in (("k", k, k_hat), ("v", v, v_hat)):
            ref32, est32 = ref.float(), est.float()
            error_sq[name] += float((est32 - ref32).square().sum())
            norm_sq[name] += float(ref32.square().sum())
            cosines[name].append(float(torch.nn.functional.cosine_similarity(ref32, est32, dim=-1).mean()))
    checked = sorted({0, min(1, len(layers) - 1), len(layers) // 2, len(layers) - 1})
    worst_bound = max(bound_ratio(profile, i, *layers[i], *decoded[i]) for i in checked)
    encoded_bytes = sum(len(blob) for blob in blobs)
    row: dict[str, Any] = {
        "profile": profile.name,
        "version": profile.version,
        "lossless": profile.is_lossless,
        "raw_mb": raw_bytes / MB,
        "encoded_mb": encoded_bytes / MB,
        "ratio": raw_bytes / encoded_bytes,
        "encode_mb_s": raw_bytes / MB / median(encode_times),
        "decode_mb_s": raw_bytes / MB / median(decode_times),
        "k_rel_l2": (error_sq["k"] / norm_sq["k"]) ** 0.5,
        "v_rel_l2": (error_sq["v"] / norm_sq["v"]) ** 0.5,
        "k_cosine": sum(cosines["k"]) / len(cosines["k"]),
        "v_cosine": sum(cosines["v"]) / len(cosines["v"]),
        "bound_ratio": worst_bound,
    }
    present = stages_of(profile)
    for prefix, stages, seen in (("enc", ENCODE_STAGES, encode_stages), ("dec", DECODE_STAGES, decode_stages)):
        for stage in stages:
            seconds = seen.get(stage, 0.0)
            # Stages the profile does not have read as empty (their bookkeeping is noise).
            row[f"{prefix}_{stage}_mb_s"] = raw_bytes / MB / seconds if stage in present and seconds > 0 else None
    return row


def stages_of(profile: Profile) -> set[str]:
    """The stages this profile really runs (quantize, copy, assemble always do: for raw
    parts, quantize is gathering their bytes)."""
    q = profile.quantize
    specs = [q.main.key, q.main.value]
    specs += [q.first_layers_quant.key, q.first_layers_quant.value] if q.first_layers else []
    specs += [q.recent_quant.key, q.recent_quant.value] if q.recent_tokens else []
    stages = {"quantize", "copy", "assemble"}
    if profile.transform.kind != "none":
        stages.add("transform")
    if any(s.method == "minmax" and s.bits < 8 for s in specs):
        stages |= {"pack", "unpack"}
    if any(s.method != "none" for s in specs):
        stages.add("dequantize")
    if profile.lossless.byteplane:
        stages.add("byteplane")
    if profile.lossless.codec != "none":
        stages.add("lossless")
    return stages


def main(
    repeats: int = typer.Option(5, min=1, help="Timed encode+decode passes per profile (median reported)."),
    tokens: int = typer.Option(1000, help="Tokens of the default model's KV."),
    d128_layers: int = typer.Option(8, help="Layers of the synthetic head_dim=128 case."),
    d128_tokens: int = typer.Option(2000, help="Tokens of the synthetic head_dim=128 case."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
    device: str = typer.Option("auto", help="auto (cuda if available), cpu or cuda."),
    profiles: list[str] = typer.Option([], help="Only these profiles (default: all built-ins)."),
) -> None:
    if threads:
        torch.set_num_threads(threads)
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    chosen = [p for p in list_profiles() if not profiles or p.name in profiles]
    real = real_smollm2_kv(tokens)
    cases = {
        "smollm2-real" if real else "smollm2-synthetic": real or synthetic_kv(30, tokens, 3, 64),
        "d128-synthetic": synthetic_kv(d128_layers, d128_tokens, 8, 128, seed=1),
    }
    rows = []
    for case, layers in cases.items():
        layers = [(k.to(target), v.to(target)) for k, v in layers]
        for profile in chosen:
            console.print(f"{case}: {profile.name}")
            rows.append({"case": case, **measure(profile, layers, repeats, target)})
    import lz4
    import zstandard

    meta = {
        "device": torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "zstandard": zstandard.__version__,
        "lz4": lz4.__version__,
        "repeats": repeats,
        "statistic": "median",
        "cases": {case: {"layers": len(ls), "shape": list(ls[0][0].shape), "dtype": "bfloat16"} for case, ls in cases.items()},
        "mb": "10^6 bytes of raw (uncompressed) K+V; stage MB/s are raw bytes / that stage's seconds",
    }
    write_results("codec_throughput", rows, meta)
    _plot(rows, meta["device"])
    columns = ["case", "profile", "ratio", "encode_mb_s", "decode_mb_s", "k_rel_l2", "v_rel_l2", "k_cosine", "bound_ratio"]
    console.print(markdown_table(rows, columns))


def _plot(rows: list[dict[str, Any]], device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases) + 1.5, 5), squeeze=False, layout="constrained")
    norm = LogNorm(vmin=1e-3, vmax=1.0)
    for ax, case in zip(axes[0], cases, strict=True):
        subset = [r for r in rows if r["case"] == case]
        # Lossless profiles have zero error: draw them at the bottom of the colour scale.
        errors = [max(r["k_rel_l2"], r["v_rel_l2"], 1e-3) for r in subset]
        points = ax.scatter(
            [r["encode_mb_s"] for r in subset],
            [r["ratio"] for r in subset],
            c=errors,
            cmap="viridis",
            norm=norm,
            s=60,
            edgecolors="black",
        )
        # Profiles of equal ratio (the 4-bit ones) would print over each other: stagger them.
        previous, offset = None, 0
        for r in sorted(subset, key=lambda r: r["ratio"]):
            offset = offset + 9 if previous is not None and r["ratio"] - previous < 0.05 else 3
            previous = r["ratio"]
            ax.annotate(r["profile"], (r["encode_mb_s"], r["ratio"]), fontsize=7, xytext=(4, offset), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xticks([t for t in (100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("encode throughput (MB/s of raw KV, median)")
        ax.set_ylabel("compression ratio (raw / encoded)")
        ax.set_title(f"{case} on {device}")
        ax.grid(True, alpha=0.3)
    fig.colorbar(points, ax=axes[0].tolist(), label="relative L2 error (max of K, V; lossless at 1e-3)")
    fig.savefig(RESULTS / "codec_throughput.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
