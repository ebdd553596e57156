"""Give each CPU engine on a host its own cores.

vLLM's CPU backend pins its OpenMP threads ("auto" binds every engine to the same cores of
NUMA node 0), so two engines on one host would spin on the same cores and both slow to a
crawl. Engines on one host claim disjoint core sets through a small lease file guarded by a
file lock; a lease whose process died is reclaimed, so restarted replicas don't leak cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock


def _usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_cores(lease_dir: Path, threads: int, owner_pid: int | None = None, role: str | None = None) -> list[int]:
    """Claim ``threads`` cores for ``owner_pid`` (this process by default).

    Picks the least-claimed cores, so with more engines than cores the overlap is spread
    evenly instead of piling onto core 0; among those equally claimed, the ones no engine of
    the same ``role`` holds: a prefill engine (compute-bound) then shares with a decode
    engine (bound by memory and its step loop), not with another prefill engine it would
    only take turns with.
    """
    owner_pid = owner_pid or os.getpid()
    cores = _usable_cores()
    threads = max(1, min(threads, len(cores)))
    lease_dir.mkdir(parents=True, exist_ok=True)
    lease_file = lease_dir / "cpu-leases.json"
    with FileLock(str(lease_file) + ".lock"):
        leases: dict[str, Any] = {}
        if lease_file.exists():
            try:
                leases = json.loads(lease_file.read_text())
            except ValueError:
                leases = {}
        leases = {pid: held for pid, held in leases.items() if _alive(int(pid))}
        claimed_count = {core: 0 for core in cores}
        same_role = {core: 0 for core in cores}
        for held in leases.values():
            # A lease is {"cores": [...], "role": ...}; older ones are a bare list of cores.
            held_cores, held_role = (held, None) if isinstance(held, list) else (held.get("cores", []), held.get("role"))
            for core in held_cores:
                if core in claimed_count:
                    claimed_count[core] += 1
                    same_role[core] += int(role is not None and held_role == role)
        chosen = sorted(cores, key=lambda core: (claimed_count[core], same_role[core], core))[:threads]
        chosen.sort()
        leases[str(owner_pid)] = {"cores": chosen, "role": role}
        lease_file.write_text(json.dumps(leases))
    return chosen


def release_cores(lease_dir: Path, owner_pid: int | None = None) -> None:
    owner_pid = owner_pid or os.getpid()
    lease_file = lease_dir / "cpu-leases.json"
    if not lease_file.exists():
        return
    with FileLock(str(lease_file) + ".lock"):
        try:
            leases = json.loads(lease_file.read_text())
        except ValueError:
            leases = {}
        leases.pop(str(owner_pid), None)
        lease_file.write_text(json.dumps(leases))


def default_threads(engines_on_host: int) -> int:
    return max(1, len(_usable_cores()) // max(1, engines_on_host))


def omp_bind_value(cores: list[int]) -> str:
    """vLLM's VLLM_CPU_OMP_THREADS_BIND syntax: a comma-separated core list."""
    return ",".join(str(core) for core in cores)
