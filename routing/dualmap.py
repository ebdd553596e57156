"""DualMap's hashing core: two independent consistent-hash rings over one pool.

Each request's prefix key maps to one instance on each ring; the router then picks the
better of the two candidates from live state. Requests that share a prefix get the same
two candidates (cache affinity); distinct prefixes spread with the power of two choices.
Pure Python: no Ray, no vLLM.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import xxhash

DEFAULT_VNODES = 160
# Two unrelated seeds make the rings independent hash functions of the same key.
RING_SEEDS = (0x5EED_0001, 0x5EED_0002)


def prefix_key(tokens: Sequence[int], block_tokens: int = 256) -> bytes:
    """Canonical key of a prompt: its first ``block_tokens`` token ids (fewer if shorter).

    A fixed-length prefix makes requests that share a system prompt map together while the
    rest of the conversation varies.
    """
    head = tokens[:block_tokens]
    return b"".join(int(t).to_bytes(4, "little", signed=False) for t in head)


class HashRing:
    """Consistent hashing with virtual nodes: adding or removing one of N instances moves
    about 1/N of the keys."""

    def __init__(self, instances: Iterable[str] = (), vnodes: int = DEFAULT_VNODES, seed: int = 0):
        self.vnodes = vnodes
        self.seed = seed
        self._points: list[int] = []
        self._owners: list[str] = []
        self._instances: set[str] = set()
        for instance in instances:
            self.add(instance)

    def _hash(self, data: bytes) -> int:
        return xxhash.xxh64_intdigest(data, seed=self.seed)

    def add(self, instance: str) -> None:
        if instance in self._instances:
            return
        self._instances.add(instance)
        for replica in range(self.vnodes):
            point = self._hash(f"{instance}#{replica}".encode())
            index = bisect.bisect(self._points, point)
            self._points.insert(index, point)
            self._owners.insert(index, instance)

    def remove(self, instance: str) -> None:
        if instance not in self._instances:
            return
        self._instances.discard(instance)
        keep = [(p, o) for p, o in zip(self._points, self._owners, strict=True) if o != instance]
        self._points = [p for p, _ in keep]
        self._owners = [o for _, o in keep]

    @property
    def instances(self) -> frozenset[str]:
        return frozenset(self._instances)

    def lookup(self, key: bytes) -> str:
        if not self._points:
            raise LookupError("the ring has no instances")
        index = bisect.bisect(self._points, self._hash(key)) % len(self._points)
        return self._owners[index]


class DualRing:
    """The two candidate instances of a key, one per independent ring."""

    def __init__(self, instances: Iterable[str] = (), vnodes: int = DEFAULT_VNODES, seeds: tuple[int, int] = RING_SEEDS):
        instances = list(instances)
        self.rings = (HashRing(instances, vnodes, seeds[0]), HashRing(instances, vnodes, seeds[1]))

    def add(self, instance: str) -> None:
        for ring in self.rings:
            ring.add(instance)

    def remove(self, instance: str) -> None:
        for ring in self.rings:
            ring.remove(instance)

    @property
    def instances(self) -> frozenset[str]:
        return self.rings[0].instances

    def candidates(self, key: bytes) -> tuple[str, str]:
        """(primary, secondary); equal when both rings agree or only one instance exists."""
        return self.rings[0].lookup(key), self.rings[1].lookup(key)
