"""Adapters between a layer's paged KV blocks and canonical K, V [num_tokens, heads, head_dim].

Two block layouts reach the connector:

cpu    vLLM's CPU attention backend: one tensor per layer [num_blocks, H, block_size, 2*D].
       The backend views it as [num_blocks, H, 2*block_size, D] and chunks dim 2: for each
       block and head, block_size rows of K, then block_size rows of V
       (vllm/v1/attention/backends/cpu_attn.py, CPUAttentionBackendImpl.forward).
flash  FlashAttention on GPU: [2, num_blocks, block_size, H, D], all K blocks then all V
       blocks (what KVLayout.gather_blocks concatenates for a request).

A request's last block may be partial: only its first num_tokens tokens mean anything.
Encoding drops the padding; decoding zero-fills it.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import torch

from kv_transport.codecs.errors import CodecError


class LayoutKind(StrEnum):
    CPU = "cpu"  # [num_blocks, H, block_size, 2*D]: per (block, head) K as [D, N], then V as [N, D]
    FLASH = "flash"  # [2, num_blocks, block_size, H, D]


def _kind(layout: LayoutKind | str) -> LayoutKind:
    try:
        return LayoutKind(layout)
    except ValueError:
        raise CodecError(f"unknown KV layout {layout!r}; expected one of {[k.value for k in LayoutKind]}") from None


def _cpu_parts(
    blocks: torch.Tensor, num_blocks: int, heads: int, block_size: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the K and V halves of vLLM CPU blocks. Per (block, head) the kernel
    (`cpu_attn_reshape_and_cache`, ISAs vec and vec16) stores K dim-major, [D, N], then V
    token-major, [N, D]: measured on vLLM 0.32, not what the [H, N, 2D] shape suggests."""
    halves = blocks.reshape(num_blocks, heads, 2, block_size * head_dim)
    keys = halves[:, :, 0].reshape(num_blocks, heads, head_dim, block_size)
    values = halves[:, :, 1].reshape(num_blocks, heads, block_size, head_dim)
    return keys, values


def blocks_shape(layout: LayoutKind | str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Shape of a request's block tensor in this layout."""
    if _kind(layout) is LayoutKind.CPU:
        return (num_blocks, num_kv_heads, block_size, 2 * head_dim)
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


def geometry(blocks: torch.Tensor, layout: LayoutKind | str) -> tuple[int, int, int, int]:
    """(num_blocks, block_size, num_kv_heads, head_dim) of a block tensor."""
    kind = _kind(layout)
    if kind is LayoutKind.CPU:
        if blocks.dim() != 4 or blocks.shape[3] % 2:
            raise CodecError(f"cpu layout wants [num_blocks, H, block_size, 2*D], got {tuple(blocks.shape)}")
        num_blocks, heads, block_size, width = blocks.shape
        return num_blocks, block_size, heads, width // 2
    if blocks.dim() != 5 or blocks.shape[0] != 2:
        raise CodecError(f"flash layout wants [2, num_blocks, block_size, H, D], got {tuple(blocks.shape)}")
    _, num_blocks, block_size, heads, head_dim = blocks.shape
    return num_blocks, block_size, heads, head_dim


def blocks_to_kv(blocks: torch.Tensor, layout: LayoutKind | str, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's blocks of one layer -> canonical (k, v) of its first num_tokens tokens."""
    num_blocks, block_size, heads, head_dim = geometry(blocks, layout)
    if not 0 <= num_tokens <= num_blocks * block_size:
        raise CodecError(f"{num_tokens} tokens do not fit in {num_blocks} blocks of {block_size}")
    if _kind(layout) is LayoutKind.CPU:
        keys, values = _cpu_parts(blocks, num_blocks, heads, block_size, head_dim)
        # -> token-major [blocks * N, H, D] (a copy: the source is head-major).
        k = keys.permute(0, 3, 1, 2).reshape(num_blocks * block_size, heads, head_dim)[:num_tokens]
        v = values.permute(0, 2, 1, 3).reshape(num_blocks * block_size, heads, head_dim)[:num_tokens]
        return k, v
    k = blocks[0].reshape(num_blocks * block_size, heads, head_dim)[:num_tokens]
    v = blocks[1].reshape(num_blocks * block_size, heads, head_dim)[:num_tokens]
    return k, v


def kv_to_blocks(
    k: torch.Tensor,
    v: torch.Tensor,
    layout: LayoutKind | str,
    block_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Canonical (k, v) -> ceil(num_tokens / block_size) blocks in the layout, padding zeroed.

    With `out` (a block tensor of exactly that shape, e.g. pinned staging memory), writes
    into it and returns it."""
    if k.shape != v.shape or k.dim() != 3:
        raise CodecError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [tokens, H, D]")
    if block_size <= 0:
        raise CodecError(f"block_size must be positive, got {block_size}")
    num_tokens, heads, head_dim = k.shape
    num_blocks = -(-num_tokens // block_size)
    shape = blocks_shape(layout, num_blocks, block_size, heads, head_dim)
    if out is None:
        out = torch.zeros(shape, dtype=k.dtype, device=k.device)
    elif tuple(out.shape) != shape:
        raise CodecError(f"out has shape {tuple(out.shape)}, expected {shape}")
    else:
        out.zero_()
    full, tail = divmod(num_tokens, block_size)
    if _kind(layout) is LayoutKind.CPU:
        keys, values = _cpu_parts(out, num_blocks, heads, block_size, head_dim)
        if full:
            keys[:full].permute(0, 3, 1, 2).copy_(k[: full * block_size].view(full, block_size, heads, head_dim))
            values[:full].permute(0, 2, 1, 3).copy_(v[: full * block_size].view(full, block_size, heads, head_dim))
        if tail:
            keys[full, :, :, :tail].permute(2, 0, 1).copy_(k[full * block_size :])
            values[full, :, :tail].permute(1, 0, 2).copy_(v[full * block_size :])
        return out
    flat = out.view(2, num_blocks * block_size, heads, head_dim)
    flat[0, :num_tokens] = k
    flat[1, :num_tokens] = v
    return out


def blocks_from_bytes(
    raw: bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview],
    layout: LayoutKind | str,
    dtype: torch.dtype,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """One layer's raw block bytes (one buffer, or the per-block views KVLayout.block_views
    returns, in order) -> a CPU block tensor in the layout (a copy, so the source may be
    read-only or reused)."""
    chunks = [raw] if isinstance(raw, bytes | bytearray | memoryview) else list(raw)
    views = [memoryview(chunk).cast("B") for chunk in chunks]
    total = sum(len(view) for view in views)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    block_nbytes = 2 * block_size * num_kv_heads * head_dim * itemsize
    if block_nbytes == 0 or total % block_nbytes:
        raise CodecError(f"{total} bytes are not a whole number of {block_nbytes}-byte blocks")
    buffer = bytearray(total)
    position = 0
    for view in views:
        buffer[position : position + len(view)] = view
        position += len(view)
    num_blocks = total // block_nbytes
    flat = torch.frombuffer(buffer, dtype=dtype) if total else torch.empty(0, dtype=dtype)
    return flat.view(blocks_shape(layout, num_blocks, block_size, num_kv_heads, head_dim))
