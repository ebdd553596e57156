from __future__ import annotations

import os
import subprocess
import sys

from workers import cpu_binding


def test_engines_get_disjoint_cores_then_spread_evenly(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_binding, "_usable_cores", lambda: [0, 1, 2, 3])
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    try:
        first = cpu_binding.claim_cores(tmp_path, 2, sleepers[0].pid)
        second = cpu_binding.claim_cores(tmp_path, 2, sleepers[1].pid)
        assert set(first).isdisjoint(second) and len(first) == len(second) == 2
        third = cpu_binding.claim_cores(tmp_path, 1, sleepers[2].pid)
        assert len(third) == 1
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()


def test_a_prefill_engine_shares_a_core_with_decode_rather_than_with_prefill(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_binding, "_usable_cores", lambda: [0, 1])
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(4)]
    try:
        assert cpu_binding.claim_cores(tmp_path, 1, sleepers[0].pid, role="prefill") == [0]
        assert cpu_binding.claim_cores(tmp_path, 1, sleepers[1].pid, role="decode") == [1]
        # Both cores are held once: the second prefill engine goes where decode is.
        assert cpu_binding.claim_cores(tmp_path, 1, sleepers[2].pid, role="prefill") == [1]
        # A second decode engine: core 0 has one prefill, core 1 one decode and one prefill.
        assert cpu_binding.claim_cores(tmp_path, 1, sleepers[3].pid, role="decode") == [0]
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()


def test_dead_owners_release_their_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_binding, "_usable_cores", lambda: [0, 1])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert cpu_binding.claim_cores(tmp_path, 1, dead.pid) == [0]
    # The owner is gone, so core 0 is free again for this process.
    assert cpu_binding.claim_cores(tmp_path, 1, os.getpid()) == [0]
    cpu_binding.release_cores(tmp_path, os.getpid())
    assert cpu_binding.claim_cores(tmp_path, 2, os.getpid()) == [0, 1]


def test_thread_count_and_bind_syntax(monkeypatch):
    monkeypatch.setattr(cpu_binding, "_usable_cores", lambda: list(range(8)))
    assert cpu_binding.default_threads(3) == 2
    assert cpu_binding.default_threads(20) == 1
    assert cpu_binding.omp_bind_value([2, 3]) == "2,3"
