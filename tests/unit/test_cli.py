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
