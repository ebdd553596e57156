"""The compression controller's policy on synthetic telemetry: bandwidth steps, a profile
whose real cost drifts, quality budgets."""

from __future__ import annotations

import math

from control_plane.controller.policy import (
    BandwidthEstimator,
    CompressionController,
    ProfileCost,
    TransferObservation,
)

GBPS = 1e9 / 8  # bytes/s
MB = 1 << 20

PROFILES = [
    ProfileCost("zstd-lossless", ratio=1.25, encode_bytes_per_s=400 * MB, decode_bytes_per_s=800 * MB, fixed_s=0.001,
                lossless=True),
    ProfileCost("int8", ratio=2.0, encode_bytes_per_s=1500 * MB, decode_bytes_per_s=2000 * MB, fixed_s=0.0005, quality_loss=0.002),
    ProfileCost("int4", ratio=4.0, encode_bytes_per_s=1200 * MB, decode_bytes_per_s=1500 * MB, fixed_s=0.0005, quality_loss=0.008),
    ProfileCost("int2", ratio=7.5, encode_bytes_per_s=1000 * MB, decode_bytes_per_s=1200 * MB, fixed_s=0.0005, quality_loss=0.04),
]


def run_transfer(controller: CompressionController, link: str, slo: str, raw: int, true_bw: float,
                 slowdown: dict[str, float] | None = None) -> str:
    """One transfer under the controller's choice, its telemetry fed back; returns the profile."""
    choice = controller.choose(link, slo, raw)
    profile = controller.profiles[choice.profile]
    factor = (slowdown or {}).get(profile.name, 1.0)
    encode = (raw / profile.encode_bytes_per_s if math.isfinite(profile.encode_bytes_per_s) else 0.0) * factor
    decode = raw / profile.decode_bytes_per_s if math.isfinite(profile.decode_bytes_per_s) else 0.0
    wire_bytes = int(raw / profile.ratio)
    wire = 0.0002 + wire_bytes / true_bw
    controller.observe(TransferObservation(link, profile.name, raw, wire_bytes, wire, encode + profile.fixed_s, decode))
    return profile.name


def test_slow_links_compress_fast_links_do_not():
    controller = CompressionController(PROFILES, seed=1)
    raw = 64 * MB
    slow = [run_transfer(controller, "p->slow", "standard", raw, 0.5 * GBPS) for _ in range(30)]
    fast = [run_transfer(controller, "p->fast", "standard", raw, 100 * GBPS) for _ in range(30)]
    assert slow[-10:].count("int4") >= 8  # the strongest allowed compression
    assert fast[-10:].count("identity") >= 8  # codecs are slower than a 100 Gbps link


def test_a_bandwidth_step_changes_the_choice_within_a_few_transfers():
    controller = CompressionController(PROFILES, seed=2)
    raw = 64 * MB
    for _ in range(20):
        run_transfer(controller, "link", "standard", raw, 100 * GBPS)
    assert controller.choose("link", "standard", raw, explore=False).profile == "identity"
    after = [run_transfer(controller, "link", "standard", raw, 1 * GBPS) for _ in range(10)]
    assert after.index("int4") <= 4 and after[-5:].count("int4") >= 4


def test_a_profile_that_slows_down_is_dropped_within_a_few_transfers():
    controller = CompressionController(PROFILES, seed=3)
    raw = 64 * MB
    for _ in range(20):
        run_transfer(controller, "link", "standard", raw, 1 * GBPS)
    assert controller.choose("link", "standard", raw, explore=False).profile == "int4"
    # int4's encoder becomes 20x slower (e.g. the GPU is now busy): the model doesn't know.
    drift = {"int4": 20.0}
    later = [run_transfer(controller, "link", "standard", raw, 1 * GBPS, drift) for _ in range(12)]
    assert "int4" not in later[-6:]
    assert controller.choose("link", "standard", raw, explore=False).profile == "int8"


def test_quality_budgets_bound_the_choice():
    controller = CompressionController(PROFILES, seed=4)
    raw = 64 * MB
    exact = {run_transfer(controller, "l", "exact", raw, 0.5 * GBPS) for _ in range(20)}
    assert exact <= {"identity", "zstd-lossless"}
    relaxed = [run_transfer(controller, "l2", "relaxed", raw, 0.5 * GBPS) for _ in range(20)]
    assert relaxed[-5:].count("int2") >= 4


def test_a_lossy_profile_that_measured_no_loss_is_not_exact():
    # E.g. a profile keeping the last 128 tokens raw, profiled on 50-token prompts: its
    # measured loss is 0, yet it quantizes every longer prompt.
    raw_window = ProfileCost("int2-r128", ratio=6.0, encode_bytes_per_s=2000 * MB, decode_bytes_per_s=2000 * MB,
                             quality_loss=0.0)  # fmt: skip
    controller = CompressionController([*PROFILES, raw_window], seed=5)
    assert "int2-r128" not in {p.name for p in controller.allowed("exact")}
    assert {p.name for p in controller.allowed("exact")} == {"identity", "zstd-lossless"}
    assert "int2-r128" in {p.name for p in controller.allowed("standard")}


def test_bandwidth_estimate_separates_latency_from_rate():
    estimator = BandwidthEstimator(prior_bytes_per_s=1.0)
    for _ in range(5):
        estimator.observe("l", 4096, 0.001)  # small: latency only
    for _ in range(10):
        estimator.observe("l", 100 * MB, 0.001 + 100 * MB / (10 * GBPS))
    assert abs(estimator.bandwidth("l") / (10 * GBPS) - 1) < 0.05


def test_pipelined_model_overlaps_the_wire_with_the_codec():
    profile = PROFILES[2]
    raw = 100 * MB
    serial = profile.latency_s(raw, 1 * GBPS)
    pipelined = profile.latency_s(raw, 1 * GBPS, pipelined=True)
    wire = raw / (1 * GBPS * profile.ratio)
    assert math.isclose(pipelined, profile.fixed_s + wire)
    # On a fast link the codec sets the pace, encode and decode one after the other.
    codec = raw / profile.encode_bytes_per_s + raw / profile.decode_bytes_per_s
    assert math.isclose(profile.latency_s(raw, 100 * GBPS, pipelined=True), profile.fixed_s + codec)
    assert serial > pipelined


def test_an_overlapped_handoff_is_judged_by_its_measured_duration():
    """A streamed transfer's stages overlap: the bandit compares the model with the handoff
    as measured, not with the sum of stages that ran at the same time."""
    streamed = TransferObservation("l", "p", 100 * MB, 25 * MB, wire_s=0.2, encode_s=0.2, decode_s=0.01,
                                   handoff_s=0.25)
    assert streamed.total_s == 0.25
    serial = TransferObservation("l", "p", 100 * MB, 25 * MB, wire_s=0.2, encode_s=0.2, decode_s=0.01)
    assert math.isclose(serial.total_s, 0.41)


def test_a_streamed_sample_is_not_shortened_by_the_learned_latency():
    """A streamed transfer's wire time is its bytes' arrival, without the pull's round
    trip: taking the latency learned from other pulls off it would double the bandwidth."""
    estimator = BandwidthEstimator()
    for _ in range(20):
        estimator.observe("l", 64 << 10, 0.005)  # small pulls: 5 ms of round trip
    for _ in range(20):
        estimator.observe("l", 1 * MB, 1 * MB / (1 * GBPS), has_latency=False)  # 8 ms of body
    assert abs(estimator.bandwidth("l") / (1 * GBPS) - 1) < 0.05
