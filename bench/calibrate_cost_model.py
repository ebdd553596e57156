"""Calibrate the cluster simulator's cost model from real vLLM iterations on this CPU.

Runs vLLM's engine in-process (no Ray, no server) with prefix caching off, and times each
engine step, one scheduler iteration, with the batch it ran known exactly:

* prefill iterations: single prompts of 16..4,096 tokens (longer ones are chunked by
  ``max_num_batched_tokens``) and a few mixed batches of several prompts;
* decode iterations: B sequences (1..64) at two context lengths, after their prefill.

It then fits

    prefill iteration = fixed + per_token * Σ new + attention * Σ new * (past + new / 2)
    decode iteration  = fixed + per_seq * B + per_context_token * Σ context

(``new * (past + new / 2)`` is the number of query-key pairs a chunk of ``new`` tokens
after ``past`` cached ones computes, so the attention term adds up exactly over chunks) by
least squares on relative error, and writes bench/cluster_sim/profiles/cpu_smollm2.json with
the coefficients, the fit quality and every sample.

    python -m bench.calibrate_cost_model [--threads-bind 1]   # ~4 min of engine time
    python -m bench.calibrate_cost_model --refit              # fit again, no vLLM

Uses one CPU thread (VLLM_CPU_OMP_THREADS_BIND); enforce_eager, since torch.compile does
not work with this CPU build. The machine is shared: before each measurement it waits until
its core is idle, and each iteration keeps the fastest of its repetitions.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console

console = Console()

PROFILE_PATH = Path(__file__).resolve().parent / "cluster_sim" / "profiles" / "cpu_smollm2.json"
PREFILL_LENGTHS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
# (prompts, tokens each): one iteration of several prompts, to check that costs add up.
MIXED_BATCHES = ((2, 512), (4, 256), (8, 128), (16, 64), (3, 600), (2, 1000))
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DECODE_CONTEXTS = (64, 512)
DECODE_STEPS = 16
PREFILL_KV_BYTES = 256 * 1024 * 1024
DECODE_KV_BYTES = 1024 * 1024 * 1024


def _bytes_per_token(config: dict[str, Any], dtype_bytes: int) -> int:
    """KV cache bytes of one token: keys and values of every layer's KV heads."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def _cores_busy_fraction(cores: list[int], window_s: float = 1.0) -> float:
    """Share of ``cores`` busy over ``window_s`` (this process is idle while it looks)."""

    def sample() -> tuple[int, int]:
        total = idle = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name = line.split(" ", 1)[0]
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                fields = [int(v) for v in line.split()[1:]]
                total += sum(fields)
                idle += fields[3] + fields[4]  # idle + iowait
        return total, idle

    total0, idle0 = sample()
    time.sleep(window_s)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(cores: list[int], threshold: float = 0.2, max_wait_s: float = 1800.0) -> float:
    """Waits until other processes leave our cores mostly idle, so that they do not
    inflate the timings (this machine is shared). Returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < max_wait_s:
        if _cores_busy_fraction(cores) < threshold:
            break
        time.sleep(3.0)
    return time.perf_counter() - started


class StepTimer:
    """Adds requests to an in-process LLMEngine and times every step until they finish."""

    def __init__(self, engine: Any, sampling_cls: Any, vocab: int, cores: list[int], seed: int = 0):
        self.engine = engine
        self.sampling_cls = sampling_cls
        self.vocab = vocab
        self.random = random.Random(seed)
        self.counter = 0
        self.waited_s = 0.0
        self.cores = cores

    def prompt(self, tokens: int) -> list[int]:
        # Random ids from the ordinary vocabulary (skip the first specials).
        return [self.random.randrange(100, self.vocab) for _ in range(tokens)]

    def run(self, prompt_lengths: list[int], max_tokens: int) -> list[dict[str, Any]]:
        """Steps of one group of requests: wall time, and per request (new tokens, past
        tokens, decoding) as far as it can be known from outputs."""
        self.waited_s += wait_for_quiet(self.cores)
        params = self.sampling_cls(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        ids = []
        for length in prompt_lengths:
            self.counter += 1
            rid = f"cal-{self.counter}"
            self.engine.add_request(rid, {"prompt_token_ids": self.prompt(length)}, params)
            ids.append(rid)
        generated = dict.fromkeys(ids, 0)
        steps = []
        while self.engine.has_unfinished_requests():
            started = time.perf_counter()
            outputs = self.engine.step()
            elapsed = time.perf_counter() - started
            before = dict(generated)
            for output in outputs:
                generated[output.request_id] = len(output.outputs[0].token_ids)
            steps.append({"seconds": elapsed, "before": before, "after": dict(generated)})
        return steps


def _prefill_samples(timer: StepTimer, chunk: int, reps: int) -> list[dict[str, Any]]:
    """One sample per prefill iteration: its chunks [(new, past)] and the fastest time over
    ``reps`` runs (contention from other processes only ever adds time)."""
    groups = [[length] for length in PREFILL_LENGTHS] + [[n] * count for count, n in MIXED_BATCHES]
    by_step: dict[tuple[int, int], dict[str, Any]] = {}
    for _ in range(reps):
        for index, lengths in enumerate(groups):
            steps = timer.run(lengths, max_tokens=1)
            # A group's prefill fills iterations of `chunk` tokens in order (FCFS).
            remaining = list(lengths)
            done = [0] * len(lengths)
            for step_index, step in enumerate(steps):
                budget = chunk
                chunks = []
                for i, left in enumerate(remaining):
                    take = min(left, budget)
                    if take > 0:
                        chunks.append((take, done[i]))
                        remaining[i] -= take
                        done[i] += take
                        budget -= take
                if not chunks:
                    break  # a bookkeeping step with no model work
                sample = by_step.setdefault(
                    (index, step_index), {"chunks": chunks, "lengths": lengths, "times": []}
                )
                sample["times"].append(step["seconds"])
            if any(remaining):
                raise RuntimeError(f"prefill of {lengths} took fewer steps than expected")
    return [{**s, "seconds": min(s["times"])} for s in by_step.values()]


def _decode_samples(timer: StepTimer, reps: int) -> list[dict[str, Any]]:
    """One sample per pure-decode iteration (every sequence already has its first token),
    fastest over ``reps`` runs of the same batch."""
    by_step: dict[tuple[int, int, int], dict[str, Any]] = {}
    for _ in range(reps):
        for context in DECODE_CONTEXTS:
            for batch in DECODE_BATCHES:
                steps = timer.run([context] * batch, max_tokens=DECODE_STEPS + 1)
                decode_index = 0
                for step in steps:
                    before, after = step["before"], step["after"]
                    if len(before) != batch or min(before.values()) < 1:
                        continue  # prefill or mixed iteration
                    if any(after[r] != before[r] + 1 for r in before):
                        continue
                    contexts = sum(context + before[r] for r in before)
                    sample = by_step.setdefault(
                        (context, batch, decode_index), {"batch": batch, "context_tokens": contexts, "times": []}
                    )
                    sample["times"].append(step["seconds"])
                    decode_index += 1
    return [{**s, "seconds": min(s["times"])} for s in by_step.values()]


def _fit(features: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Least squares on relative error (rows weighted by 1/seconds), so that the short
    iterations, which dominate a light load, fit as well as the long ones; R² is on the
    unweighted seconds."""
    weights = 1.0 / seconds
    coefficients, *_ = np.linalg.lstsq(features * weights[:, None], seconds * weights, rcond=None)
    predicted = features @ coefficients
    residual = seconds - predicted
    r2 = 1.0 - float(residual @ residual) / float(((seconds - seconds.mean()) ** 2).sum())
    return coefficients, r2, predicted


