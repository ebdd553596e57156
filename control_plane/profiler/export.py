"""The profile library the controller reads (format: `control_plane.controller.library`),
built from the profiler's evaluations."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from control_plane.profiler.pareto import normalised_objectives, pareto_mask
from control_plane.profiler.search import IDENTITY, Evaluation


def hardware_id() -> str:
    """What the speeds were measured on: CPU model and torch threads (GPU name if any)."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"cpu:{cpu} ({torch.get_num_threads()} torch threads of {os.cpu_count()} cores)"


def library_entry(evaluation: Evaluation, pareto: bool) -> dict[str, Any]:
    quality, speed = evaluation.quality, evaluation.speed
    entry: dict[str, Any] = {
        # The entry's name is the codec profile's name, and `profile` its full spec, so a
        # connector resolves it with get_profile (built-ins) or Profile.from_dict (searched).
        "name": evaluation.profile.name,
        "profile": evaluation.profile.to_dict(),
        "ratio": quality.ratio,
        "encode_bytes_per_s": speed.encode.bytes_per_s,
        "decode_bytes_per_s": speed.decode.bytes_per_s,
        "fixed_s": speed.fixed_s,
        "quality_loss": quality.quality_loss,
        "greedy_agreement": quality.greedy_agreement,
        "rel_l2_k": quality.rel_l2_k,
        "rel_l2_v": quality.rel_l2_v,
        "cosine_k": quality.cosine_k,
        "cosine_v": quality.cosine_v,
        "pareto": pareto,
        # Extra measurements (the controller ignores them).
        "kl_first_token": quality.kl_first_token,
        "greedy_prefix": quality.greedy_prefix,
        "lossless": evaluation.profile.is_lossless,
        "seconds_per_mb": speed.seconds_per_mb,
        "speed": speed.to_dict(),
        "sources": list(evaluation.sources),
    }
    if evaluation.profile.name == IDENTITY:
        # The connector sends identity transfers raw, without running the codec: no codec
        # time, no header. Omitted speed keys read as infinite in costs_from_library.
        entry.update(ratio=1.0, fixed_s=0.0, pareto=True, note="sent raw: no codec cost")
        del entry["encode_bytes_per_s"], entry["decode_bytes_per_s"]
    return entry


def pareto_flags(evaluations: Sequence[Evaluation]) -> list[bool]:
    """The 3-D Pareto set as the controller sees it. Identity is sent raw (ratio 1, no codec
    time, no loss), so a profile that does not compress can at best tie with it: only
    identity stays (ties would otherwise keep both, the normalisation clips at ratio 1)."""
    points = [
        normalised_objectives(1.0, 0.0, 0.0) if e.profile.name == IDENTITY else e.normalised
        for e in evaluations
    ]
    return [
        e.profile.name == IDENTITY or (flag and e.ratio > 1.0)
        for e, flag in zip(evaluations, pareto_mask(points), strict=True)
    ]


def build_library(
    evaluations: Sequence[Evaluation],
    model: str,
    hardware: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The library JSON: every evaluated profile, `pareto` marking the 3-D Pareto set
    (compression ratio, codec seconds per MB, quality loss), best ratio first."""
    flags = pareto_flags(evaluations)
    entries = [library_entry(e, flag) for e, flag in zip(evaluations, flags, strict=True)]
    entries.sort(key=lambda entry: (not entry["pareto"], -entry["ratio"], entry["name"]))
    return {
        "model": model,
        "hardware": hardware or hardware_id(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"meta": meta} if meta else {}),
        "profiles": entries,
    }
