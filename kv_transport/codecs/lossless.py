"""The lossless stage: byte-plane split (on the tensors' device) and lz4 / zstd (on the host).

Decompression is bounded: the expected size comes from the blob header, the compressed
frame's own declared size must match it before anything is allocated, and the result must
have exactly that size.
"""

from __future__ import annotations

import threading

import lz4.frame
import torch
import zstandard

from kv_transport.codecs.errors import CodecError
from kv_transport.codecs.profiles import LosslessSpec

_local = threading.local()  # zstd contexts are not thread-safe: one per thread and level


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


_WORD = {2: torch.int16, 4: torch.int32}


def split_planes(section: torch.Tensor, itemsize: int) -> torch.Tensor:
    """Flat uint8 bytes of `itemsize`-wide values -> plane 0 (all low bytes), plane 1, ...

    Shifts on the values seen as int16/int32 rather than a strided byte transpose: ~15x
    faster on CPU. Narrowing to uint8 keeps the low 8 bits (modular), on CPU and CUDA."""
    if itemsize == 1:
        return section
    words = section.view(_WORD[itemsize])
    planes = torch.empty(itemsize, words.numel(), dtype=torch.uint8, device=section.device)
    for i in range(itemsize):
        planes[i] = words >> (8 * i) if i else words
    return planes.view(-1)


def join_planes(planes: torch.Tensor, itemsize: int) -> torch.Tensor:
    if itemsize == 1:
        return planes
    word = _WORD[itemsize]
    rows = planes.view(itemsize, -1)
    words = rows[0].to(word)
    for i in range(1, itemsize):
        words |= rows[i].to(word) << (8 * i)
    return words.view(torch.uint8)


def compress(spec: LosslessSpec, data: memoryview) -> bytes | memoryview:
    if spec.codec == "none":
        return data
    if spec.codec == "zstd":
        return _zstd_compressor(spec.level).compress(data)
    return lz4.frame.compress(data, compression_level=spec.level, store_size=True)


def decompress(spec: LosslessSpec, data: memoryview, raw_nbytes: int) -> bytearray:
    """Compressed payload -> exactly raw_nbytes writable bytes, or CodecError."""
    if spec.codec == "none":
        if len(data) != raw_nbytes:
            raise CodecError(f"payload is {len(data)} bytes, header announced {raw_nbytes}")
        return bytearray(data)
    try:
        if spec.codec == "zstd":
            declared = zstandard.frame_content_size(data)
            if declared != raw_nbytes:
                raise CodecError(f"zstd frame declares {declared} bytes, header announced {raw_nbytes}")
            # The frame's content size was just checked, so this allocates raw_nbytes at most.
            out = bytearray(_zstd_decompressor().decompress(data, max_output_size=raw_nbytes))
        else:
            declared = lz4.frame.get_frame_info(data)["content_size"]
            if declared != raw_nbytes:
                raise CodecError(f"lz4 frame declares {declared} bytes, header announced {raw_nbytes}")
            decompressor = lz4.frame.LZ4FrameDecompressor(return_bytearray=True)
            out = decompressor.decompress(data, max_length=raw_nbytes)
            if not decompressor.eof:
                raise CodecError("lz4 frame is truncated")
    except CodecError:
        raise
    except (zstandard.ZstdError, RuntimeError, ValueError, KeyError) as exc:
        raise CodecError(f"{spec.codec} payload is corrupt: {exc}") from None
    if len(out) != raw_nbytes:
        raise CodecError(f"{spec.codec} payload decoded to {len(out)} bytes, expected {raw_nbytes}")
    return out
