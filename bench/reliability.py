"""Reliability run on a real local stack: a Locust soak above capacity, then faults injected
under a steady client load, each request's fate counted.

1. Soak: Locust (loadtest/, streaming shared-prefix chats) with more users than the engines
   can serve, for several minutes, against a stack with a tight admission limit. Every
   request must end in success, 429 or 503: no other 5xx, no hang. The ingress replica's RSS
   is sampled throughout (it must stay flat).
2. Faults, one after another, while a few clients stream requests back to back: hostile
   traffic first (a stranger at a prefill worker's KV port: 300 idle connections, forged,
   unauthenticated, NaN-deadline and non-object requests; batched completions prompts and
   8 MiB bodies of tiny messages at the ingress), then a decode replica killed mid-stream, prefill replica killed, Redis stopped and restarted,
   and finally `tandem down` (drain: in-flight requests finish, new ones get 503).
   Per fault: requests sent from the fault until recovery (+5 s), how many succeeded, were
   shed (429/503), failed cleanly (an OpenAI error, e.g. the SSE error event of a stream
   whose decode replica died) or were lost (no answer, a hang, a stream cut without an
   error or [DONE]: must be 0), and the time until requests succeed again.

Writes bench/results/reliability.{json,csv,png}. Needs the machine to itself (it starts
and stops its own stack with `tandem up` / `tandem down`).

    python -m bench.reliability [--soak-s 300] [--soak-users 48]
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import typer

from bench import fault_injection as faults

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TANDEM = str(Path(sys.executable).parent / "tandem")
MODEL = "smollm2-135m-instruct"
APP = "tandem"
ACCEPTED = "ok"
SHED = "shed"  # 429 / 503 with Retry-After
FAILED = "failed"  # an OpenAI-shaped error, e.g. the SSE error event of a cut stream
REFUSED = "refused"  # never accepted: the connection refused, or the route already gone
LOST = "lost"  # accepted, then no answer: a hang, a dropped connection, a silent cut
FATES = (ACCEPTED, SHED, FAILED, REFUSED, LOST)


# ---- a steady client load whose every request is classified -----------------------------


@dataclass
class Outcome:
    started: float
    ended: float
    status: int
    fate: str  # ok | shed | failed | lost
    detail: str = ""


async def _one_stream(client: httpx.AsyncClient, url: str, index: int) -> Outcome:
    body = {"model": MODEL, "stream": True, "max_tokens": 32, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Request {index}: describe a harbour at dawn."}]}
    started = time.monotonic()
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code in (429, 503):
                await response.aread()
                return Outcome(started, time.monotonic(), response.status_code, SHED)
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                if '"error"' in text:
                    return Outcome(started, time.monotonic(), response.status_code, FAILED, text[:200])
                # Serve's proxy once the app is deleted: the request was never taken.
                fate = REFUSED if response.status_code == 404 else LOST
                return Outcome(started, time.monotonic(), response.status_code, fate, text[:200])
            last = ""
            errored = False
            async for line in response.aiter_lines():
                if line:
                    last = line
                    errored = errored or line.startswith('data: {"error"')
            if last != "data: [DONE]":
                return Outcome(started, time.monotonic(), 200, LOST, f"stream cut after {last[:80]!r}")
            return Outcome(started, time.monotonic(), 200, FAILED if errored else ACCEPTED)
    except httpx.ConnectError as exc:
        return Outcome(started, time.monotonic(), 0, REFUSED, f"{type(exc).__name__}: {exc}"[:200])
    except (httpx.HTTPError, OSError) as exc:
        return Outcome(started, time.monotonic(), 0, LOST, f"{type(exc).__name__}: {exc}"[:200])


class SteadyLoad:
    """``clients`` loops sending streaming requests back to back, in a thread of its own."""

    def __init__(self, url: str, clients: int = 3):
        self.url = url
        self.clients = clients
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as client:
            counter = iter(range(10**9))

            async def loop() -> None:
                while not self._stop.is_set():
                    outcome = await _one_stream(client, self.url, next(counter))
                    self.outcomes.append(outcome)
                    if outcome.fate != ACCEPTED:
                        await asyncio.sleep(0.5)  # as a client honouring Retry-After would

            await asyncio.gather(*(loop() for _ in range(self.clients)))

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=180)

    def window(self, start: float, end: float) -> list[Outcome]:
        """Requests in flight at ``start`` or sent until ``end``."""
        return [o for o in self.outcomes if o.ended >= start and o.started <= end]

    def first_success_after(self, moment: float, timeout_s: float = 300) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for outcome in list(self.outcomes):
                if outcome.started >= moment and outcome.fate == ACCEPTED:
                    return outcome.ended - moment
            time.sleep(0.5)
        raise TimeoutError("no request succeeded after the fault")


def _counts(outcomes: list[Outcome]) -> dict[str, int]:
    counts = {"sent": len(outcomes)}
    for fate in FATES:
        counts[fate] = sum(o.fate == fate for o in outcomes)
    return counts


# ---- the stack ----------------------------------------------------------------------------


def _env(port: int) -> dict[str, str]:
    # Tight admission, so the soak's overload is shed at the door instead of queued.
    return {**os.environ, "TANDEM_PORT": str(port), "TANDEM_ADMISSION__MAX_IN_FLIGHT": "8",
            "TANDEM_ADMISSION__MAX_PREDICTED_TTFT_S": "10", "TANDEM_ROUTING__DRAIN_GRACE_S": "60"}


def _start_stack(port: int) -> None:
    from control_plane.cli import local_ray_running

    if local_ray_running():
        raise SystemExit("a local Ray cluster is running: stop it (`tandem down`) first")
    done = subprocess.run([TANDEM, "up"], env=_env(port), cwd=ROOT, capture_output=True, text=True, timeout=1500)
    if done.returncode != 0:
        raise SystemExit(f"tandem up failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _ingress_rss_bytes(app: str = APP) -> int | None:
    out = subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        rss, _, args = line.strip().partition(" ")
        if f"ServeReplica:{app}:Ingress" in args:
            return int(rss) * 1024
    return None


# ---- phases -------------------------------------------------------------------------------


def soak(url: str, duration_s: float, users: int, out_dir: Path) -> dict[str, Any]:
    from loadtest.cli import run_loadtest
    from loadtest.report import read_records_csv

    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        started = time.monotonic()
        while not stop.is_set():
            rss = _ingress_rss_bytes()
            if rss is not None:
                samples.append((time.monotonic() - started, rss))
            stop.wait(5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = run_loadtest(url, workload="shared-prefix", shape="steady", duration_s=duration_s, users=users,
                               out_dir=out_dir, max_tokens=32,
                               extra_args=("--think-time", "0.2", "--request-timeout", "180"))
    finally:
        stop.set()
        sampler.join()
    records = read_records_csv(out_dir / "requests.csv")
    by_status: dict[str, int] = {}
    for record in records:
        by_status[str(record.status)] = by_status.get(str(record.status), 0) + 1
    ok = sum(r.ok for r in records)
    shed = sum(r.status in (429, 503) for r in records)
    hangs = sum(r.status == 0 for r in records)
    other_5xx = sum(r.status >= 500 and r.status != 503 for r in records)
    failed = len(records) - ok - shed
    rss = [value for _, value in samples]
    quarter = max(1, len(rss) // 4)
    return {
        "duration_s": duration_s, "users": users, "requests": len(records), "succeeded": ok, "shed": shed,
        "failed": failed, "other_5xx": other_5xx, "hangs": hangs, "by_status": by_status,
        "errors": summary.get("errors", {}),
        "ingress_rss_mib": [(round(t, 1), round(v / 2**20, 1)) for t, v in samples],
        # Flat memory: the last quarter's median against the first quarter's.
        "rss_growth_ratio": (sorted(rss[-quarter:])[quarter // 2] / sorted(rss[:quarter])[quarter // 2]) if rss else None,
    }


# ---- hostile traffic under the steady load ------------------------------------------------


def _kv_small(magic: bytes, body: bytes) -> bytes:
    return magic + len(body).to_bytes(4, "little") + body


def _kv_exchange(address: tuple[str, int], data: bytes) -> str:
    """What a KV listener does with ``data`` from a stranger: the error code it answers,
    or "closed"."""
    import socket

    try:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(data)
            prefix = sock.recv(8, socket.MSG_WAITALL)
            if len(prefix) < 8:
                return "closed"
            reply = json.loads(sock.recv(int.from_bytes(prefix[4:], "little"), socket.MSG_WAITALL))
            return str(reply.get("code") or reply)
    except (OSError, ValueError) as exc:
        return f"closed ({type(exc).__name__})"


def kv_port_attack(address: tuple[str, int], idle: int = 300, hold_s: float = 15.0) -> dict[str, Any]:
    """A stranger at a prefill worker's KV port: hundreds of idle connections, then requests
    that are forged, replayed, not objects, or carry NaN deadlines."""
    import socket
    from collections import Counter

    from kv_transport.transport.control import ControlRequest

    opened: list[socket.socket] = []
    refused = 0
    for _ in range(idle):
        try:
            opened.append(socket.create_connection(address, timeout=5))
        except OSError:
            refused += 1
    signed_elsewhere = ControlRequest(op="pull", transfer_id="0" * 32).fields()
    bodies = {
        "nan wait": json.dumps({**signed_elsewhere, "wait_s": float("nan")}).encode(),
        "no mac": json.dumps(signed_elsewhere).encode(),
        "forged mac": json.dumps({**signed_elsewhere, "auth": "00" * 32}).encode(),
        "not an object": b"[1, 2, 3]",
        "not json": b"\xff" * 64,
    }
    answers: Counter[str] = Counter()
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        for name, body in bodies.items():
            answers[f"{name}: {_kv_exchange(address, _kv_small(b'TKVQ', body))}"] += 1
        time.sleep(0.5)
    cut_off = 0
    for sock in opened:
        try:
            sock.settimeout(0.1)
            cut_off += sock.recv(1) == b""
        except OSError:
            cut_off += 1
        sock.close()
    return {"idle_connections": idle, "refused_at_connect": refused, "idle_cut_off": cut_off,
            "answers": dict(answers)}


async def _post(url: str, path: str, body: Any, content: bytes | None = None) -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=300) as client:
        if content is not None:
            response = await client.post(f"{url}{path}", content=content, headers={"content-type": "application/json"})
        else:
            response = await client.post(f"{url}{path}", json=body)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, response.text[:200]


def front_door_attack(url: str, rounds: int = 6) -> dict[str, Any]:
    """Batched prompts (one prefill and transfer each) and 8 MiB bodies of tiny messages,
    each checked for its answer."""
    from collections import Counter

    prompts = [f"My favourite thing in the whole world is the {thing}. My favourite thing is"
               for thing in ("stone", "apple", "river", "cloud", "piano", "tiger", "lemon", "comet")]
    tiny = b'{"role":"user","content":"a"},'
    count = (8 << 20) // len(tiny) - 8
    huge = b'{"model":"' + MODEL.encode() + b'","messages":[' + tiny * count + b'{"role":"user","content":"a"}]}'
    results: Counter[str] = Counter()

    async def run() -> None:
        for _ in range(rounds):
            status, body = await _post(url, "/v1/completions", {"model": MODEL, "prompt": prompts, "max_tokens": 8,
                                                                "temperature": 0})
            good = status == 200 and [c["index"] for c in body.get("choices", [])] == list(range(len(prompts)))
            results[f"batch of 8 prompts: {'ok' if good else status}"] += 1
            status, body = await _post(url, "/v1/chat/completions", None, content=huge)
            shaped = isinstance(body, dict) and "error" in body
            results[f"8 MiB body of {count} messages: {status}{'' if shaped else ' (not OpenAI-shaped)'}"] += 1

    asyncio.run(run())
    return dict(results)


def hostile_runs(url: str, load: SteadyLoad, record: Any) -> None:
    from control_plane.redis_server import embedded_url
    from control_plane.state import list_workers

    prefill = [w for w in list_workers(embedded_url(), APP) if w.get("role") == "prefill" and w.get("kv_listener")]
    if prefill:
        listener = prefill[0]["kv_listener"]
        injected = time.monotonic()
        attack = kv_port_attack((listener["host"], int(listener["port"])))
        record("KV port: 300 idle strangers, forged/NaN requests", injected, time.monotonic() - injected,
               json.dumps(attack, separators=(",", ":")))
    injected = time.monotonic()
    attack = front_door_attack(url)
    record("batched prompts and 8 MiB bodies", injected, time.monotonic() - injected,
           json.dumps(attack, separators=(",", ":")))


def fault_runs(url: str, port: int) -> list[dict[str, Any]]:
    import ray

    from control_plane.redis_server import embedded_url
    from control_plane.state import list_workers

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    results: list[dict[str, Any]] = []
    with SteadyLoad(url) as load:
        time.sleep(20)  # a steady state first

        def record(name: str, injected: float, recover_s: float, note: str = "") -> None:
            window = load.window(injected, injected + recover_s + 5)
            results.append({"fault": name, **_counts(window), "recover_s": round(recover_s, 1), "note": note})
            print(f"{name}: {results[-1]}", flush=True)

        # Hostile traffic first: the steady load must not lose a request to it.
        hostile_runs(url, load, record)

        for name, deployment in (("decode replica killed", "DecodeWorker"), ("prefill replica killed", "PrefillWorker")):
            time.sleep(2)  # streams are in flight (the load never pauses)
            injected = time.monotonic()
            killed = faults.kill_replica(APP, deployment)
            recover_s = load.first_success_after(injected)
            faults.wait_replaced(APP, deployment, killed, timeout_s=600)
            replaced_s = time.monotonic() - injected
            time.sleep(10)
            record(name, injected, recover_s, f"replacement replica serving after {replaced_s:.0f}s")

        redis_url = embedded_url()
        injected = time.monotonic()
        port_redis = faults.stop_redis()
        time.sleep(20)
        served_while_down = sum(o.fate == ACCEPTED for o in load.window(injected, time.monotonic()))
        restarted = time.time()
        faults.start_redis(port_redis)
        back_by = time.monotonic() + 120  # workers heartbeat every 5 s
        while not any(w.get("heartbeat_at", 0) > restarted for w in list_workers(redis_url, APP)):
            if time.monotonic() > back_by:
                raise TimeoutError("no worker state back in Redis 120 s after its restart")
            time.sleep(0.5)
        record("Redis stopped for 20 s", injected, time.monotonic() - injected,
               f"{served_while_down} requests succeeded while Redis was down; recover = worker state back in Redis")

        # Last: drain and stop the whole stack under load.
        ray.shutdown()
        injected = time.monotonic()
        down = subprocess.run([TANDEM, "down"], env=_env(port), cwd=ROOT, capture_output=True, text=True, timeout=600)
        stopped_s = time.monotonic() - injected
        accepted_before = [o for o in load.outcomes if o.started < injected and o.ended >= injected]
        window = [o for o in load.outcomes if injected <= o.started <= injected + stopped_s]
        during = _counts(window)
        results.append({
            "fault": "tandem down (drain)", **during,
            "in_flight_at_drain": len(accepted_before),
            "in_flight_finished": sum(o.fate == ACCEPTED for o in accepted_before),
            "lost": during[LOST] + sum(o.fate == LOST for o in accepted_before),
            "recover_s": None,
            "note": f"stopped in {stopped_s:.0f}s; rc={down.returncode}",
        })
        print(f"drain: {results[-1]}", flush=True)
    return results


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss_ax, fault_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = report["soak"]["ingress_rss_mib"]
    rss_ax.plot([t for t, _ in series], [v for _, v in series], marker=".")
    rss_ax.set(title=f"Ingress RSS during the soak ({report['soak']['users']} users)", xlabel="s",
               ylabel="MiB", ylim=(0, max([v for _, v in series] or [1]) * 1.3))
    names = [f["fault"] for f in report["faults"]]
    bottom = [0] * len(names)
    for fate, colour in ((ACCEPTED, "tab:green"), (SHED, "tab:orange"), (FAILED, "tab:blue"), (REFUSED, "tab:gray"),
                         (LOST, "tab:red")):
        values = [f[fate] for f in report["faults"]]
        fault_ax.barh(names, values, left=bottom, color=colour, label=fate)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    fault_ax.set(title="Requests sent from each fault until recovery", xlabel="requests")
    fault_ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(
    soak_s: float = typer.Option(300, help="Seconds of soak."),
    soak_users: int = typer.Option(48, help="Locust users in the soak (well above capacity here)."),
    port: int = typer.Option(8124, help="Port of the stack this run starts."),
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    _start_stack(port)
    try:
        soak_report = soak(url, soak_s, soak_users, RESULTS / "reliability-soak")
        print(f"soak: { {k: v for k, v in soak_report.items() if k != 'ingress_rss_mib'} }", flush=True)
        fault_report = fault_runs(url, port)
    finally:
        subprocess.run([TANDEM, "down", "--grace", "5"], env=_env(port), cwd=ROOT, capture_output=True, timeout=600)
    from bench.common import machine

    report = {"machine": machine(), "setup": "SmolLM2-135M on vLLM CPU, 1 prefill + 1 decode",
              "admission": {"max_in_flight": 8, "max_predicted_ttft_s": 10},
              "soak": soak_report, "faults": fault_report}
    (RESULTS / "reliability.json").write_text(json.dumps(report, indent=2))
    with (RESULTS / "reliability.csv").open("w", newline="") as f:
        columns = ["fault", "sent", *FATES, "recover_s", "note"]
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerow({"fault": f"soak {soak_s:.0f}s x {soak_users} users", "sent": soak_report["requests"],
                         ACCEPTED: soak_report["succeeded"], SHED: soak_report["shed"], FAILED: soak_report["failed"],
                         REFUSED: 0, LOST: soak_report["hangs"], "recover_s": "",
                         "note": f"other 5xx {soak_report['other_5xx']}; ingress RSS " + (
                             f"x{soak_report['rss_growth_ratio']:.2f}" if soak_report["rss_growth_ratio"] else "not found")})
        for row in fault_report:
            writer.writerow(row)
    _plot(report, RESULTS / "reliability.png")
    print(f"wrote {RESULTS / 'reliability.json'}, .csv, .png")


if __name__ == "__main__":
    typer.run(main)

