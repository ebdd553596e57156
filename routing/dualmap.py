"""DualMap's hashing core: two independent consistent-hash rings over one pool.

Each request's prefix key maps to one instance on each ring; the router then picks the
better of the two candidates from live state. Requests that share a prefix get the same
two candidates (cache affinity); distinct prefixes spread with the power of two choices.
Pure Python: no Ray, no vLLM.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

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


def text_prefix_key(text: str, chars: int = 1024) -> bytes:
    """Key of a prompt known only as text (before tokenization): its first ``chars``
    characters, about 256 tokens of English."""
    return text[:chars].encode("utf-8", "surrogatepass")


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

    def lookup_other(self, key: bytes, other: str) -> str:
        """The first instance clockwise from the key's point that is not ``other`` (its
        owner if there is no other)."""
        if not self._points:
            raise LookupError("the ring has no instances")
        start = bisect.bisect(self._points, self._hash(key))
        for step in range(len(self._points)):
            owner = self._owners[(start + step) % len(self._points)]
            if owner != other:
                return owner
        return other


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

    def distinct_candidates(self, key: bytes) -> tuple[str, str]:
        """Like `candidates`, but when the rings agree the secondary is the next other
        instance on the second ring: two real choices whenever the pool has two
        instances (with N instances the rings agree for 1/N of keys, half of them at N=2)."""
        primary, secondary = self.candidates(key)
        if secondary == primary:
            secondary = self.rings[1].lookup_other(key, primary)
        return primary, secondary


@dataclass
class InstanceLoad:
    """What the router knows of one instance right now (its own in-flight accounting plus
    the latest routing stats the replica broadcast)."""

    queued_prefill_tokens: int = 0  # uncached prompt tokens routed there and not yet prefilled
    running: int = 0  # requests in flight there
    healthy: bool = True
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use (decode placement)
    decode_tokens: int = 0  # tokens still to generate by its requests in flight


class TTFTPredictor:
    """Predicted TTFT = fixed + work x seconds per token, per instance, where work = the
    instance's queued uncached prefill tokens + this request's uncached tokens.

    Both terms start from a prior and are fitted online to observed TTFTs by recursive least
    squares with forgetting, so a fixed overhead (scheduling, the KV publication, one decode
    step) and a per-token cost are told apart. A single multiplicative correction cannot do
    that: after a few cached requests (work ~ 0, TTFT ~ the overhead) it scales every later
    prediction by overhead / (prior fixed cost), hundreds of times too high."""

    _KILO = 1000.0  # work in thousands of tokens keeps the two parameters on similar scales
    _MAX_FIXED_S = 60.0
    _SECONDS_PER_KTOKEN = (1e-4, 100.0)  # 10M .. 10 tokens/s
    _MAX_VARIANCE = 100.0

    def __init__(self, prior_tokens_per_s: float = 2000.0, fixed_s: float = 0.02, forgetting: float = 0.95):
        self.prior = prior_tokens_per_s
        self.fixed_s = fixed_s
        self.forgetting = forgetting
        # instance -> [fixed_s, s_per_ktoken, P00, P01, P11]
        self._fits: dict[str, list[float]] = {}

    def _prior_fit(self) -> list[float]:
        return [self.fixed_s, self._KILO / self.prior, 1.0, 0.0, 1.0]

    def predict(self, instance: str, load: InstanceLoad, new_uncached_tokens: int) -> float:
        work = max(0, load.queued_prefill_tokens) + max(0, new_uncached_tokens)
        return self.predict_work(instance, work)

    def predict_work(self, instance: str, work_tokens: float) -> float:
        fit = self._fits.get(instance)
        if fit is None:
            return self.fixed_s + work_tokens / self.prior
        return fit[0] + fit[1] * (work_tokens / self._KILO)

    def observe(self, instance: str, work_tokens: float, observed_s: float) -> None:
        """One observed TTFT of a request that found ``work_tokens`` of work (its own
        included) on ``instance`` when it was routed."""
        if work_tokens < 0 or not 0 < observed_s < float("inf"):
            return
        fit = self._fits.setdefault(instance, self._prior_fit())
        fixed, slope, p00, p01, p11 = fit
        x1 = work_tokens / self._KILO
        # P x, with x = (1, x1)
        px0, px1 = p00 + p01 * x1, p01 + p11 * x1
        denominator = self.forgetting + px0 + x1 * px1
        k0, k1 = px0 / denominator, px1 / denominator
        error = observed_s - (fixed + slope * x1)
        fixed += k0 * error
        slope += k1 * error
        p00, p01, p11 = ((p00 - k0 * px0) / self.forgetting, (p01 - k0 * px1) / self.forgetting,
                         (p11 - k1 * px1) / self.forgetting)
        # Bounded: a physical range for both terms, and no covariance wind-up while the
        # observations repeat one work size.
        fit[0] = min(max(fixed, 0.0), self._MAX_FIXED_S)
        fit[1] = min(max(slope, self._SECONDS_PER_KTOKEN[0]), self._SECONDS_PER_KTOKEN[1])
        scale = max(1.0, (p00 + p11) / self._MAX_VARIANCE)
        fit[2], fit[3], fit[4] = p00 / scale, p01 / scale, p11 / scale


@dataclass
class Decision:
    instance: str
    # dualmap: affinity | second_choice | fallback | rebalance; baselines name their own
    reason: str
    predicted_ttft_s: float = 0.0
    # Prompt tokens the chosen instance is expected to compute (not found in its cache).
    uncached_tokens: int = 0
    # Uncached tokens already queued on the chosen instance when it was chosen (-1: unknown);
    # with uncached_tokens, the work whose observed TTFT calibrates the predictor.
    queued_tokens: int = -1


def choose(
    candidates: tuple[str, str],
    loads: Mapping[str, InstanceLoad],
    prompt_tokens: int,
    cached_fraction: dict[str, float],
    slo_ttft_s: float,
    predictor: TTFTPredictor,
    fallback: bool = True,
    footprint: Mapping[str, float] | None = None,
) -> Decision:
    """Pick an instance for one request.

    Prefer the candidate most likely to hold the prefix (highest expected cache hit); keep
    it if its predicted TTFT meets the SLO. Otherwise take the other candidate if that one
    meets it, else fall back to the instance with the lowest predicted TTFT in the whole
    pool (with ``fallback=False``, an ablation, the choice never leaves the two
    candidates: the one with the lower predicted TTFT). The check is per request against the preferred instance, never a fleet-wide
    imbalance gate.
    """

    def uncached(instance: str) -> int:
        return int(prompt_tokens * (1.0 - cached_fraction.get(instance, 0.0)))

    def predicted(instance: str) -> float:
        return predictor.predict(instance, loads.get(instance, InstanceLoad()), uncached(instance))

    def queued(instance: str) -> int:
        return loads.get(instance, InstanceLoad()).queued_prefill_tokens

    healthy = [i for i, load in loads.items() if load.healthy]
    if not healthy:
        raise LookupError("no healthy instance in the pool")
    live = [c for c in dict.fromkeys(candidates) if c in healthy]
    # Most likely to hold the prefix first; between equals (e.g. a new prefix), the one
    # predicted to answer sooner (the power of two choices), then the one caching fewer
    # prefixes (``footprint``: spreads new prefixes over an idle pool); then ring order.
    footprint = footprint or {}
    ranked = sorted(
        live, key=lambda i: (-cached_fraction.get(i, 0.0), predicted(i), footprint.get(i, 0.0))
    )
    # ranked may hold one candidate (both rings agree, or one is down): strict=False.
    for reason, instance in zip(("affinity", "second_choice"), ranked, strict=False):
        ttft = predicted(instance)
        if ttft <= slo_ttft_s:
            return Decision(instance, reason, ttft, uncached(instance), queued(instance))
    pool = healthy if fallback else (ranked or healthy)
    best = min(pool, key=predicted)
    return Decision(best, "fallback" if fallback else "second_choice", predicted(best), uncached(best), queued(best))
