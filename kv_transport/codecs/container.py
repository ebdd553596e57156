"""The self-describing blob of one encoded layer.

    blob    := prefix(16) | header (JSON, utf-8) | payload
    prefix  := MAGIC "TKVC" | format version (u8) | flags (u8, 0) | reserved (u16, 0)
               | header length (u32) | CRC-32 of the header (u32)          little endian
    payload := the sections of every part, in header order, each padded to 8 bytes
               (after the byte-plane split, if any), then through the lossless codec

The header holds everything decode needs: profile name and version (for telemetry only),
layer, source dtype, K and V shapes, the transform, each part's token range and quantiser
as actually used, the lossless stage, every section's byte length and the payload sizes.
JSON parsed into strict pydantic models (never pickle): a stranger's bytes cannot run code,
and every size is bounded and cross-checked before anything is allocated. The CRC makes
a flipped bit in the header a clean error instead of a silently different decode; the
payload is covered by the transfer's own checksum (kv_transport.wire).
"""

from __future__ import annotations

import struct
import zlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kv_transport.codecs.errors import CodecError
from kv_transport.codecs.profiles import LosslessSpec, QuantSpec, TransformSpec
from kv_transport.codecs.quantize import SectionLayout, section_layout

MAGIC = b"TKVC"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sBBHII")
PREFIX_SIZE = _PREFIX.size
MAX_HEADER_BYTES = 64 << 10
MAX_PARTS = 16
# Bounds on what a header may announce: far above any real layer (1M tokens x 1024 heads x
# 4096 channels is not a model anyone serves), low enough that a corrupt header cannot make
# us allocate absurd sizes.
MAX_TOKENS = 1 << 22
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_LAYER_BYTES = 16 << 30
SECTION_ALIGN = 8  # so every section can be viewed as its dtype without a copy

DTYPE_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def padded(nbytes: int) -> int:
    return -(-nbytes // SECTION_ALIGN) * SECTION_ALIGN


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class PartHeader(_Strict):
    tensor: Literal["k", "v"]
    start: int = Field(ge=0, le=MAX_TOKENS)
    stop: int = Field(ge=0, le=MAX_TOKENS)
    quant: QuantSpec


class BlobHeader(_Strict):
    profile: str = Field(max_length=128)
    profile_version: int = Field(ge=1)
    layer: int = Field(ge=0, le=1 << 20)
    dtype: Literal["bfloat16", "float16", "float32"]
    k_shape: tuple[int, int, int]
    v_shape: tuple[int, int, int]
    transform: TransformSpec
    parts: list[PartHeader] = Field(max_length=MAX_PARTS)
    lossless: LosslessSpec
    sections: list[int] = Field(max_length=4 * MAX_PARTS)  # byte length of each, unpadded
    raw_nbytes: int = Field(ge=0, le=MAX_LAYER_BYTES)  # payload before the lossless stage
    nbytes: int = Field(ge=0, le=MAX_LAYER_BYTES)  # payload on the wire

    @model_validator(mode="after")
    def _check(self) -> BlobHeader:
        for name, shape in (("k_shape", self.k_shape), ("v_shape", self.v_shape)):
            tokens, heads, head_dim = shape
            if not (0 <= tokens <= MAX_TOKENS and 0 < heads <= MAX_HEADS and 0 < head_dim <= MAX_HEAD_DIM):
                raise ValueError(f"{name} {shape} out of bounds")
        if self.k_shape[0] != self.v_shape[0]:
            raise ValueError("K and V must cover the same tokens")
        # Each tensor's parts must tile [0, tokens) in order, with no gap or overlap.
        for tensor, shape in (("k", self.k_shape), ("v", self.v_shape)):
            cursor = 0
            for part in self.parts:
                if part.tensor != tensor:
                    continue
                if part.start != cursor or part.stop <= part.start:
                    raise ValueError(f"{tensor} parts do not tile the tokens")
                if self.transform.applies(tensor, part.quant):
                    head_dim = shape[2]
                    if head_dim & (head_dim - 1):
                        raise ValueError("hadamard needs a power-of-two head_dim")
                cursor = part.stop
            if cursor != shape[0]:
                raise ValueError(f"{tensor} parts cover {cursor} of {shape[0]} tokens")
        if self.lossless.codec == "none" and self.nbytes != self.raw_nbytes:
            raise ValueError("an uncompressed payload must be its raw size")
        return self

    def section_layouts(self) -> list[list[SectionLayout]]:
        """Per part, its sections as derived from spec and shape, checked against the
        header's byte counts: sizes a decoder may allocate come from here only."""
        itemsize = DTYPE_ITEMSIZE[self.dtype]
        layouts = []
        for part in self.parts:
            shape = self.k_shape if part.tensor == "k" else self.v_shape
            layouts.append(section_layout(part.quant, (part.stop - part.start, shape[1], shape[2]), itemsize))
        derived = [s.nbytes for sections in layouts for s in sections]
        if derived != self.sections:
            raise CodecError(f"section sizes {self.sections} do not match the parts ({derived})")
        if sum(padded(n) for n in derived) != self.raw_nbytes:
            raise CodecError("raw payload size does not match the sections")
        return layouts


def encode_header(header: BlobHeader) -> bytes:
    body = header.model_dump_json().encode()
    if len(body) > MAX_HEADER_BYTES:
        raise CodecError(f"codec header too large: {len(body)} bytes")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, 0, len(body), zlib.crc32(body)) + body


def decode_header(blob: bytes | bytearray | memoryview) -> tuple[BlobHeader, memoryview]:
    """Parse and validate a blob's header; return it and a view of the payload."""
    try:
        view = memoryview(blob).cast("B")
    except TypeError as exc:
        raise CodecError(f"a codec blob must be contiguous bytes: {exc}") from None
    if len(view) < PREFIX_SIZE:
        raise CodecError(f"truncated codec blob ({len(view)} bytes)")
    magic, version, flags, reserved, header_len, crc = _PREFIX.unpack(view[:PREFIX_SIZE])
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}: not a Tandem KV codec blob")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported codec format version {version}")
    if flags or reserved:
        raise CodecError("unknown codec flags")
    if not 0 < header_len <= MAX_HEADER_BYTES:
        raise CodecError(f"codec header length {header_len} out of bounds")
    end = PREFIX_SIZE + header_len
    if len(view) < end:
        raise CodecError("truncated codec header")
    body = view[PREFIX_SIZE:end]
    if zlib.crc32(body) != crc:
        raise CodecError("codec header checksum mismatch (corrupt header)")
    try:
        header = BlobHeader.model_validate_json(bytes(body))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CodecError(f"malformed codec header: {first['loc']}: {first['msg']}") from None
    payload = view[end:]
    if len(payload) != header.nbytes:
        raise CodecError(f"payload is {len(payload)} bytes, header announced {header.nbytes}")
    return header, payload
