from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from control_plane.cli import app, local_ray_running


def test_up_rejects_bad_settings_cleanly(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["up", "--mode", "bogus"])
    assert result.exit_code == 2
    assert "invalid settings" in result.output and "mode" in result.output
    result = runner.invoke(app, ["up", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "not found" in result.output
    # A router option its policy does not take (checked by routing, not by the settings).
    typo = tmp_path / "typo.yaml"
    typo.write_text("routing:\n  prefill_router: dualmap\n  prefill_router_options: {hot_raito: 3.0}\n")
    result = runner.invoke(app, ["up", "--config", str(typo)])
    assert result.exit_code == 2 and "invalid settings" in result.output and "hot_raito" in result.output


def test_status_without_a_running_stack(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 1 and "not running" in result.output


def test_drain_without_a_cluster_says_so(tmp_path):
    if local_ray_running():
        pytest.skip("a local Ray cluster is running")
    env = {**os.environ, "TANDEM_CACHE_DIR": str(tmp_path), "RAY_ADDRESS": ""}
    done = subprocess.run([str(Path(sys.executable).parent / "tandem"), "drain", "--grace", "1"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 1 and "no Ray cluster to drain" in done.stdout, done.stdout + done.stderr


def test_down_with_an_unreadable_config_still_tears_down(tmp_path, monkeypatch):
    """`tandem down` is what a broken setup needs most: a missing config file must not stop
    it before it clears what `tandem up` left."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "")
    state = tmp_path / "run.json"
    monkeypatch.setattr("control_plane.cli._state_path", lambda: state)
    monkeypatch.setattr("control_plane.cli.local_ray_running", lambda: False)
    state.write_text("{}")
    result = CliRunner().invoke(app, ["down", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 0, result.output
    assert "settings unreadable" in result.output
    assert not state.exists()


def test_every_disaggregated_app_gets_a_kv_secret(tmp_path, monkeypatch):
    """Tandem's KV port is never left unauthenticated: with no secret configured, the app
    builder makes one, and `tandem up` keeps one per machine (0600) and reuses it."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    from control_plane.app import with_kv_secret
    from control_plane.cli import _cluster_kv_secret
    from control_plane.settings import load_settings

    bare = load_settings(None)
    assert bare.kv_connector.auth_secret is None
    made = with_kv_secret(bare).kv_connector.auth_secret
    assert made and len(made) >= 32 and made != with_kv_secret(bare).kv_connector.auth_secret
    configured = load_settings(None, kv_connector={"auth_secret": "s" * 20})
    assert with_kv_secret(configured).kv_connector.auth_secret == "s" * 20
    assert with_kv_secret(load_settings(None, mode="colocated")).kv_connector.auth_secret is None

    kept = _cluster_kv_secret()
    path = tmp_path / "run" / "kv-secret"
    assert path.read_text() == kept and (path.stat().st_mode & 0o777) == 0o600
    assert _cluster_kv_secret() == kept
    assert with_kv_secret(bare, kept).kv_connector.auth_secret == kept


def test_up_block_returns_on_sigterm_so_the_container_can_drain():
    import os
    import signal
    import threading

    from control_plane import cli

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        cli._block_until_signalled()  # returns instead of dying: `up --block` then runs `down`
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_scale_refuses_an_unknown_pool_or_size(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(app, ["scale", "encoder", "2"])
    assert result.exit_code == 2 and "unknown pool" in result.output
    assert runner.invoke(app, ["scale", "prefill", "0"]).exit_code == 2  # typer's bound: at least one
    result = runner.invoke(app, ["scale", "prefill", "2"])
    assert result.exit_code == 1 and "no app" in result.output


def test_only_fixed_size_apps_take_an_external_scaler():
    from control_plane.app import external_scaler_on
    from control_plane.settings import load_settings

    assert external_scaler_on(load_settings(None))
    assert external_scaler_on(load_settings(None, mode="colocated"))
    assert not external_scaler_on(load_settings(None, planner={"enabled": True}))
    autoscaled = {"autoscaling": {"min_replicas": 1, "max_replicas": 2}}
    assert not external_scaler_on(load_settings(None, decode=autoscaled))
    assert external_scaler_on(load_settings(None, mode="colocated", decode=autoscaled))
