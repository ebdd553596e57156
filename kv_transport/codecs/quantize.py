"""Quantisation of one part (one tensor, one token range) of a layer's KV.

A part is a [tokens, heads, head_dim] tensor. It is arranged as rows of values that share
groups: "token" axis -> one row per (token, head), groups along head_dim; "channel" axis
-> one row per (head, channel), groups along the tokens. Each row is cut into groups of
`group_size`; a shorter last group takes the remainder, so no codes are wasted on padding.

Each quantised part becomes a few byte sections, in this order:
    none    raw                 the source dtype's bytes, bit-exact
    fp8     codes, scale        float8_e4m3fn values and one scale per group
    minmax  codes, lo, step     bit-packed k-bit codes, one minimum and one step per group

Group parameters are rounded outward to their dtype (min down, step/scale up), so every
value stays inside the representable range and the error stays within half a step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch

from kv_transport.codecs import bitpack
from kv_transport.codecs.errors import CodecError
from kv_transport.codecs.profiles import FP8_MAX, QuantSpec
from kv_transport.codecs.transform import rotate, unrotate

PARAM_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Above this magnitude a float16 group parameter could overflow: use float32 for the part.
FLOAT16_SAFE_MAX = 30000.0


class Clock(Protocol):
    def lap(self, stage: str) -> None: ...


class _NoClock:
    def lap(self, stage: str) -> None:
        pass


@dataclass(frozen=True)
class SectionLayout:
    name: str
    itemsize: int  # element width, for the byte-plane split
    nbytes: int


def _rows_and_length(shape: tuple[int, int, int], axis: str) -> tuple[int, int]:
    tokens, heads, head_dim = shape
    return (tokens * heads, head_dim) if axis == "token" else (heads * head_dim, tokens)


def _groups_per_row(length: int, group_size: int) -> int:
    return -(-length // group_size)


def section_layout(spec: QuantSpec, shape: tuple[int, int, int], source_itemsize: int) -> list[SectionLayout]:
    """The sections one part encodes to, derived from its spec and shape alone (decode
    checks them against the header's byte counts before touching any data)."""
    count = shape[0] * shape[1] * shape[2]
    if spec.method == "none":
        return [SectionLayout("raw", source_itemsize, count * source_itemsize)]
    rows, length = _rows_and_length(shape, spec.axis)
    param_size = PARAM_DTYPES[spec.param_dtype].itemsize
    params = rows * _groups_per_row(length, spec.group_size) * param_size
    if spec.method == "fp8":
        return [SectionLayout("codes", 1, count), SectionLayout("scale", param_size, params)]
    return [
        SectionLayout("codes", 1, bitpack.packed_nbytes(count, spec.bits)),
        SectionLayout("lo", param_size, params),
        SectionLayout("step", param_size, params),
    ]


def arrange(x: torch.Tensor, axis: str) -> torch.Tensor:
    tokens, heads, head_dim = x.shape
    if axis == "token":
        return x.reshape(tokens * heads, head_dim)
    return x.permute(1, 2, 0).reshape(heads * head_dim, tokens)


def arrange_float(x: torch.Tensor, axis: str) -> torch.Tensor:
    """arrange(x.float()) in one strided pass (the dtype conversion rides on the copy)."""
    tokens, heads, head_dim = x.shape
    if axis == "token":
        return x.reshape(tokens * heads, head_dim).float()
    rows = torch.empty(heads * head_dim, tokens, dtype=torch.float32, device=x.device)
    rows.view(heads, head_dim, tokens).copy_(x.permute(1, 2, 0))
    return rows


def unarrange(rows: torch.Tensor, axis: str, shape: tuple[int, int, int]) -> torch.Tensor:
    tokens, heads, head_dim = shape
    if axis == "token":
        return rows.view(tokens, heads, head_dim)
    return rows.view(heads, head_dim, tokens).permute(2, 0, 1)


def group_spans(length: int, group_size: int) -> list[tuple[int, int, int]]:
    """(first column, number of groups, group width) of the full groups and the tail."""
    full = length // group_size
    spans = [(0, full, group_size)] if full else []
    if length % group_size:
        spans.append((full * group_size, 1, length % group_size))
    return spans


def _round_up(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A value of `dtype` >= value (value >= 0, float32), never zero."""
    if dtype == torch.float32:
        return value * (1 + 2.0**-20) + torch.finfo(torch.float32).tiny
    # One float16 ulp is at most 2^-10 relative; 2^-24 is its smallest subnormal.
    return (value * (1 + 2.0**-10) + 2.0**-24).to(dtype)


def _round_down(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return value
    return (value - value.abs() * 2.0**-10 - 2.0**-24).to(dtype)


def _check_finite_and_pick_params(x: torch.Tensor, spec: QuantSpec) -> QuantSpec:
    amax = float(x.abs().amax()) if x.numel() else 0.0
    if amax != amax or amax == float("inf"):
        raise CodecError("cannot quantise non-finite KV values (NaN or inf)")
    if spec.param_dtype == "float16" and amax > FLOAT16_SAFE_MAX:
        return spec.model_copy(update={"param_dtype": "float32"})
    return spec


def encode_part(
    x: torch.Tensor, spec: QuantSpec, signs: torch.Tensor | None, clock: Clock | None = None
) -> tuple[QuantSpec, list[torch.Tensor]]:
    """Quantise one part. Returns the spec actually used (float16 parameters may be upgraded
    to float32) and its sections as contiguous tensors on x's device."""
    clock = clock or _NoClock()
    if spec.method == "none":
        return spec, [x.contiguous()]
    if signs is not None:
        values = rotate(x.float(), signs)
        clock.lap("transform")
        rows = arrange(values, spec.axis)
    else:
        rows = arrange_float(x, spec.axis)
    spec = _check_finite_and_pick_params(rows, spec)
    param_dtype = PARAM_DTYPES[spec.param_dtype]
    num_rows, length = rows.shape
    groups_per_row = _groups_per_row(length, spec.group_size)
    code_dtype = torch.float8_e4m3fn if spec.method == "fp8" else torch.uint8
    codes = torch.empty(num_rows, length, dtype=code_dtype, device=rows.device)
    num_params = 1 if spec.method == "fp8" else 2
    params = torch.empty(num_params, num_rows, groups_per_row, dtype=param_dtype, device=rows.device)
    group = 0
    for start, count, width in group_spans(length, spec.group_size):
        groups = rows[:, start : start + count * width].view(num_rows, count, width)
        target = codes[:, start : start + count * width].view(num_rows, count, width)
        if spec.method == "fp8":
            scale = _round_up(groups.abs().amax(dim=-1) / FP8_MAX, param_dtype)
            params[0, :, group : group + count] = scale
            scaled = groups * scale.float().reciprocal().unsqueeze(-1)
            target.copy_(scaled.clamp_(-FP8_MAX, FP8_MAX))
        else:
            lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # faster than aminmax on CPU
            lo_stored = _round_down(lo, param_dtype)
            # The step spans [stored min, max]: the whole group fits in `levels` steps.
            step = _round_up((hi - lo_stored.float()) / spec.levels, param_dtype)
            params[0, :, group : group + count] = lo_stored
            params[1, :, group : group + count] = step
            # code = floor((x - lo) / step + 0.5) as one fused multiply-add; the copy into
            # uint8 truncates, which is the floor of these non-negative values.
            inverse = step.float().reciprocal()
            scaled = torch.addcmul((0.5 - lo_stored.float() * inverse).unsqueeze(-1), groups, inverse.unsqueeze(-1))
            target.copy_(scaled.clamp_(0, spec.levels))
        group += count
    clock.lap("quantize")
    flat_codes = codes.view(-1).view(torch.uint8) if spec.method == "fp8" else bitpack.pack(codes, spec.bits)
    clock.lap("pack")
    return spec, [flat_codes, *params]


@functools.lru_cache(maxsize=8)
def _fp8_table(device: torch.device) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().to(device)


def decode_part(
    spec: QuantSpec,
    shape: tuple[int, int, int],
    source_dtype: torch.dtype,
    sections: list[torch.Tensor],
    signs: torch.Tensor | None,
    clock: Clock | None = None,
) -> torch.Tensor:
    """Sections (flat uint8 tensors, sizes already checked) -> [tokens, heads, head_dim].

    Raw parts come back in the source dtype, quantised ones in float32."""
    clock = clock or _NoClock()
    if spec.method == "none":
        return sections[0].view(source_dtype).view(shape)
    param_dtype = PARAM_DTYPES[spec.param_dtype]
    num_rows, length = _rows_and_length(shape, spec.axis)
    groups_per_row = _groups_per_row(length, spec.group_size)
    params = [s.view(param_dtype).view(num_rows, groups_per_row).float() for s in sections[1:]]
    if spec.method == "fp8":
        # A 256-entry lookup table: 3x faster on CPU than torch's fp8 -> float32 cast.
        codes = _fp8_table(sections[0].device).index_select(0, sections[0].int()).view(num_rows, length)
    else:
        codes = bitpack.unpack(sections[0], spec.bits, num_rows * length).view(num_rows, length)
    clock.lap("unpack")
    rows = torch.empty(num_rows, length, dtype=torch.float32, device=codes.device)
    group = 0
    for start, count, width in group_spans(length, spec.group_size):
        q = codes[:, start : start + count * width].reshape(num_rows, count, width).float()
        target = rows[:, start : start + count * width].view(num_rows, count, width)
        if spec.method == "fp8":
            torch.mul(q, params[0][:, group : group + count, None], out=target)
        else:
            lo, step = params[0][:, group : group + count, None], params[1][:, group : group + count, None]
            torch.addcmul(lo, q, step, out=target)
        group += count
    values = unarrange(rows, spec.axis, shape)
    clock.lap("dequantize")
    if signs is not None:
        values = unrotate(values, signs)
        clock.lap("transform")
    return values
