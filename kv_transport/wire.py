"""The wire format of one KV transfer: a self-describing header plus payload buffers.

    frame   := MAGIC(4) | header_len(u32, little endian) | header(JSON, utf-8) | payload
    payload := buffer_0 | buffer_1 | ... (sizes listed in the header, in order)

The header says everything decode needs without side information: the model/layout
fingerprint it must match, dtype, block size, token and block counts, the codec and its
parameters, each buffer's encoded and raw size, and an xxhash64 of the payload. JSON (never
pickle) keeps a stranger's bytes from executing anything; sizes are bounded before any
allocation.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

MAGIC = b"TKV1"
VERSION = 1
_PREFIX = struct.Struct("<4sI")
PREFIX_SIZE = _PREFIX.size
MAX_HEADER_BYTES = 1 << 20
# One transfer's payload; far above any real request (256k tokens of a 70B model is ~80 GB
# only with no GQA), but bounds what a corrupted header can make us allocate.
MAX_PAYLOAD_BYTES = 64 << 30


class WireFormatError(ValueError):
    """The bytes are not a valid Tandem KV frame (corrupt, truncated or foreign)."""


class ChecksumMismatch(WireFormatError):
    pass


@dataclass
class BufferInfo:
    name: str  # e.g. "layer.12" or "model.layers.12.self_attn.attn"
    nbytes: int  # bytes on the wire
    raw_nbytes: int  # bytes after decoding (== nbytes for the identity codec)
    shape: list[int] = field(default_factory=list)  # decoded tensor shape


@dataclass
class CodecSpec:
    id: str = "identity"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TransferHeader:
    transfer_id: str
    fingerprint: str  # model + KV layout; decode refuses a mismatch
    dtype: str  # e.g. "bfloat16"
    block_size: int
    num_tokens: int
    num_blocks: int
    buffers: list[BufferInfo]
    codec: CodecSpec = field(default_factory=CodecSpec)
    checksum: str = ""  # xxh64 hex digest of the payload, in buffer order
    version: int = VERSION
    # Index of the first block carried: the puller already held the ones before it (a local
    # prefix-cache hit), so only num_blocks blocks from here on crossed the link.
    first_block: int = 0

    @property
    def payload_nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    @property
    def raw_nbytes(self) -> int:
        return sum(b.raw_nbytes for b in self.buffers)

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), separators=(",", ":")).encode()
        if len(body) > MAX_HEADER_BYTES:
            raise WireFormatError(f"header too large: {len(body)} bytes")
        return _PREFIX.pack(MAGIC, len(body)) + body

    @classmethod
    def parse_prefix(cls, prefix: bytes) -> int:
        """Validate the fixed prefix; return the header's length."""
        if len(prefix) != PREFIX_SIZE:
            raise WireFormatError("truncated frame prefix")
        magic, header_len = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise WireFormatError(f"bad magic {magic!r}: not a Tandem KV frame")
        if not 0 < header_len <= MAX_HEADER_BYTES:
            raise WireFormatError(f"header length {header_len} out of bounds")
        return header_len

    @classmethod
    def decode(cls, body: bytes) -> TransferHeader:
        try:
            raw = json.loads(body)
            buffers = [BufferInfo(**b) for b in raw.pop("buffers")]
            codec = CodecSpec(**raw.pop("codec"))
            header = cls(buffers=buffers, codec=codec, **raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise WireFormatError(f"malformed header: {exc}") from None
        header.validate()
        return header

    def validate(self) -> None:
        if self.version != VERSION:
            raise WireFormatError(f"unsupported wire version {self.version}")
        for name in ("block_size", "num_tokens", "num_blocks", "first_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise WireFormatError(f"{name} must be a non-negative integer, got {value!r}")
        for buf in self.buffers:
            if not isinstance(buf.nbytes, int) or not isinstance(buf.raw_nbytes, int):
                raise WireFormatError("buffer sizes must be integers")
            if buf.nbytes < 0 or buf.raw_nbytes < 0:
                raise WireFormatError("buffer sizes must be non-negative")
        if self.payload_nbytes > MAX_PAYLOAD_BYTES or self.raw_nbytes > MAX_PAYLOAD_BYTES:
            raise WireFormatError(f"payload of {self.payload_nbytes} bytes exceeds the limit")


def checksum(buffers: Iterable[memoryview | bytes | bytearray]) -> str:
    digest = xxhash.xxh64()
    for buf in buffers:
        digest.update(buf)
    return digest.hexdigest()


def split_payload(header: TransferHeader, payload: memoryview) -> list[memoryview]:
    """Views of each buffer inside one received payload (no copy)."""
    if len(payload) != header.payload_nbytes:
        raise WireFormatError(
            f"payload is {len(payload)} bytes, header announced {header.payload_nbytes}"
        )
    views, offset = [], 0
    for buf in header.buffers:
        views.append(payload[offset : offset + buf.nbytes])
        offset += buf.nbytes
    return views


def verify(header: TransferHeader, buffers: Sequence[memoryview | bytes | bytearray]) -> None:
    actual = checksum(buffers)
    if actual != header.checksum:
        raise ChecksumMismatch(f"checksum {actual} != announced {header.checksum}")
