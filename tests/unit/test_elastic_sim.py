"""The elastic P/D simulator: engines start late, drain or drop, and are paid for."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bench.cluster_sim.cost_model import load_profile
from bench.cluster_sim.elastic import ElasticSim, StaticScaler, TandemScaler
from bench.cluster_sim.shifting import Stretch, shifting_workload
from control_plane.settings import PlannerSettings

COST = load_profile("gpu_llama3_8b_h100")
SHORT_DAY = (Stretch("chat", 60, 30), Stretch("document", 60, 4))


@dataclass
class Scripted:
    """Targets by time: [(from_t, prefill, decode), ...]."""

    script: list[tuple[float, int, int]]
    drains: bool = True
    interval_s: float = 5.0
    name: str = "scripted"
    seen: list[tuple[float, int, int]] = field(default_factory=list)

    def initial(self) -> tuple[int, int]:
        return self.script[0][1], self.script[0][2]

    def tick(self, sim, obs):
        target = [(p, d) for t, p, d in self.script if t <= obs.now][-1]
        self.seen.append((obs.now, obs.prefill_replicas, obs.decode_replicas))
        return target


def _run(scaler, start_s: float = 30.0):
    workload, arrivals = shifting_workload(SHORT_DAY, seed=1)
    return ElasticSim(COST, workload, arrivals, scaler, slo_ttft_s=2.0, slo_tpot_s=0.05,
                      engine_start_s=start_s).run(), len(workload.requests)


def test_a_static_pool_pays_for_every_engine_all_along():
    result, requests = _run(StaticScaler(2, 3))
    assert result.lost == 0 and result.measured == requests
    end = result.timeline[-1]["t"]
    # Every engine from 0 to the last request's last token (a little past the last tick).
    assert result.engine_hours == pytest.approx(5 * end / 3600, rel=0.05)
    assert result.prefill_engine_hours / result.decode_engine_hours == pytest.approx(2 / 3)
    assert 0.0 <= result.attainment <= min(result.ttft_attainment, result.tpot_attainment)


def test_scaling_down_with_drain_loses_nothing_and_without_loses_requests():
    script = [(0.0, 4, 4), (40.0, 1, 1)]
    drained, requests = _run(Scripted(script))
    assert drained.lost == 0
    assert drained.measured == requests
    dropped, _ = _run(Scripted(script, drains=False))
    assert dropped.lost > 0
    assert dropped.attainment < drained.attainment


def test_a_new_engine_serves_only_after_it_started():
    scaler = Scripted([(0.0, 1, 1), (20.0, 3, 2)])
    result, _ = _run(scaler, start_s=30.0)
    at = {round(p["t"]): p for p in result.timeline}
    assert at[25]["prefill"] == 3 and at[25]["prefill_serving"] == 1
    assert at[45]["prefill"] == 3 and at[45]["prefill_serving"] == 1
    assert at[55]["prefill_serving"] == 3 and at[55]["decode_serving"] == 2
    # Starting engines are paid for: more than the pools' serving time alone.
    assert result.prefill_engine_hours > (1 * 20 + 3 * (result.timeline[-1]["t"] - 50)) / 3600


def test_tandem_planner_in_the_loop_moves_the_ratio_with_the_mix():
    settings = PlannerSettings(enabled=True, slo_ttft_s=2.0, slo_tpot_s=0.05, interval_s=5.0, engine_start_s=30.0,
                               downscale_delay_s=20.0)
    scaler = TandemScaler(settings, start=(1, 1))
    result, _ = _run(scaler)
    chat = [p for p in result.timeline if 40 <= p["t"] <= 60]
    docs = [p for p in result.timeline if 100 <= p["t"] <= 120]
    assert max(p["decode"] for p in chat) > max(p["prefill"] for p in chat)
    assert max(p["prefill"] for p in docs) > min(p["prefill"] for p in chat)
    assert result.lost == 0
    assert scaler.plans and {"prefill", "decode"} <= set(scaler.plans[0])
