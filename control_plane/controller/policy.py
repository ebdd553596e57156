"""Which compression profile each prefill→decode link should use: pure policy, no Ray, no
Redis (the Serve deployment in `control_plane.controller.service` feeds it telemetry and
publishes its decisions).

Latency model of one transfer of ``V`` raw KV bytes with profile ``p`` on a link of
bandwidth ``B`` (bytes/s everywhere):

    T(p) = a_p + V/S_enc,p + V/(B·cr_p) + V/S_dec,p        (stages in sequence)
    T(p) = a_p + max(V/(B·cr_p), V/S_enc,p + V/S_dec,p)    (pipelined)

with ``cr`` = original bytes / compressed bytes. Over tcp the layers are streamed, so the
wire overlaps the codec, but an overlapped form only pays where the codecs keep their
profiled speed in place. Measured on one CPU host running both engines
(bench/compression_links.py), they run 1.3-1.5x slower than profiled and compete for the
same cores: max(encode, wire, decode) predicted the handoff within a few percent on slow
links but half of it at 5 Gbps and up, steering the controller into compressing fast links
(the form above, 55-85% there), while the sequential form overestimated slow links (where
compressing wins anyway) and put every decision boundary right. Sequential is the default;
pipelined is for codecs on accelerators of their own, small next to the wire.

The offline profiler measured a, S_enc, S_dec, cr and the quality loss of every profile on
this hardware; the online part only estimates B per link and corrects the model where
reality disagrees: a discounted Thompson-sampling bandit over the log-ratio
observed/predicted of the few profiles that the model ranks best, so a profile whose real
cost drifts is dropped within a few transfers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProfileCost:
    """What the offline profiler measured of one profile."""

    name: str
    ratio: float  # cr: original bytes / compressed bytes
    encode_bytes_per_s: float  # raw bytes encoded per second
    decode_bytes_per_s: float  # raw bytes decoded per second
    fixed_s: float = 0.0  # per-transfer cost independent of size
    quality_loss: float = 0.0  # e.g. next-token KL divergence (nats); 0 for lossless
    # Lossless by construction (the codec returns the exact bytes). A lossy profile can
    # measure a loss of 0 (e.g. one that keeps the last 128 tokens raw, profiled on shorter
    # prompts), which proves nothing about longer ones: a class with no quality budget
    # takes lossless profiles only.
    lossless: bool = False

    def latency_s(self, raw_bytes: float, bandwidth_bytes_per_s: float, pipelined: bool = False) -> float:
        encode = raw_bytes / self.encode_bytes_per_s if math.isfinite(self.encode_bytes_per_s) else 0.0
        decode = raw_bytes / self.decode_bytes_per_s if math.isfinite(self.decode_bytes_per_s) else 0.0
        wire = raw_bytes / (bandwidth_bytes_per_s * self.ratio)
        if pipelined:
            # Encode and decode are not assumed to overlap each other: they may share cores.
            return self.fixed_s + max(wire, encode + decode)
        return self.fixed_s + encode + wire + decode


IDENTITY = ProfileCost("identity", 1.0, math.inf, math.inf, lossless=True)


@dataclass(frozen=True)
class SLOClass:
    """A request class and the quality it may give up for speed."""

    name: str
    max_quality_loss: float


DEFAULT_CLASSES = {
    "exact": SLOClass("exact", 0.0),  # lossless profiles only
    "standard": SLOClass("standard", 0.01),
    "relaxed": SLOClass("relaxed", 0.05),
}


@dataclass(frozen=True)
class TransferObservation:
    """One finished transfer, as the connector's telemetry reports it."""

    link: str
    profile: str
    raw_bytes: int
    wire_bytes: int
    wire_s: float
    encode_s: float = 0.0
    decode_s: float = 0.0
    # The handoff's measured duration (every stage, verify and the write into the cache;
    # for a streamed transfer, less than the sum of its overlapping stages). None: not
    # reported, the sum of the stages stands in.
    handoff_s: float | None = None
    # wire_s of a streamed transfer is the time its bytes took to arrive, with no request
    # round trip in it (see kv_transport.telemetry).
    streamed: bool = False

    @property
    def total_s(self) -> float:
        if self.handoff_s is not None:
            return self.handoff_s
        return self.encode_s + self.wire_s + self.decode_s


class BandwidthEstimator:
    """Per link: wire time = latency + bytes / bandwidth. Latency is tracked from the
    fastest small transfers, bandwidth as an EWMA (in log space, so one outlier cannot
    swing it by orders of magnitude) of bytes over the time beyond that latency."""

    def __init__(self, prior_bytes_per_s: float = 1.25e9, alpha: float = 0.3, min_bytes: int = 256 << 10):
        self.prior = prior_bytes_per_s
        self.alpha = alpha
        self.min_bytes = min_bytes
        self._log_bandwidth: dict[str, float] = {}
        self._latency: dict[str, float] = {}

    def observe(self, link: str, wire_bytes: int, wire_s: float, has_latency: bool = True) -> None:
        """One transfer's bytes and time on the link; ``has_latency``: the time includes the
        pull's round trip (a streamed transfer's measured body time does not, so the
        latency learned from other transfers must not be taken off it)."""
        if wire_s <= 0 or wire_bytes <= 0:
            return
        if not has_latency:
            if wire_bytes >= self.min_bytes:
                self._add_sample(link, math.log(wire_bytes / wire_s))
            return
        latency = self._latency.get(link)
        if wire_bytes < self.min_bytes:
            # Small transfers measure latency, not bandwidth.
            self._latency[link] = wire_s if latency is None else min(wire_s, 0.9 * latency + 0.1 * wire_s)
            return
        beyond = max(wire_s - (latency or 0.0), wire_s * 0.5)
        self._add_sample(link, math.log(wire_bytes / beyond))

    def _add_sample(self, link: str, sample: float) -> None:
        old = self._log_bandwidth.get(link)
        self._log_bandwidth[link] = sample if old is None else (1 - self.alpha) * old + self.alpha * sample

    def bandwidth(self, link: str) -> float:
        value = self._log_bandwidth.get(link)
        return self.prior if value is None else math.exp(value)

    def known(self, link: str) -> bool:
        return link in self._log_bandwidth


