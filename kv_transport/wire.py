"""The wire format of one KV transfer: a self-describing header plus payload buffers.

    frame   := MAGIC(4) | header_len(u32, little endian) | header(JSON, utf-8) | payload
    payload := buffer_0 | buffer_1 | ... (sizes listed in the header, in order)

or, streamed (`header.streamed`: each compressed layer is encoded while the previous one is
on the wire, so sizes and checksum are not known when the header goes out):

    payload := (size(u64) | buffer_i) for each buffer | TRAILER_MAGIC | len(u32) | JSON trailer
    trailer := {"checksum": xxh64 of the buffers, "encode_s": the sender's encode time}

A size of ABORT_CHUNK instead of a buffer means the sender failed mid-stream; an error
frame of the transport follows.

The header says everything decode needs without side information: the model/layout
fingerprint it must match, dtype, block size, token and block counts, the codec and its
parameters, each buffer's encoded and raw size, and an xxhash64 of the payload. JSON (never
pickle) keeps a stranger's bytes from executing anything; sizes are bounded before any
allocation.
"""

from __future__ import annotations

import json
import math
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
CHUNK_PREFIX = struct.Struct("<Q")
ABORT_CHUNK = (1 << 64) - 1
TRAILER_MAGIC = b"TKVT"
_MAX_TRAILER_BYTES = 64 << 10


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
    # Buffers follow as sized chunks and a trailer (see the module doc); their nbytes and
    # the checksum are filled in from those on arrival.
    streamed: bool = False
    # Not on the wire: seconds the receiving transport spent taking payload bytes off the
    # link, where encode overlapped it (a streamed frame); None where it did not measure.
    measured_wire_s: float | None = None

    @property
    def payload_nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    @property
    def raw_nbytes(self) -> int:
        return sum(b.raw_nbytes for b in self.buffers)

    def encode(self) -> bytes:
        fields = asdict(self)
        del fields["measured_wire_s"]
        if not fields["streamed"]:
            # A whole frame stays readable by pullers from before streamed frames existed
            # (a rolling upgrade); a streamed one is refused by them as malformed.
            del fields["streamed"]
        body = json.dumps(fields, separators=(",", ":")).encode()
        if len(body) > MAX_HEADER_BYTES:
            raise WireFormatError(f"header too large: {len(body)} bytes")
        return _PREFIX.pack(MAGIC, len(body)) + body

    @classmethod
    def parse_prefix(cls, prefix: bytes) -> int:
        """Validate the fixed prefix; return the header's length."""
        return _body_length(prefix, MAGIC, MAX_HEADER_BYTES, "header")

    @classmethod
    def decode(cls, body: bytes) -> TransferHeader:
        try:
            raw = json.loads(body)
            raw.pop("measured_wire_s", None)  # ours to measure, not the sender's to claim
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
        if not isinstance(self.streamed, bool):
            raise WireFormatError("streamed must be a boolean")
        if self.payload_nbytes > MAX_PAYLOAD_BYTES or self.raw_nbytes > MAX_PAYLOAD_BYTES:
            raise WireFormatError(f"payload of {self.payload_nbytes} bytes exceeds the limit")

    def chunk_limit(self, index: int) -> int:
        """The most bytes a streamed chunk may announce for buffer ``index``: an encoded
        layer is never much larger than the raw one (a lossless stage on incompressible
        bytes adds little, a container header a few KiB), so a larger size is corruption
        and must not be allocated."""
        return 2 * self.buffers[index].raw_nbytes + (1 << 20)

    def complete_stream(self, sizes: Sequence[int], trailer: StreamTrailer) -> None:
        """Fill in what a streamed frame announces only as it goes: sizes and checksum."""
        if len(sizes) != len(self.buffers):
            raise WireFormatError(f"{len(sizes)} chunks for {len(self.buffers)} buffers")
        for info, size in zip(self.buffers, sizes, strict=True):
            info.nbytes = size
        self.checksum = trailer.checksum
        self.codec.params["encode_s"] = trailer.encode_s


@dataclass
class StreamTrailer:
    """What a streamed frame can say only after its last buffer."""

    checksum: str
    encode_s: float = 0.0

    def encode(self) -> bytes:
        body = json.dumps(asdict(self)).encode()
        return _PREFIX.pack(TRAILER_MAGIC, len(body)) + body

    @classmethod
    def parse_prefix(cls, prefix: bytes) -> int:
        return _body_length(prefix, TRAILER_MAGIC, _MAX_TRAILER_BYTES, "trailer")

    @classmethod
    def decode(cls, body: bytes) -> StreamTrailer:
        try:
            raw = json.loads(body)
            trailer = cls(checksum=raw["checksum"], encode_s=raw.get("encode_s", 0.0))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise WireFormatError(f"malformed trailer: {exc}") from None
        encode_s = trailer.encode_s
        if (not isinstance(trailer.checksum, str) or isinstance(encode_s, bool)
                or not isinstance(encode_s, (int, float)) or not math.isfinite(encode_s)):
            raise WireFormatError("malformed trailer fields")
        trailer.encode_s = max(float(trailer.encode_s), 0.0)
        return trailer


def _body_length(prefix: bytes, magic: bytes, limit: int, what: str) -> int:
    """The length a ``magic | len(u32)`` prefix announces, checked against ``limit``."""
    if len(prefix) != PREFIX_SIZE:
        raise WireFormatError(f"truncated {what} prefix")
    found, length = _PREFIX.unpack(prefix)
    if found != magic:
        raise WireFormatError(f"bad {what} magic {found!r}: not a Tandem KV frame")
    if not 0 < length <= limit:
        raise WireFormatError(f"{what} length {length} out of bounds")
    return length


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
