"""The planner's Ray Serve binding: contexts in, targets out; the windows the replicas
report; the app's wiring (autoscaling configs, the policy of a config deploy)."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingContext

from control_plane import app as app_module
from control_plane.planner import serve_policy
from control_plane.planner.metrics import PlannerMetricsCollector
from control_plane.planner.policy import ClassAttainment
from control_plane.planner.serve_policy import PlannerPolicy, observation, read_decisions, read_plan
from control_plane.settings import PlannerSettings, TandemSettings
from routing.workload import WORKLOAD_STATS, WorkloadWindow
from workers.stats import PLANNER_STATS, EngineStats, WindowedSums


class FakeRedis:
    """The few commands the planner uses (a pipeline runs them at once)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.hashes: dict[str, dict[bytes, int]] = {}

    def set(self, key, value, ex=None):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        return self.data.get(key)

    def hincrby(self, key, field, amount):
        fields = self.hashes.setdefault(key, {})
        fields[field.encode()] = fields.get(field.encode(), 0) + amount

    def hgetall(self, key):
        return dict(self.hashes.get(key, {}))

    def pipeline(self):
        return self

    def execute(self):
        return []


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def context(name: str, target: int, running: int, metrics: dict[str, list[float]], now: float = 50.0):
    dep = DeploymentID(name=name, app_name="tandem")
    replicas = [f"{name}-{i}" for i in range(max(len(v) for v in metrics.values()) if metrics else running)]
    per_metric = {metric: dict(zip(replicas, values, strict=False)) for metric, values in metrics.items()}
    return dep, AutoscalingContext(
        deployment_id=dep, deployment_name=name, app_name="tandem", current_num_replicas=running,
        target_num_replicas=target, running_replicas=replicas[:running], total_num_requests=0.0,
        total_queued_requests=0.0, aggregated_metrics=per_metric, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=None,
    )


def contexts(now: float = 50.0, arrivals: float = 200.0, prompt: float = 200.0 * 6000):
    ingress = {"arrivals": [arrivals], "prompt_tokens": [prompt], "prompt_tokens_p90": [8000.0],
               "output_tokens": [arrivals * 100], "completed": [arrivals], "ttft_met": [arrivals],
               "tpot_met": [arrivals], "transfer_s": [0.02], "transfer_s_per_token": [0.02 / 6000],
               "decode_queue_s": [0.01], "window_s": [10.0],
               "completed:standard": [arrivals - 20], "ttft_met:standard": [arrivals - 20],
               "tpot_met:standard": [arrivals - 20],
               "completed:strict": [20.0], "ttft_met:strict": [20.0], "tpot_met:strict": [20.0],
               "completed:relaxed": [0.0], "ttft_met:relaxed": [0.0], "tpot_met:relaxed": [0.0]}
    prefill = {"computed_tokens": [300_000.0, 300_000.0], "busy_s": [9.0, 9.0], "prompt_tokens": [600_000.0, 600_000.0],
               "cached_tokens": [0.0, 0.0], "queued_tokens": [4000.0, 0.0]}
    decode = {"running": [30.0], "waiting": [0.0], "kv_usage": [0.1], "context_tokens": [30 * 6000.0],
              "step_s": [0.02], "steps": [400.0]}
    return dict([context("Ingress", 1, 1, ingress, now), context("PrefillWorker", 2, 2, prefill, now),
                 context("DecodeWorker", 2, 1, decode, now)])


def test_observation_from_the_contexts():
    named = {ctx.deployment_name: ctx for ctx in contexts().values()}
    obs = observation(named, now=50.0, window_s=10.0)
    assert (obs.prefill_replicas, obs.decode_replicas) == (2, 2)
    assert (obs.prefill_starting, obs.decode_starting) == (0, 1)
    assert obs.arrivals == 200 and obs.prompt_tokens == 1_200_000 and obs.window_s == 10.0
    assert obs.prefill_tokens_per_s == pytest.approx(600_000 / 18)
    assert obs.prefix_hit_rate == 0.0 and obs.prefill_queued_tokens == 4000.0
    (sample,) = obs.decode_samples
    assert (sample.sequences, sample.step_s) == (30.0, 0.02)
    assert obs.completed == obs.ttft_met == obs.tpot_met == 200
    assert obs.transfer_s == pytest.approx(0.02)
    assert obs.transfer_s_per_token == pytest.approx(0.02 / 6000)
    # Per SLO class; one with no finished request is left out.
    assert obs.classes == (ClassAttainment("standard", 180, 180, 180), ClassAttainment("strict", 20, 20, 20))


