"""How one engine's paged KV cache is laid out, and views of a request's blocks in it.

vLLM hands the connector one tensor per attention layer. Depending on the backend the block
axis is first ([num_blocks, H, N, C] on CPU) or second behind a K/V axis
([2, num_blocks, ...], FlashAttention). Either way each block of each part is a contiguous
run of bytes, so a request's KV is a list of contiguous slices that can go to a socket or
come back from one without staging copies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerParts:
    name: str
    # One tensor per part (1: K and V interleaved in a block; 2: separate K and V), each
    # indexed by block id on dim 0, with contiguous blocks.
    parts: tuple[torch.Tensor, ...]

    @property
    def block_nbytes(self) -> int:
        return sum(p[0].numel() * p.element_size() for p in self.parts)


class KVLayout:
    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int, block_size: int, model: str):
        if not kv_caches:
            raise ValueError("no KV cache tensors to transfer")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layers = [
            LayerParts(name, _split_parts(name, tensor, num_blocks))
            for name, tensor in sorted(kv_caches.items())
        ]
        first = self.layers[0].parts[0]
        self.dtype = str(first.dtype).removeprefix("torch.")
        self.device = first.device
        shapes = [(layer.name, [tuple(p.shape[1:]) for p in layer.parts]) for layer in self.layers]
        digest = hashlib.sha256(repr((model, self.dtype, block_size, shapes)).encode()).hexdigest()
        # Two engines can exchange KV only if this matches: same model, dtype, block size
        # and per-layer block shapes.
        self.fingerprint = digest[:32]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block across all layers."""
        return sum(layer.block_nbytes for layer in self.layers)

    def block_views(self, block_ids: list[int]) -> list[list[memoryview]]:
        """Per layer, zero-copy byte views of the given blocks (CPU caches only)."""
        if self.device.type != "cpu":
            raise RuntimeError("zero-copy views need a CPU cache; use gather_blocks on GPU")
        return [
            [bytes_view(part[block]) for part in layer.parts for block in block_ids]
            for layer in self.layers
        ]

    def gather_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Per layer, one contiguous host tensor of the given blocks (a copy)."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return [
            torch.cat([part.index_select(0, index).reshape(-1) for part in layer.parts]).cpu()
            for layer in self.layers
        ]

    def scatter_blocks(self, block_ids: list[int], per_layer: list[memoryview]) -> None:
        """Write received bytes (one buffer per layer, blocks in order) into the cache."""
        if len(per_layer) != len(self.layers):
            raise ValueError(f"{len(per_layer)} layer buffers for {len(self.layers)} layers")
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for layer, raw in zip(self.layers, per_layer, strict=True):
            src = torch.frombuffer(raw, dtype=layer.parts[0].dtype) if len(raw) else None
            expected = layer.block_nbytes * len(block_ids)
            if len(raw) != expected:
                raise ValueError(f"{layer.name}: {len(raw)} bytes, expected {expected}")
            offset = 0
            for part in layer.parts:
                count = part[0].numel() * len(block_ids)
                chunk = src[offset : offset + count].view(len(block_ids), *part.shape[1:])
                part.index_copy_(0, index, chunk.to(part.device, non_blocking=False))
                offset += count


def _split_parts(name: str, tensor: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, ...]:
    if tensor.shape[0] == num_blocks:
        parts: tuple[torch.Tensor, ...] = (tensor,)
    elif tensor.dim() > 1 and tensor.shape[0] == 2 and tensor.shape[1] == num_blocks:
        parts = (tensor[0], tensor[1])
    else:
        raise ValueError(f"{name}: cannot find the block axis in KV shape {tuple(tensor.shape)}")
    for part in parts:
        if not part[0].is_contiguous():
            raise ValueError(f"{name}: blocks are not contiguous (shape {tuple(part.shape)})")
    return parts


def bytes_view(block: torch.Tensor) -> memoryview:
    """Zero-copy bytes of a contiguous CPU tensor."""
    return memoryview(block.view(torch.uint8).numpy()).cast("B")
