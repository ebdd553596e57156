"""Encode / decode one layer's canonical K and V with a profile, and whole requests.

Canonical tensors are [num_tokens, num_kv_heads, head_dim], bf16/fp16/fp32, on CPU or CUDA.
All tensor work (rotation, quantisation, bit-packing, byte-plane split) runs on the
tensors' device with the same torch code; only the lossless stage and the final bytes
live on the host, so a GPU layer crosses PCIe once, already compressed by quantisation.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import ValidationError

from kv_transport.codecs import container, lossless
from kv_transport.codecs.container import BlobHeader, PartHeader, padded
from kv_transport.codecs.errors import CodecError
from kv_transport.codecs.layouts import LayoutKind, blocks_to_kv, kv_to_blocks
from kv_transport.codecs.profiles import Profile, QuantSpec
from kv_transport.codecs.quantize import decode_part, encode_part, section_layout
from kv_transport.codecs.transform import check_head_dim, hadamard_signs

SOURCE_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
TORCH_DTYPES = {name: dtype for dtype, name in SOURCE_DTYPES.items()}


class StageClock:
    """Accumulates seconds per pipeline stage into a dict (for the benchmark).

    With a dict to fill it synchronises CUDA at each stage boundary, so the times are real;
    without one every call is a no-op and the pipeline runs asynchronously as usual."""

    def __init__(self, sink: dict[str, float] | None, device: torch.device):
        self.sink = sink
        self.cuda = device.type == "cuda"
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.sink is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.sink[stage] = self.sink.get(stage, 0.0) + now - self.last
        self.last = now


@dataclass(frozen=True)
class PlannedPart:
    tensor: str  # "k" or "v"
    start: int
    stop: int
    quant: QuantSpec


def plan_parts(profile: Profile, layer_index: int, num_tokens: int) -> list[PlannedPart]:
    """Which quantiser covers which tokens of K and V in this layer.

    In the first `first_layers` layers the override covers the whole layer (it wins over
    the recent-token window); elsewhere the last `recent_tokens` tokens use `recent_quant`.
    """
    q = profile.quantize
    in_first_layers = layer_index < q.first_layers
    precision = q.for_layer(layer_index)
    recent = 0 if in_first_layers else min(q.recent_tokens, num_tokens)
    body_stop = num_tokens - recent
    parts = []
    for tensor in ("k", "v"):
        if body_stop > 0:
            parts.append(PlannedPart(tensor, 0, body_stop, precision.spec(tensor)))
        if recent > 0:
            parts.append(PlannedPart(tensor, body_stop, num_tokens, q.recent_quant.spec(tensor)))
    return parts


def _check_inputs(k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3:
            raise CodecError(f"{name} must be [num_tokens, num_kv_heads, head_dim], got {tuple(t.shape)}")
        if t.dtype not in SOURCE_DTYPES:
            raise CodecError(f"{name} has unsupported dtype {t.dtype}")
    if k.dtype != v.dtype or k.device != v.device or k.shape[0] != v.shape[0]:
        raise CodecError("k and v must share dtype, device and token count")


def encode_layer(
    profile: Profile,
    layer_index: int,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    timings: dict[str, float] | None = None,
) -> bytearray:
    """Encode one layer's K and V into a self-describing blob (a bytes-like bytearray).

    `timings`, if given, receives seconds per stage (transform, quantize, pack, byteplane,
    copy, lossless); leave it out in production (it synchronises CUDA)."""
    _check_inputs(k, v)
    clock = StageClock(timings, k.device)
    seed = profile.transform.seed
    parts_header: list[PartHeader] = []
    sections: list[torch.Tensor] = []
    section_sizes: list[int] = []
    with torch.no_grad():
        for part in plan_parts(profile, layer_index, k.shape[0]):
            source = k if part.tensor == "k" else v
            signs = None
            if profile.transform.applies(part.tensor, part.quant):
                check_head_dim(source.shape[2])
                signs = hadamard_signs(seed, layer_index, source.shape[1], source.shape[2], source.device)
            used, tensors = encode_part(source[part.start : part.stop], part.quant, signs, clock)
            clock.lap("quantize")  # for a raw part: gathering its bytes
            parts_header.append(PartHeader(tensor=part.tensor, start=part.start, stop=part.stop, quant=used))
            for tensor in tensors:
                raw = tensor.contiguous().view(-1).view(torch.uint8)
                if profile.lossless.byteplane:
                    raw = lossless.split_planes(raw, tensor.element_size())
                section_sizes.append(raw.numel())
                sections.append(raw)
            clock.lap("byteplane")
        raw_nbytes = sum(padded(n) for n in section_sizes)
        try:
            header = BlobHeader(
                profile=profile.name,
                profile_version=profile.version,
                layer=layer_index,
                dtype=SOURCE_DTYPES[k.dtype],
                k_shape=tuple(k.shape),
                v_shape=tuple(v.shape),
                transform=profile.transform,
                parts=parts_header,
                lossless=profile.lossless,
                sections=section_sizes,
                raw_nbytes=raw_nbytes,
                nbytes=raw_nbytes,
            )
        except ValidationError as exc:
            raise CodecError(f"cannot encode this layer: {exc.errors()[0]['msg']}") from None
        if profile.lossless.codec == "none":
            # Write the sections straight into the blob (one copy, device -> host included).
            prefix = container.encode_header(header)
            blob = bytearray(len(prefix) + raw_nbytes)
            blob[: len(prefix)] = prefix
            _write_sections(blob, len(prefix), sections, section_sizes)
            clock.lap("copy")
            return blob
        staging = bytearray(raw_nbytes)
        _write_sections(staging, 0, sections, section_sizes)
        clock.lap("copy")
        compressed = lossless.compress(profile.lossless, memoryview(staging))
        clock.lap("lossless")
    header = header.model_copy(update={"nbytes": len(compressed)})
    prefix = container.encode_header(header)
    blob = bytearray(len(prefix) + len(compressed))
    blob[: len(prefix)] = prefix
    blob[len(prefix) :] = compressed
    return blob


def _write_sections(buffer: bytearray, offset: int, sections: list[torch.Tensor], sizes: list[int]) -> None:
    if offset == len(buffer):
        return
    target = torch.frombuffer(buffer, dtype=torch.uint8, offset=offset)
    position = 0
    for section, size in zip(sections, sizes, strict=True):
        target[position : position + size].copy_(section)
        position += padded(size)  # the padding stays zero (bytearray starts zeroed)


def decode_header(blob: bytes | bytearray | memoryview) -> BlobHeader:
    """The validated header of a blob, without decoding it (profile, layer, sizes...)."""
    header, _ = container.decode_header(blob)
    header.section_layouts()
    return header


def decode_layer(
    blob: bytes | bytearray | memoryview,
    like_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    timings: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blob -> (k, v) canonical tensors in like_dtype (default: the source dtype) on device
    (default: CPU). Raises CodecError for anything that is not a valid blob."""
    header, payload = container.decode_header(blob)
    layouts = header.section_layouts()
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    source_dtype = TORCH_DTYPES[header.dtype]
    out_dtype = like_dtype or source_dtype
    if out_dtype not in SOURCE_DTYPES:
        raise CodecError(f"cannot decode into {out_dtype}")
    clock = StageClock(timings, target_device)
    raw = lossless.decompress(header.lossless, payload, header.raw_nbytes)
    clock.lap("lossless")
    with torch.no_grad():
        if raw:
            # The bytearray is ours alone, so tensors viewing it are safe to hand out.
            buffer = torch.frombuffer(raw, dtype=torch.uint8).to(target_device)
        else:
            buffer = torch.empty(0, dtype=torch.uint8, device=target_device)
        clock.lap("copy")
        decoded: dict[str, list[tuple[PartHeader, torch.Tensor]]] = defaultdict(list)
        position = 0
        for part, sections in zip(header.parts, layouts, strict=True):
            views = []
            for section in sections:
                view = buffer[position : position + section.nbytes]
                if header.lossless.byteplane:
                    view = lossless.join_planes(view, section.itemsize)
                views.append(view)
                position += padded(section.nbytes)
            clock.lap("byteplane")
            shape = header.k_shape if part.tensor == "k" else header.v_shape
            signs = None
            if header.transform.applies(part.tensor, part.quant):
                signs = hadamard_signs(header.transform.seed, header.layer, shape[1], shape[2], target_device)
            values = decode_part(part.quant, (part.stop - part.start, shape[1], shape[2]), source_dtype, views, signs, clock)
            decoded[part.tensor].append((part, values))
        k = _assemble(decoded["k"], header.k_shape, out_dtype, target_device)
        v = _assemble(decoded["v"], header.v_shape, out_dtype, target_device)
        clock.lap("assemble")
    return k, v


