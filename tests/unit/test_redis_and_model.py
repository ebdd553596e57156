from __future__ import annotations

import redis

from control_plane import model, redis_server


def test_embedded_redis_starts_serves_and_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    url = redis_server.start_embedded(port=6490)
    try:
        assert url.startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert redis_server.start_embedded() == url  # reused, not started twice
        assert client.config_get("bind")["bind"] == "127.0.0.1"  # loopback only
    finally:
        assert redis_server.stop_embedded() is True
    assert not redis_server.ping(url)
    assert redis_server.stop_embedded() is False


def test_model_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert model.resolve_model(str(folder)) == str(folder.resolve())
    assert model.resolve_model("org/some-hub-model") == "org/some-hub-model"
    try:
        model.resolve_model(None)
        raise AssertionError("an unprepared default model must not resolve")
    except model.ModelPreparationError as exc:
        assert "tandem model prepare" in str(exc)


def test_bundled_gguf_is_installed():
    assert model.bundled_gguf_path().stat().st_size > 50_000_000


def test_printed_redis_urls_hide_the_password():
    from control_plane.redis_server import redacted

    assert redacted("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted("rediss://user:s3cret@host/1") == "rediss://user:***@host/1"
    assert redacted("redis://:s3cret@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    assert redacted("redis://127.0.0.1:6390/0") == "redis://127.0.0.1:6390/0"
    assert redacted(None) is None
