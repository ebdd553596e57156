"""The offline codec profiler: quality on the real model, the speed fit, the Pareto filter
and hypervolume, the searches' bookkeeping, and the library the controller reads.

The quality tests run the default model (SmolLM2-135M, transformers on CPU) on the two
shortest calibration prompts; they fail, not skip, when the model is not prepared (CI
prepares it with `tandem model prepare`).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from control_plane.controller.library import (
    costs_from_library,
    read_library,
    specs_from_library,
    store_library,
)
from control_plane.profiler.calibration import load_prompts, select_prompts
from control_plane.profiler.export import build_library
from control_plane.profiler.pareto import (
    dominates,
    hypervolume_3d,
    hypervolume_curve,
    normalised_objectives,
    pareto_mask,
)
from control_plane.profiler.quality import ModelQualityProbe, QualityResult
from control_plane.profiler.search import (
    GRID_SPACE,
    Evaluation,
    canonical_profile,
    grid_profiles,
    run_grid,
    run_optuna,
    search_summary,
)
from control_plane.profiler.speed import LinearCost, SpeedResult, fit_linear_cost, measure_speed
from kv_transport.codecs import SEARCH_SPACE, Profile, get_profile, profile_from_choices


def _choices(**overrides: object) -> dict[str, object]:
    return {**{name: values[0] for name, values in SEARCH_SPACE.items()}, **overrides}


AGGRESSIVE_2BIT = profile_from_choices(_choices(key_quant="int2", value_quant="int2", group_size=32))


# -- quality on the real model ----------------------------------------------------------


@pytest.fixture(scope="module")
def probe() -> Iterator[ModelQualityProbe]:
    from control_plane.model import ModelPreparationError, resolve_model

    try:
        path = resolve_model(None)
    except ModelPreparationError as exc:
        pytest.fail(f"profiler quality tests need the default model: {exc}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one core is plenty for 135M
    try:
        yield ModelQualityProbe.from_path(path, select_prompts(load_prompts(), 2, spread=False))
    finally:
        torch.set_num_threads(threads)


def test_identity_reproduces_the_reference_exactly(probe: ModelQualityProbe) -> None:
    result = probe.evaluate(get_profile("identity"))
    assert result.quality_loss == 0.0 and result.kl_first_token == 0.0
    assert result.greedy_agreement == 1.0 and result.greedy_prefix == 1.0
    assert result.rel_l2_k == 0.0 and result.rel_l2_v == 0.0
    assert result.cosine_k == pytest.approx(1.0) and result.cosine_v == pytest.approx(1.0)
    assert 0.95 < result.ratio <= 1.0  # raw bytes plus blob headers


def test_aggressive_2bit_profile_loses_measurable_quality(probe: ModelQualityProbe) -> None:
    int8 = probe.evaluate(get_profile("int8-kivi"))
    int2 = probe.evaluate(AGGRESSIVE_2BIT)
    assert int2.ratio > 4.0 > int8.ratio > 1.5
    # 2-bit KV moves the next-token distribution and changes greedy choices...
    assert int2.quality_loss > 0.02
    assert int2.greedy_agreement < 1.0 and int2.greedy_prefix < 1.0
    assert int2.rel_l2_k > 0.1 and int2.cosine_v < 0.99
    # ...far more than 8-bit does.
    assert int8.quality_loss < int2.quality_loss / 10
    assert int8.greedy_agreement >= int2.greedy_agreement
    assert int8.rel_l2_k < int2.rel_l2_k


def test_speed_kv_is_real_bf16_kv_of_the_longest_prompt(probe: ModelQualityProbe) -> None:
    layers = probe.speed_kv(16)
    assert len(layers) == probe.num_layers == 30
    k, v = layers[0]
    assert k.shape == v.shape == (16, 3, 64) and k.dtype == torch.bfloat16
    assert len(probe.speed_kv(10_000)[0][0]) == probe.longest.prompt_tokens - 1


# -- speed ------------------------------------------------------------------------------


def test_speed_fit_recovers_a_synthetic_fixed_plus_throughput_model() -> None:
    truth = LinearCost(fixed_s=0.002, bytes_per_s=500e6)
    sizes = [64e3, 2e6, 24e6]
    fit = fit_linear_cost(sizes, [truth.seconds(s) for s in sizes])
    assert fit.fixed_s == pytest.approx(0.002, rel=1e-6)
    assert fit.bytes_per_s == pytest.approx(500e6, rel=1e-6)
    # Two sizes with 1% timing noise still land close.
    noisy = fit_linear_cost([1e5, 24e6], [truth.seconds(1e5) * 1.01, truth.seconds(24e6) * 0.99])
    assert noisy.bytes_per_s == pytest.approx(500e6, rel=0.03)
    assert noisy.fixed_s == pytest.approx(0.002, rel=0.1)


def test_speed_fit_stays_physical_under_noise() -> None:
    # A negative intercept is refitted through the origin.
    through_origin = fit_linear_cost([1e6, 2e6], [0.0005, 0.0030])
    assert through_origin.fixed_s == 0.0 and through_origin.bytes_per_s > 0
    # The large size no slower than the small one: fixed = smallest time, finite throughput.
    flat = fit_linear_cost([1e6, 2e6], [0.003, 0.002])
    assert flat.fixed_s == 0.002 and math.isfinite(flat.bytes_per_s) and flat.bytes_per_s > 0
    with pytest.raises(ValueError):
        fit_linear_cost([1e6], [0.1])


def test_measure_speed_reports_throughput_fixed_cost_and_stages() -> None:
    generator = torch.Generator().manual_seed(0)

    def layers(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            tuple(torch.randn(tokens, 2, 64, generator=generator).to(torch.bfloat16) for _ in range(2))
            for _ in range(2)
        ]

    result = measure_speed(get_profile("int4-kivi-g64"), [layers(8), layers(256)], repeats=2)
    assert result.sizes_bytes == (2 * 2 * 8 * 2 * 64 * 2, 2 * 2 * 256 * 2 * 64 * 2)
    assert result.encode.bytes_per_s > 0 and result.decode.bytes_per_s > 0
    assert result.fixed_s >= 0 and result.seconds_per_mb > 0
    assert {"quantize", "pack"} <= set(result.encode_stages)
    assert {"unpack", "dequantize"} <= set(result.decode_stages)


# -- Pareto set and hypervolume ---------------------------------------------------------


def _brute_force_hypervolume(points: list[tuple[float, float, float]], reference: tuple[float, float, float]) -> float:
    """Sum of the cells of the coordinate grid that some point dominates (exact, slow)."""
    axes = [sorted({p[d] for p in points} | {reference[d]}) for d in range(3)]
    volume = 0.0
    for i, j, k in itertools.product(*(range(len(axis) - 1) for axis in axes)):
        corner = (axes[0][i], axes[1][j], axes[2][k])
        if any(all(p[d] <= corner[d] for d in range(3)) for p in points):
            volume += (axes[0][i + 1] - corner[0]) * (axes[1][j + 1] - corner[1]) * (axes[2][k + 1] - corner[2])
    return volume


def test_hypervolume_of_hand_made_points() -> None:
    ref = (1.0, 1.0, 1.0)
    assert hypervolume_3d([(0.5, 0.5, 0.5)], ref) == pytest.approx(0.125)
    a, b, c = (0.2, 0.6, 0.4), (0.6, 0.2, 0.4), (0.5, 0.5, 0.1)
    assert hypervolume_3d([a, b], ref) == pytest.approx(0.192 + 0.192 - 0.096)
    # Inclusion-exclusion over the three boxes.
    assert hypervolume_3d([a, b, c], ref) == pytest.approx(0.369)
    # A dominated point, a duplicate and a point outside the reference box change nothing.
    assert hypervolume_3d([a, b, c, (0.7, 0.7, 0.7), a, (0.1, 0.1, 1.5)], ref) == pytest.approx(0.369)
    assert hypervolume_3d([], ref) == 0.0


def test_hypervolume_matches_brute_force_on_random_fronts() -> None:
    rng = random.Random(7)
    for _ in range(20):
        points = [tuple(rng.random() for _ in range(3)) for _ in range(rng.randint(1, 9))]
        assert hypervolume_3d(points, (1.1, 1.1, 1.1)) == pytest.approx(_brute_force_hypervolume(points, (1.1, 1.1, 1.1)))


def test_hypervolume_curve_grows_to_the_total() -> None:
    rng = random.Random(3)
    points = [tuple(rng.random() for _ in range(3)) for _ in range(25)]
    curve = hypervolume_curve(points)
    assert all(later >= earlier for earlier, later in itertools.pairwise(curve))
    assert curve[-1] == pytest.approx(hypervolume_3d(points))


def test_pareto_filter() -> None:
    points = [
        (0.1, 0.9, 0.5),  # best compression
        (0.9, 0.1, 0.5),  # fastest
        (0.5, 0.5, 0.0),  # lossless
        (0.5, 0.5, 0.1),  # dominated by the lossless one
        (0.9, 0.9, 0.9),  # dominated by everything
        (0.1, 0.9, 0.5),  # a duplicate of a Pareto point stays
    ]
    assert pareto_mask(points) == [True, True, True, False, False, True]
    assert dominates((0.1, 0.1, 0.1), (0.1, 0.2, 0.1)) and not dominates((0.1, 0.1, 0.1), (0.1, 0.1, 0.1))


def test_normalised_objectives_are_bounded_and_ordered() -> None:
    lossless = normalised_objectives(1.0, 2e-4, 0.0)
    lossy = normalised_objectives(4.0, 5e-3, 0.05)
    assert lossless[2] == 0.0 and lossy[2] > 0
    assert lossy[0] == pytest.approx(0.25) and lossless[0] == 1.0
    assert lossy[1] > lossless[1]
    assert all(0.0 <= x <= 1.0 for x in normalised_objectives(0.5, 50.0, 1e6))


# -- searches ---------------------------------------------------------------------------


def _fake_evaluation(profile: Profile) -> Evaluation:
    """Objectives made up from the parameters (fewer bits: smaller, lossier, slower)."""
    bits = (profile.nominal_bits_per_value("k") + profile.nominal_bits_per_value("v")) / 2
    lossless = profile.lossless.codec != "none"
    raw = 1_000_000
    quality = QualityResult(
        quality_loss=0.0 if profile.is_lossless else 2.0 ** (-bits),
        kl_first_token=0.0,
        greedy_agreement=1.0,
        greedy_prefix=1.0,
        rel_l2_k=0.0,
        rel_l2_v=0.0,
        cosine_k=1.0,
        cosine_v=1.0,
        raw_bytes=raw,
        encoded_bytes=int(raw * bits / 16 * (0.8 if lossless else 1.0)),
    )
    throughput = 2e9 / (1 + (16 - bits) / 4) / (3 if lossless else 1)
    speed = SpeedResult(LinearCost(1e-4, throughput), LinearCost(1e-4, throughput * 1.5))
    return Evaluation(profile, quality, speed, seconds=0.01)


class _FakeEvaluator:
    def __init__(self) -> None:
        self.cache: dict[str, Evaluation] = {}
        self.calls = 0

    @property
    def evaluations(self) -> list[Evaluation]:
        return list(self.cache.values())

    def evaluate(self, profile: Profile, source: str) -> Evaluation:
        self.calls += 1
        evaluation = self.cache.setdefault(profile.params_key, _fake_evaluation(profile))
        if source not in evaluation.sources:
            evaluation.sources.append(source)
        return evaluation


def test_grid_subset_is_fifty_distinct_valid_profiles() -> None:
    profiles = grid_profiles()
    assert len(profiles) == 50
    assert len({p.params_key for p in profiles}) == len({p.name for p in profiles}) == 50
    assert set(GRID_SPACE) == set(SEARCH_SPACE)


def test_invalid_search_points_map_to_their_valid_twin() -> None:
    # byteplane without a compressor, and a rotation with nothing quantised to rotate.
    profile = canonical_profile(_choices(transform="hadamard", lossless="none", byteplane=True))
    assert profile.transform.kind == "none" and not profile.lossless.byteplane
    assert profile.params_key == get_profile("identity").params_key


def test_optuna_and_grid_share_the_cache_and_count_honestly() -> None:
    pytest.importorskip("optuna")
    evaluator = _FakeEvaluator()
    grid = run_grid(evaluator, grid_profiles())
    tpe = run_optuna(evaluator, 12, "tpe", seed=1)
    assert grid.trials == 50 and tpe.trials == 12
    assert len(evaluator.cache) <= 50 + 12
    target = search_summary(grid, evaluator, 1.0)["hypervolume"]
    grid_row = search_summary(grid, evaluator, target)
    tpe_row = search_summary(tpe, evaluator, target)
    assert grid_row["evaluations"] == 50 and grid_row["hypervolume_vs_grid"] == pytest.approx(1.0)
    assert grid_row["evals_to_100pct"] is not None and grid_row["evals_to_100pct"] <= 50
    assert 1 <= tpe_row["evaluations"] <= 12 and tpe_row["hypervolume"] > 0
    # Both searches are recorded on the profiles they asked for.
    assert all("grid" in e.sources or "tpe" in e.sources for e in evaluator.evaluations)


# -- the library ------------------------------------------------------------------------


def test_library_round_trips_through_the_controller(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    searched = profile_from_choices(_choices(key_quant="int4", value_quant="int8", lossless="zstd1"))
    evaluations = [_fake_evaluation(p) for p in (get_profile("identity"), get_profile("int8-kivi"), searched, AGGRESSIVE_2BIT)]
    library = build_library(evaluations, "smollm2-135m-instruct", hardware="test-cpu")
    loaded = json.loads(json.dumps(library))  # strict JSON: no inf / nan
    assert loaded["model"] == "smollm2-135m-instruct" and loaded["hardware"] == "test-cpu"

    costs = {c.name: c for c in costs_from_library(loaded, pareto_only=False)}
    assert set(costs) == {"identity", "int8-kivi", searched.name, AGGRESSIVE_2BIT.name}
    # Identity travels raw: no codec cost, as the controller's own IDENTITY.
    assert costs["identity"].ratio == 1.0 and math.isinf(costs["identity"].encode_bytes_per_s)
    assert costs["identity"].fixed_s == 0.0 and costs["identity"].quality_loss == 0.0
    by_name = {e["name"]: e for e in loaded["profiles"]}
    for name in ("int8-kivi", searched.name):
        assert costs[name].ratio == pytest.approx(by_name[name]["ratio"])
        assert costs[name].encode_bytes_per_s == pytest.approx(by_name[name]["encode_bytes_per_s"])
        assert costs[name].fixed_s == pytest.approx(2e-4)
    pareto_names = {c.name for c in costs_from_library(loaded)}
    assert pareto_names == {e["name"] for e in loaded["profiles"] if e["pareto"]} and "identity" in pareto_names

    # Every entry's spec rebuilds the very profile a connector would use.
    specs = specs_from_library(loaded)
    assert Profile.from_dict(specs[searched.name]) == searched
    assert Profile.from_dict(specs["int8-kivi"]) == get_profile("int8-kivi")

    path = store_library(loaded, "smollm2-135m-instruct")
    assert path.is_relative_to(tmp_path)
    assert read_library("smollm2-135m-instruct") == loaded


# -- calibration prompts ----------------------------------------------------------------


def test_calibration_prompts_are_bundled_and_selectable() -> None:
    prompts = load_prompts()
    assert 8 <= len(prompts) <= 12 and len({p.id for p in prompts}) == len(prompts)
    kinds = {p.kind for p in prompts}
    assert {"chat", "code", "document"} <= kinds
    by_length = sorted(prompts, key=lambda p: p.chars)
    assert select_prompts(prompts, 2, spread=False) == by_length[:2]
    spread = select_prompts(prompts, 4)
    assert len(spread) == 4 and spread[0] == by_length[0] and spread[-1] == by_length[-1]
    assert select_prompts(prompts, 100) == by_length


def test_identity_dominates_lossless_profiles_that_do_not_compress() -> None:
    # Sent raw, identity has no codec time: a lossless profile that does not compress (a
    # short request inside a recent-token window, say) is never worth choosing, however fast.
    identity = _fake_evaluation(get_profile("identity"))
    not_compressing = _fake_evaluation(get_profile("lz4"))
    not_compressing.quality = replace(not_compressing.quality, encoded_bytes=not_compressing.quality.raw_bytes + 100)
    not_compressing.speed = SpeedResult(LinearCost(0.0, 1e12), LinearCost(0.0, 1e12))
    compressing = _fake_evaluation(get_profile("zstd3"))
    flags = {e["name"]: e["pareto"] for e in build_library([identity, not_compressing, compressing], "m", "hw")["profiles"]}
    assert flags == {"identity": True, "lz4": False, "zstd3": True}


def test_profile_cli_mounts_under_a_parent_app(monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    from control_plane.profiler import cli

    calls = []
    monkeypatch.setattr(cli, "run_profile", lambda *args, **kwargs: calls.append((args, kwargs)))
    parent = typer.Typer()
    parent.command("other")(lambda: None)
    parent.add_typer(cli.profile_app, name="profile")
    result = CliRunner().invoke(parent, ["profile", "--quick", "--trials", "5", "--no-grid", "--redis-url", "redis://r:6379/0"])
    assert result.exit_code == 0, result.output
    (args, kwargs), = calls
    assert args == (None, None) and kwargs["quick"] and kwargs["trials"] == 5 and not kwargs["grid"]
    assert kwargs["redis_url"] == "redis://r:6379/0"