def _assemble(
    parts: list[tuple[PartHeader, torch.Tensor]], shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if len(parts) == 1 and parts[0][1].dtype == dtype and parts[0][1].is_contiguous():
        return parts[0][1]  # a raw part: already a view of the decoder's private buffer
    # One strided pass per part converts dtype and layout at once.
    out = torch.empty(shape, dtype=dtype, device=device)
    for part, values in parts:
        out[part.start : part.stop].copy_(values)
    return out


# -- whole requests -----------------------------------------------------------------------


def encode_request(
    profile: Profile,
    layers: Sequence[torch.Tensor],
    layout: LayoutKind | str,
    num_tokens: int,
    layer_indices: Sequence[int] | None = None,
) -> list[bytearray]:
    """One blob per layer from each layer's block tensor (see `layouts`).

    `layer_indices` are the model's layer numbers (they seed the rotation and select the
    first-layer override); by default the position in `layers`."""
    indices = list(layer_indices) if layer_indices is not None else list(range(len(layers)))
    if len(indices) != len(layers):
        raise CodecError(f"{len(indices)} layer indices for {len(layers)} layers")
    return [
        encode_layer(profile, index, *blocks_to_kv(blocks, layout, num_tokens))
        for index, blocks in zip(indices, layers, strict=True)
    ]


def decode_request(
    blobs: Sequence[bytes | bytearray | memoryview],
    layout: LayoutKind | str,
    block_size: int,
    like_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    layer_indices: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Inverse of `encode_request`: per layer, a block tensor holding ceil(tokens /
    block_size) blocks, the padding of the last block zero-filled. With `layer_indices`,
    each blob must carry the expected layer (guards against shuffled buffers)."""
    if layer_indices is not None and len(layer_indices) != len(blobs):
        raise CodecError(f"{len(layer_indices)} layer indices for {len(blobs)} blobs")
    out = []
    for position, blob in enumerate(blobs):
        if layer_indices is not None:
            layer = container.decode_header(blob)[0].layer
            if layer != layer_indices[position]:
                raise CodecError(f"blob {position} holds layer {layer}, expected {layer_indices[position]}")
        k, v = decode_layer(blob, like_dtype, device)
        out.append(kv_to_blocks(k, v, layout, block_size))
    return out


def encoded_size_estimate(profile: Profile, layer_index: int, num_tokens: int, num_kv_heads: int, head_dim: int, itemsize: int = 2) -> int:
    """Payload bytes of one layer before the lossless stage (what the controller can
    predict without encoding: quantisation sizes are exact, lossless ratios are not)."""
    shape_bytes = 0
    for part in plan_parts(profile, layer_index, num_tokens):
        shape = (part.stop - part.start, num_kv_heads, head_dim)
        shape_bytes += sum(padded(s.nbytes) for s in section_layout(part.quant, shape, itemsize))
    return shape_bytes
