"""Codec speed on this hardware: encode and decode time of a whole request (all layers)
at two sizes, fitted to the controller's cost model

    seconds = fixed_s + raw_bytes / bytes_per_s

per direction, with per-stage throughputs from the pipeline's StageClock. Times are the
median of `repeats` runs after one warm-up run (first calls pay one-off costs: lazy
imports, the Hadamard sign tables, allocator growth).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transport.codecs import Profile, decode_layer, encode_layer

LayerKV = tuple[torch.Tensor, torch.Tensor]
MB = 1e6


@dataclass(frozen=True)
class LinearCost:
    fixed_s: float
    bytes_per_s: float

    def seconds(self, nbytes: float) -> float:
        return self.fixed_s + nbytes / self.bytes_per_s


def fit_linear_cost(sizes_bytes: Sequence[float], seconds: Sequence[float]) -> LinearCost:
    """Least-squares fit of seconds = fixed + bytes / throughput over >= 2 sizes.

    Timing noise can make the fit unphysical; a negative intercept is refitted through the
    origin (fixed = 0), and a non-positive slope (the large size measured no slower than
    the small one) keeps the smallest time as the fixed cost and the large size's average
    throughput, so the result is always usable by the controller."""
    if len(sizes_bytes) != len(seconds) or len(sizes_bytes) < 2:
        raise ValueError("need the same number (>= 2) of sizes and times")
    xs, ys = [float(x) for x in sizes_bytes], [float(y) for y in seconds]
    if len(set(xs)) < 2:
        raise ValueError("need at least two distinct sizes")
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    if slope <= 0:
        largest = max(range(len(xs)), key=lambda i: xs[i])
        return LinearCost(fixed_s=max(min(ys), 0.0), bytes_per_s=xs[largest] / max(ys[largest], 1e-12))
    intercept = mean_y - slope * mean_x
    if intercept < 0:
        through_origin = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
        return LinearCost(fixed_s=0.0, bytes_per_s=1.0 / through_origin)
    return LinearCost(fixed_s=intercept, bytes_per_s=1.0 / slope)


@dataclass
class SpeedResult:
    encode: LinearCost
    decode: LinearCost
    # raw bytes / seconds of each pipeline stage at the large size (median over repeats)
    encode_stages: dict[str, float] = field(default_factory=dict)
    decode_stages: dict[str, float] = field(default_factory=dict)
    sizes_bytes: tuple[int, ...] = ()
    encode_s: tuple[float, ...] = ()  # median seconds at each size
    decode_s: tuple[float, ...] = ()

    @property
    def fixed_s(self) -> float:
        return self.encode.fixed_s + self.decode.fixed_s

    @property
    def seconds_per_mb(self) -> float:
        """Encode + decode seconds per MB of raw KV, beyond the fixed cost."""
        return MB / self.encode.bytes_per_s + MB / self.decode.bytes_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "encode_bytes_per_s": self.encode.bytes_per_s,
            "decode_bytes_per_s": self.decode.bytes_per_s,
            "encode_fixed_s": self.encode.fixed_s,
            "decode_fixed_s": self.decode.fixed_s,
            "fixed_s": self.fixed_s,
            "seconds_per_mb": self.seconds_per_mb,
            "encode_stage_bytes_per_s": dict(self.encode_stages),
            "decode_stage_bytes_per_s": dict(self.decode_stages),
            "sizes_bytes": list(self.sizes_bytes),
            "encode_s": list(self.encode_s),
            "decode_s": list(self.decode_s),
        }


def _raw_bytes(layers: Sequence[LayerKV]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def time_request(profile: Profile, layers: Sequence[LayerKV], repeats: int) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """Median (encode s, decode s, encode stage s, decode stage s) of one whole request."""
    encode_times: list[float] = []
    decode_times: list[float] = []
    encode_stages: list[dict[str, float]] = []
    decode_stages: list[dict[str, float]] = []
    for attempt in range(repeats + 1):
        enc_stage: dict[str, float] = {}
        dec_stage: dict[str, float] = {}
        started = time.perf_counter()
        blobs = [encode_layer(profile, index, k, v, timings=enc_stage) for index, (k, v) in enumerate(layers)]
        encoded = time.perf_counter()
        for blob in blobs:
            decode_layer(blob, timings=dec_stage)
        decoded = time.perf_counter()
        if attempt == 0:
            continue  # warm-up
        encode_times.append(encoded - started)
        decode_times.append(decoded - encoded)
        encode_stages.append(enc_stage)
        decode_stages.append(dec_stage)

    def stage_medians(runs: list[dict[str, float]]) -> dict[str, float]:
        names = sorted({name for run in runs for name in run})
        return {name: statistics.median(run.get(name, 0.0) for run in runs) for name in names}

    return (
        statistics.median(encode_times),
        statistics.median(decode_times),
        stage_medians(encode_stages),
        stage_medians(decode_stages),
    )


def measure_speed(profile: Profile, sizes: Sequence[Sequence[LayerKV]], repeats: int = 3) -> SpeedResult:
    """Time whole requests of each size (e.g. a few tokens and ~1k tokens of real KV) and
    fit the fixed + throughput model for encode and decode."""
    if len(sizes) < 2:
        raise ValueError("need requests of at least two sizes to separate the fixed cost")
    nbytes, encode_s, decode_s = [], [], []
    encode_stages: dict[str, float] = {}
    decode_stages: dict[str, float] = {}
    for layers in sizes:
        enc, dec, enc_stages, dec_stages = time_request(profile, layers, max(1, repeats))
        size = _raw_bytes(layers)
        nbytes.append(size)
        encode_s.append(enc)
        decode_s.append(dec)
        if size == max(nbytes):
            encode_stages = {n: size / s for n, s in enc_stages.items() if s > 0}
            decode_stages = {n: size / s for n, s in dec_stages.items() if s > 0}
    return SpeedResult(
        encode=fit_linear_cost(nbytes, encode_s),
        decode=fit_linear_cost(nbytes, decode_s),
        encode_stages=encode_stages,
        decode_stages=decode_stages,
        sizes_bytes=tuple(nbytes),
        encode_s=tuple(encode_s),
        decode_s=tuple(decode_s),
    )