def test_policy_decides_both_pools_once_an_interval_and_publishes():
    redis = FakeRedis()
    policy = PlannerPolicy(PlannerSettings(enabled=True, interval_s=10.0, max_prefill=8).model_dump(), "tandem")
    policy._redis = redis
    policy.redis_url = "redis://fake"
    decisions, state = policy(contexts(now=50.0))
    by_name = {dep.name: n for dep, n in decisions.items()}
    assert by_name["Ingress"] == 1  # left where it is
    # 20 req/s of 6000-token prompts is ~120K tokens/s: more than 2 engines of ~33K.
    assert by_name["PrefillWorker"] > 2
    assert state == {}
    record = read_plan(redis, "tandem")
    assert record["plan"]["prefill"]["target"] == by_name["PrefillWorker"]
    assert record["observed"]["arrivals_per_s"] == pytest.approx(20.0)
    assert read_decisions(redis, "tandem")[("prefill", record["plan"]["prefill"]["reason"])] == 1
    # The ingress's /metrics explains the decision from these series alone.
    collector = PlannerMetricsCollector(None, "tandem")
    collector._client = redis
    samples = {(m.name, tuple(sorted(s.labels.items()))): s.value for m in collector.collect() for s in m.samples}
    assert samples[("tandem:planner_target_replicas", (("phase", "prefill"),))] == by_name["PrefillWorker"]
    assert samples[("tandem:planner_needed_replicas", (("phase", "prefill"),))] > 2
    assert samples[("tandem:planner_attainment", (("slo", "ttft"),))] == 1.0
    assert samples[("tandem:planner_class_attainment", (("slo", "tpot"), ("slo_class", "strict")))] == 1.0
    assert samples[("tandem:planner_attainment_used", (("slo", "ttft"),))] == 1.0
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert f'tandem:planner_decisions_total{{phase="prefill",reason="{record["plan"]["prefill"]["reason"]}"}} 1.0' in text
    # Within the interval the targets repeat, whatever the contexts say.
    again, _ = policy(contexts(now=55.0, arrivals=0.0, prompt=0.0))
    assert {dep.name: n for dep, n in again.items()} == by_name


def test_a_failing_planner_leaves_the_pools_as_they_are(monkeypatch):
    policy = PlannerPolicy(PlannerSettings(enabled=True).model_dump())

    def broken(*_):
        raise RuntimeError("bug")

    monkeypatch.setattr(policy.planner, "decide", broken)
    decisions, _ = policy(contexts())
    assert {dep.name: n for dep, n in decisions.items()} == {"Ingress": 1, "PrefillWorker": 2, "DecodeWorker": 2}


def test_colocated_apps_are_left_alone():
    dep, ctx = context("ColocatedWorker", 3, 3, {})
    decisions, _ = PlannerPolicy(PlannerSettings(enabled=True).model_dump())({dep: ctx})
    assert decisions == {dep: 3}


def test_windowed_sums_forget_old_seconds():
    clock = Clock()
    sums = WindowedSums(window_s=10, clock=clock)
    sums.add(a=1.0)
    clock.t += 5
    sums.add(a=2.0, b=1.0)
    assert sums.sums() == {"a": 3.0, "b": 1.0}
    clock.t += 6
    assert sums.sums() == {"a": 2.0, "b": 1.0}
    clock.t += 10
    assert sums.sums() == {}


class _Scheduler:
    def __init__(self, running: int, waiting: int = 0, usage: float = 0.0):
        self.num_running_reqs, self.num_waiting_reqs, self.kv_cache_usage = running, waiting, usage


class _Tokens:
    def __init__(self, computed: int, total: int, hit: int):
        self.computed, self.total, self.local_cache_hit = computed, total, hit


class _Finished:
    def __init__(self, prefill_time: float):
        self.prefill_time = prefill_time


class _Iteration:
    def __init__(self, computed=0, total=0, hit=0, itls=(), prefill_times=()):
        self.prompt_token_stats = _Tokens(computed, total, hit)
        self.inter_token_latencies_iter = list(itls)
        self.finished_requests = [_Finished(t) for t in prefill_times]


def test_engine_planner_stats():
    stats = EngineStats()
    stats.kv_capacity_tokens = 10_000
    # Two prompts prefilled together in one second: one second of engine time, not two.
    stats.record_iteration(_Scheduler(2, usage=0.5), _Iteration(computed=900, total=1000, hit=100, itls=[0.02, 0.04],
                                                               prefill_times=[1.0, 0.6]))
    stats.record_iteration(_Scheduler(0), _Iteration(prefill_times=[0.5]))  # within the same second
    out = stats.planner_stats()
    assert set(out) == set(PLANNER_STATS)
    assert all(isinstance(v, float) for v in out.values())
    assert out["prefill_tokens_per_s"] == pytest.approx(900, rel=0.05)
    assert out["cached_tokens"] == 100 and out["prompt_tokens"] == 1000
    assert out["step_s"] == pytest.approx(0.03) and out["running"] == 2
    assert out["context_tokens"] == pytest.approx(5000)


