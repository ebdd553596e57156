"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from control_plane import redis_server


@pytest.fixture()
def redis_url(tmp_path, monkeypatch):
    """A real embedded Redis of its own (data in the test's tmp dir), stopped afterwards."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    url = redis_server.start_embedded(port=6491)
    yield url
    redis_server.stop_embedded()
