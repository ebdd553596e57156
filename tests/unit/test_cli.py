from __future__ import annotations

from typer.testing import CliRunner

from control_plane.cli import app


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