def test_workload_window():
    clock = Clock()
    window = WorkloadWindow(slo_ttft_s=1.0, slo_tpot_s=0.1, window_s=10, classes=("standard", "strict"), clock=clock)
    arrivals = [window.arrived(tokens * 100, "strict" if tokens <= 2 else "standard") for tokens in range(1, 11)]
    assert window.arrived(5, "unknown-class").slo_class is None  # counted, in no class
    window.finished(arrivals[0], 50, ttft_s=0.5, tpot_s=0.05, parts={"kv_transfer": 0.02, "decode_queue": 0.1})
    window.finished(arrivals[1], 50, ttft_s=1.5, tpot_s=0.05, parts={"kv_transfer": 0.10})
    window.finished(arrivals[2], 50, ttft_s=0.5, tpot_s=0.5)
    window.finished(arrivals[3], 0, ttft_s=None, tpot_s=None)  # failed before a token: a TTFT miss only
    out = window.stats()
    assert set(out) == set(window.keys()) == set(WORKLOAD_STATS) | {
        f"{stat}:{c}" for stat in ("completed", "ttft_met", "tpot_met") for c in ("standard", "strict")}
    assert out["arrivals"] == 11 and out["prompt_tokens"] == 5505
    assert out["prompt_tokens_p90"] == pytest.approx(900)  # of 5, 100, 200, ..., 1000
    assert (out["completed"], out["ttft_met"], out["tpot_met"]) == (4, 2, 3)
    assert (out["completed:strict"], out["ttft_met:strict"], out["tpot_met:strict"]) == (2, 1, 2)
    assert (out["completed:standard"], out["ttft_met:standard"], out["tpot_met:standard"]) == (2, 1, 1)
    assert out["transfer_s"] == pytest.approx(0.06)
    # Seconds per prompt token over the handoffs: (0.02 + 0.10) / (100 + 200) tokens.
    assert out["transfer_s_per_token"] == pytest.approx(0.12 / 300)
    clock.t += 11
    assert window.stats()["arrivals"] == 0 and window.stats()["prompt_tokens_p90"] == 0


def test_app_wiring_under_the_planner():
    settings = TandemSettings(planner={"enabled": True, "min_prefill": 1, "max_prefill": 3, "min_decode": 2,
                                       "max_decode": 4, "max_total": 6}, decode={"replicas": 1})
    assert app_module.planner_on(settings)
    config = app_module.planner_autoscaling(settings, "decode")
    assert config == {"min_replicas": 2, "max_replicas": 4, "initial_replicas": 2, "upscale_delay_s": 0.0,
                      "downscale_delay_s": 0.0, "look_back_period_s": 15.0}
    policy = app_module.planner_policy(settings)
    assert policy["policy_function"] == "control_plane.planner.serve_policy:PlannerPolicy"
    built = serve_policy.PlannerPolicy(**policy["policy_kwargs"])
    assert built.settings == settings.planner
    with pytest.raises(ValueError, match="disaggregated"):
        TandemSettings(mode="colocated", planner={"enabled": True})
    with pytest.raises(ValueError, match="autoscaling"):
        TandemSettings(planner={"enabled": True}, decode={"autoscaling": {"max_replicas": 2}})


def test_kv_empty_counts_the_null_block_as_free():
    stats = EngineStats()
    stats.kv_cache_usage = 0.0
    assert stats.kv_empty()
    stats.kv_blocks, stats.kv_cache_usage = 100, 0.01  # the null block only
    assert stats.kv_empty()
    stats.kv_cache_usage = 0.03  # a request's two blocks
    assert not stats.kv_empty()


def test_a_config_deploy_carries_no_secret(tmp_path, monkeypatch):
    """Serve shows a config's args: the KV secret, API keys and a Redis password stay out;
    the builder gets them back from the YAML and the KV secret file of `tandem up`."""
    from control_plane.settings import load_settings

    config = tmp_path / "tandem.yaml"
    config.write_text("auth: {api_keys: [sk-test-0123456789abcdef]}\nredis_url: redis://:pw@127.0.0.1:6390/0\n"
                      "planner: {enabled: true}\n")
    settings = app_module.with_kv_secret(load_settings(config), "k" * 32)
    args = app_module.config_deploy_args(settings)
    text = repr(args)
    assert "k" * 32 not in text and "sk-test" not in text and ":pw@" not in text
    assert args["config"] == str(config)
    assert app_module.planner_policy(settings)["policy_kwargs"]["redis_url"] == ""
    rebuilt = load_settings(args.pop("config"), **args)
    assert rebuilt.auth.api_keys == settings.auth.api_keys and rebuilt.redis_url == settings.redis_url
    monkeypatch.setattr("control_plane.paths.run_dir", lambda: tmp_path)
    (tmp_path / app_module.KV_SECRET_FILE).write_text("s" * 32)
    assert app_module.local_kv_secret() == "s" * 32
