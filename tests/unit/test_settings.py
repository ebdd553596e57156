from __future__ import annotations

import pytest
from pydantic import ValidationError

from control_plane.settings import dump_yaml, load_settings, settings_from_dict


def test_defaults_are_the_embedded_default(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("TANDEM_"):
            monkeypatch.delenv(key)
    settings = load_settings()
    assert settings.mode == "disaggregated"
    assert settings.prefill.replicas == 1 and settings.decode.replicas == 1
    assert settings.model.served_name == "smollm2-135m-instruct"
    assert settings.kv_connector.name == "TandemConnector"
    assert settings.url == "http://127.0.0.1:8000"
    assert settings.engine_count() == 2


def test_priority_overrides_then_env_then_yaml(tmp_path, monkeypatch):
    config = tmp_path / "tandem.yaml"
    config.write_text("port: 9000\ndecode:\n  replicas: 3\n  num_cpus: 2\nprefill:\n  replicas: 2\n")
    monkeypatch.setenv("TANDEM_PORT", "9100")
    monkeypatch.setenv("TANDEM_PREFILL__REPLICAS", "4")
    settings = load_settings(config, decode={"replicas": 5})
    assert settings.port == 9100  # env beats the file
    assert settings.prefill.replicas == 4  # nested env beats the file
    assert settings.decode.replicas == 5  # explicit override beats everything...
    assert settings.decode.num_cpus == 2  # ...without wiping the file's other fields
    assert settings.config_file == str(config)


def test_config_file_from_env(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("mode: colocated\n")
    monkeypatch.setenv("TANDEM_CONFIG", str(config))
    settings = load_settings()
    assert settings.mode == "colocated" and settings.roles() == ["colocated"]


def test_typos_and_bad_values_fail_loudly(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("decode:\n  replica: 2\n")
    with pytest.raises(ValidationError, match="replica"):
        load_settings(config)
    with pytest.raises(ValidationError):
        load_settings(None, port=70000)
    with pytest.raises(ValidationError, match="at least one prefill"):
        load_settings(None, prefill={"replicas": 0})
    with pytest.raises(ValidationError):
        load_settings(None, host="not-an-ip")
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")


def test_round_trip_for_ray_actors_and_yaml():
    settings = load_settings(None, decode={"replicas": 2}, kv_connector={"extra_config": {"a": 1}})
    again = settings_from_dict(settings.model_dump(mode="json"))
    assert again == settings
    assert "replicas: 2" in dump_yaml(settings)


def test_sampling_defaults_greedy_only_for_the_bundled_model():
    assert load_settings().model.effective_sampling_defaults() == {"temperature": 0.0}
    own = load_settings(None, model={"path": "org/model"})
    assert own.model.effective_sampling_defaults() == {}
    chosen = load_settings(None, model={"sampling_defaults": {"temperature": 0.7}})
    assert chosen.model.effective_sampling_defaults() == {"temperature": 0.7}
