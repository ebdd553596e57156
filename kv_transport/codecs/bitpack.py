"""Bit-packing of k-bit codes (k in 2, 3, 4, 6, 8) into bytes, with torch bit ops.

Codes are packed in words of lcm(k, 8) bits: 8/k codes per byte when k divides 8, and for
3 and 6 bits, 8 codes (3 bits) or 4 codes (6 bits) per 3-byte word. Code i of a word sits at
bit k·i, little-endian, so the layout does not depend on the device or the host's byte order.
The loops below run over the few code positions of one word, never over the data.
"""

from __future__ import annotations

import math

import torch

from kv_transport.codecs.errors import CodecError

SUPPORTED_BITS = (2, 3, 4, 6, 8)


def _word(bits: int) -> tuple[int, int]:
    """(codes per word, bytes per word)."""
    if bits not in SUPPORTED_BITS:
        raise CodecError(f"cannot pack {bits}-bit codes; supported: {SUPPORTED_BITS}")
    word_bits = math.lcm(bits, 8)
    return word_bits // bits, word_bits // 8


def packed_nbytes(count: int, bits: int) -> int:
    codes_per_word, bytes_per_word = _word(bits)
    return -(-count // codes_per_word) * bytes_per_word


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 codes (each < 2^bits) -> packed uint8 bytes, on the codes' device."""
    codes_per_word, bytes_per_word = _word(bits)
    flat = codes.reshape(-1)
    if bits == 8:
        return flat
    pad = -flat.numel() % codes_per_word
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    grid = flat.view(-1, codes_per_word)
    if bytes_per_word == 1:
        out = grid[:, 0].clone()
        for i in range(1, codes_per_word):
            out |= grid[:, i] << (bits * i)
        return out
    word = grid[:, 0].to(torch.int32)
    for i in range(1, codes_per_word):
        word |= grid[:, i].to(torch.int32) << (bits * i)
    out = torch.empty(grid.shape[0], bytes_per_word, dtype=torch.uint8, device=codes.device)
    for j in range(bytes_per_word):
        out[:, j] = (word >> (8 * j)) & 0xFF
    return out.view(-1)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack`: the first `count` codes as flat uint8."""
    codes_per_word, bytes_per_word = _word(bits)
    if packed.numel() != packed_nbytes(count, bits):
        raise CodecError(f"{packed.numel()} packed bytes cannot hold {count} {bits}-bit codes")
    if bits == 8:
        return packed.reshape(-1)
    mask = (1 << bits) - 1
    grid = packed.view(-1, bytes_per_word)
    if bytes_per_word == 1:
        word = grid[:, 0]
    else:
        word = grid[:, 0].to(torch.int32)
        for j in range(1, bytes_per_word):
            word = word | (grid[:, j].to(torch.int32) << (8 * j))
    out = torch.empty(grid.shape[0], codes_per_word, dtype=torch.uint8, device=packed.device)
    for i in range(codes_per_word):
        out[:, i] = (word >> (bits * i)) & mask
    return out.view(-1)[:count]