@dataclass
class _Residual:
    """Discounted statistics of log(observed / predicted) of one (link, profile)."""

    weight: float = 0.0
    total: float = 0.0
    squares: float = 0.0

    def add(self, value: float, discount: float) -> None:
        self.weight = self.weight * discount + 1.0
        self.total = self.total * discount + value
        self.squares = self.squares * discount + value * value

    def decay(self, discount: float) -> None:
        self.weight *= discount
        self.total *= discount
        self.squares *= discount

    @property
    def mean(self) -> float:
        return self.total / self.weight if self.weight > 0 else 0.0

    def std(self, prior_std: float) -> float:
        if self.weight <= 1.0:
            return prior_std
        variance = max(self.squares / self.weight - self.mean**2, 0.0)
        # Shrink toward the prior when there is little evidence.
        return math.sqrt((variance * self.weight + prior_std**2) / (self.weight + 1.0))


@dataclass(frozen=True)
class Choice:
    profile: str
    predicted_s: float  # model prediction, corrected by the bandit's residual mean
    bandwidth_bytes_per_s: float
    candidates: tuple[str, ...] = field(default=())


class CompressionController:
    """Picks, per link and SLO class, the profile with the lowest predicted transfer
    latency among those within the class's quality budget."""

    def __init__(
        self,
        profiles: Iterable[ProfileCost],
        classes: Mapping[str, SLOClass] | None = None,
        candidates: int = 4,
        discount: float = 0.8,
        prior_std: float = 0.3,
        pipelined: bool = False,
        bandwidth: BandwidthEstimator | None = None,
        seed: int | None = None,
    ) -> None:
        self.profiles = {p.name: p for p in profiles}
        self.profiles.setdefault(IDENTITY.name, IDENTITY)  # always a safe, lossless option
        self.classes = dict(classes or DEFAULT_CLASSES)
        self.candidates = candidates
        self.discount = discount
        self.prior_std = prior_std
        self.pipelined = pipelined
        self.bandwidth = bandwidth or BandwidthEstimator()
        self._residuals: dict[tuple[str, str], _Residual] = {}
        self._random = random.Random(seed)

    def allowed(self, slo_class: str) -> list[ProfileCost]:
        budget = self.classes.get(slo_class, self.classes.get("standard", SLOClass("standard", 0.0)))
        if budget.max_quality_loss <= 0:
            return [p for p in self.profiles.values() if p.lossless]
        return [p for p in self.profiles.values() if p.quality_loss <= budget.max_quality_loss]

    def predict(self, profile: str, link: str, raw_bytes: float) -> float:
        return self.profiles[profile].latency_s(raw_bytes, self.bandwidth.bandwidth(link), self.pipelined)

    def observe(self, observation: TransferObservation) -> None:
        if observation.profile not in self.profiles:
            return
        # Bandwidth from the bytes that crossed the link, whatever the profile.
        self.bandwidth.observe(observation.link, observation.wire_bytes, observation.wire_s,
                               has_latency=not observation.streamed)
        predicted = self.predict(observation.profile, observation.link, observation.raw_bytes)
        if predicted <= 0 or observation.total_s <= 0:
            return
        # Old evidence fades for every profile of the link, not only the one observed, so a
        # profile that stopped being tried does not keep a stale verdict forever.
        for (link, _), residual in self._residuals.items():
            if link == observation.link:
                residual.decay(self.discount)
        key = (observation.link, observation.profile)
        residual = self._residuals.setdefault(key, _Residual())
        residual.add(math.log(observation.total_s / predicted), 1.0)

    def choose(self, link: str, slo_class: str, raw_bytes: float, explore: bool = True) -> Choice:
        bandwidth = self.bandwidth.bandwidth(link)
        allowed = self.allowed(slo_class) or [self.profiles[IDENTITY.name]]
        by_model = sorted(allowed, key=lambda p: p.latency_s(raw_bytes, bandwidth, self.pipelined))
        shortlist = by_model[: self.candidates]

        def corrected(profile: ProfileCost, sample: bool) -> float:
            base = profile.latency_s(raw_bytes, bandwidth, self.pipelined)
            residual = self._residuals.get((link, profile.name), _Residual())
            if sample:
                spread = residual.std(self.prior_std) / math.sqrt(max(residual.weight, 1.0))
                return base * math.exp(self._random.gauss(residual.mean, spread))
            return base * math.exp(residual.mean)

        best = min(shortlist, key=lambda p: corrected(p, explore))
        return Choice(best.name, corrected(best, False), bandwidth, tuple(p.name for p in shortlist))