def main(
    model: str = typer.Option(None, help="Model folder; default: the bundled SmolLM2-135M."),
    threads_bind: str = typer.Option("0", help="vLLM's VLLM_CPU_OMP_THREADS_BIND: the one core to use."),
    max_num_batched_tokens: int = typer.Option(2048, help="vLLM's chunked-prefill token budget."),
    reps: int = typer.Option(3, help="Repetitions of the prefill grid."),
    out: Path = typer.Option(PROFILE_PATH, help="Profile JSON to write."),
    refit_only: bool = typer.Option(False, "--refit", help="Only fit again from the samples stored in --out."),
) -> None:
    if refit_only:
        refit(out)
        return
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: step() = one iteration
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from control_plane.model import resolve_model

    path = resolve_model(model)
    load_at_start = os.getloadavg()[0]
    if load_at_start > 1.5:
        console.print(f"[yellow]load average {load_at_start:.1f}: other processes will inflate the timings[/yellow]")
    from vllm import LLM, SamplingParams

    config = json.loads((Path(path) / "config.json").read_text())
    max_model_len = 4096 + 64
    started = time.perf_counter()
    llm = LLM(
        model=path,
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=max_model_len,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=128,
        kv_cache_memory_bytes=1536 * 1024 * 1024,
        seed=0,
    )
    console.print(f"engine up in {time.perf_counter() - started:.1f} s")
    engine = llm.llm_engine
    dtype_bytes = engine.model_config.dtype.itemsize
    kv_bytes = _bytes_per_token(config, dtype_bytes)
    cores = [int(c) for c in threads_bind.replace("-", ",").split(",") if c.strip().isdigit()]
    timer = StepTimer(engine, SamplingParams, vocab=config["vocab_size"], cores=cores)
    timer.run([256] * 4, max_tokens=8)  # warm-up (first iterations allocate)
    timer.run([2048], max_tokens=1)

    started = time.perf_counter()
    prefill = _prefill_samples(timer, max_num_batched_tokens, reps)
    console.print(f"{len(prefill)} prefill iterations in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    decode = _decode_samples(timer, reps=2)
    console.print(f"{len(decode)} decode iterations in {time.perf_counter() - started:.1f} s")

    info = {
        "model": config.get("_model_name_or_path", "SmolLM2-135M-Instruct"),
        "kv_bytes": kv_bytes,
        "dtype_bytes": dtype_bytes,
        "max_num_batched_tokens": max_num_batched_tokens,
        "load_average_at_start": load_at_start,
        "waited_for_quiet_s": round(timer.waited_s, 1),
        "when": time.strftime("%Y-%m-%d"),
        "vllm": _vllm_version(),
    }
    write_profile(prefill, decode, info, out)


def refit(out: Path) -> None:
    """Fits the model again from the samples stored in an existing profile."""
    old = json.loads(out.read_text())
    prefill = [{**s, "chunks": [tuple(c) for c in s["chunks"]]} for s in old["samples"]["prefill"]]
    decode = old["samples"]["decode"]
    write_profile(prefill, decode, old["measurement"], out)


def write_profile(prefill: list[dict[str, Any]], decode: list[dict[str, Any]], info: dict[str, Any], out: Path) -> None:
    max_num_batched_tokens = info["max_num_batched_tokens"]
    kv_bytes = info["kv_bytes"]
    prefill_x = np.array(
        [
            [1.0, sum(n for n, _ in s["chunks"]), sum(n * (p + n / 2) for n, p in s["chunks"])]
            for s in prefill
        ]
    )
    prefill_y = np.array([s["seconds"] for s in prefill])
    (p_fixed, p_token, p_attention), p_r2, p_pred = _fit(prefill_x, prefill_y)
    decode_x = np.array([[1.0, s["batch"], s["context_tokens"]] for s in decode])
    decode_y = np.array([s["seconds"] for s in decode])
    (d_fixed, d_seq, d_context), d_r2, d_pred = _fit(decode_x, decode_y)

    def rel_error(measured: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
        errors = np.abs(predicted - measured) / measured
        return {"median": float(np.median(errors)), "p90": float(np.quantile(errors, 0.9)), "max": float(errors.max())}

    # Whole-prompt prefill time per length (fastest rep), measured vs model.
    per_length = []
    for length in PREFILL_LENGTHS:
        rows = [i for i, s in enumerate(prefill) if s["lengths"] == [length]]
        per_length.append(
            {"prompt_tokens": length, "measured_s": float(prefill_y[rows].sum()), "model_s": float(p_pred[rows].sum())}
        )

    profile = {
        "name": "cpu_smollm2",
        "description": (
            "SmolLM2-135M-Instruct on vLLM's CPU backend (vllm-cpu, enforce_eager), one CPU thread; "
            "fitted by bench/calibrate_cost_model.py from timed engine iterations on this machine."
        ),
        "source": "measured here: bench/calibrate_cost_model.py",
        "model": info["model"],
        "hardware": f"1 thread of {os.cpu_count()}-core host ({_cpu_name()})",
        "prefill": {
            "fixed_s": float(p_fixed),
            "per_token_s": float(p_token),
            "attention_s": float(p_attention),
            "max_num_batched_tokens": max_num_batched_tokens,
        },
        "decode": {
            "fixed_s": float(d_fixed),
            "per_seq_s": float(d_seq),
            "per_context_token_s": float(d_context),
            "max_num_seqs": 128,
        },
        "kv": {
            "block_tokens": 16,
            "bytes_per_token": kv_bytes,
            # Prefill instance: prefix cache of Tandem's CPU default KV space (256 MiB).
            "cache_blocks": PREFILL_KV_BYTES // (16 * kv_bytes),
            # Decode instance: 1 GiB of KV for running sequences, so that decode is not what
            # limits the cluster (the routing of prefill is what is compared).
            "decode_kv_tokens": DECODE_KV_BYTES // kv_bytes,
        },
        # Localhost TCP between two CPU workers (Tandem's tcp transport, order of magnitude).
        "transfer": {"latency_s": 0.002, "bytes_per_s": 1.0e9},
        "fit": {
            "prefill_r2": p_r2,
            "prefill_relative_error": rel_error(prefill_y, p_pred),
            "prefill_samples": len(prefill),
            "decode_r2": d_r2,
            "decode_relative_error": rel_error(decode_y, d_pred),
            "decode_samples": len(decode),
            "prefill_by_length": per_length,
            "method": "least squares on relative error (rows weighted by 1/seconds)",
            "statistic": "fastest of the repetitions per iteration (contention only adds time)",
        },
        "measurement": info,
        "samples": {
            "prefill": [
                {"chunks": s["chunks"], "lengths": s["lengths"], "seconds": round(s["seconds"], 6)}
                for s in prefill
            ],
            "decode": [
                {"batch": s["batch"], "context_tokens": s["context_tokens"], "seconds": round(s["seconds"], 6)}
                for s in decode
            ],
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=2) + "\n")
    console.print(json.dumps({k: profile[k] for k in ("prefill", "decode", "kv")}, indent=2))
    console.print(json.dumps({k: v for k, v in profile["fit"].items() if k != "prefill_by_length"}, indent=2))
    for row in per_length:
        console.print(f"  {row['prompt_tokens']:>5} tokens: measured {row['measured_s']:.3f} s, model {row['model_s']:.3f} s")
    console.print(f"wrote {out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


if __name__ == "__main__":
    typer.run(main)
