"""Per-instance prefix cache: LRU over KV blocks identified by chained block hashes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class LRUBlockCache:
    """What one prefill instance's vLLM prefix cache holds, block by block.

    A prompt hits the longest run of its *leading* blocks that are cached (a block's hash
    chains everything before it, so a later block is useless without the earlier ones).
    Blocks are touched tail first, so the head of a prefix is the most recently used and
    is evicted last, as vLLM's free-block queue does when a request frees its blocks.
    """

    def __init__(self, capacity_blocks: int):
        if capacity_blocks < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def match(self, blocks: Sequence[int]) -> int:
        """Number of leading blocks cached; refreshes them."""
        cached = self._blocks
        count = 0
        for block in blocks:
            if block not in cached:
                break
            count += 1
        for block in reversed(blocks[:count]):
            cached.move_to_end(block)
        return count

    def insert(self, blocks: Sequence[int]) -> None:
        """Cache ``blocks`` (a prefix's consecutive blocks, in prompt order)."""
        if self.capacity == 0:
            return
        cached = self._blocks
        for block in reversed(blocks):
            if block in cached:
                cached.move_to_end(block)
            else:
                cached[block] = None
        while len(cached) > self.capacity:
            cached.popitem(last=False)
