"""API keys and per-key limits on a real (embedded) Redis, and the settings rules about when
keys are required."""

from __future__ import annotations

import time

import pytest

from control_plane import redis_server
from control_plane.settings import load_settings
from routing.auth import Authenticator, AuthError, KeyLimits, KeyStore, bearer_token, key_hash


class Clock:
    def __init__(self, now: float = 1_000_020.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_bearer_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_settings_keys_and_stored_keys(redis_url):
    store = KeyStore(redis_url, "app")
    stored, record = store.create("alice", KeyLimits())
    assert record.digest == key_hash(stored) and stored not in str(store.client.keys("*"))  # only the hash
    auth = Authenticator("app", redis_url, static_keys=["tk-from-secret"])
    assert auth.authenticate("Bearer tk-from-secret").name == "settings"
    assert auth.authenticate(f"Bearer {stored}").name == "alice"
    for bad in (None, "Bearer nope", "Basic x"):
        with pytest.raises(AuthError) as err:
            auth.authenticate(bad)
        assert err.value.status == 401


def test_the_kv_profile_permission_is_stored_with_the_key(redis_url):
    store = KeyStore(redis_url, "app")
    bench, _ = store.create("bench", KeyLimits(), may_pin_kv_profile=True)
    plain, _ = store.create("app", KeyLimits())
    auth = Authenticator("app", redis_url, static_keys=["tk-from-secret"])
    assert auth.authenticate(f"Bearer {bench}").may_pin_kv_profile
    assert not auth.authenticate(f"Bearer {plain}").may_pin_kv_profile
    assert not auth.authenticate("Bearer tk-from-secret").may_pin_kv_profile
    allowed = Authenticator("app", None, static_keys=["tk-from-secret"], static_keys_pin_kv_profile=True)
    assert allowed.authenticate("Bearer tk-from-secret").may_pin_kv_profile


def test_revoked_keys_stop_working_after_the_cache(redis_url):
    clock = Clock()
    store = KeyStore(redis_url, "app")
    key, _ = store.create("bob", KeyLimits())
    auth = Authenticator("app", redis_url, clock=clock)
    auth.authenticate(f"Bearer {key}")
    assert store.revoke("bob") == 1
    auth.authenticate(f"Bearer {key}")  # still cached
    clock.now += 11
    with pytest.raises(AuthError):
        auth.authenticate(f"Bearer {key}")


def test_requests_per_minute_then_a_new_window(redis_url):
    clock = Clock(60 * 1000 + 10)
    store = KeyStore(redis_url, "app")
    key, _ = store.create("carol", KeyLimits(requests_per_min=2))
    auth = Authenticator("app", redis_url, clock=clock)
    record = auth.authenticate(f"Bearer {key}")
    for _ in range(2):
        auth.admit(record)
        auth.release(record, 0)
    with pytest.raises(AuthError) as err:
        auth.admit(record)
    assert err.value.status == 429 and err.value.retry_after_s == 50
    clock.now += 60
    auth.admit(record)


def test_tokens_per_minute_and_concurrency(redis_url):
    clock = Clock()
    auth = Authenticator("app", redis_url, static_keys=["tk-k"],
                         default_limits=KeyLimits(tokens_per_min=100, max_concurrent=1), clock=clock)
    record = auth.authenticate("Bearer tk-k")
    auth.admit(record)
    with pytest.raises(AuthError, match="concurrent"):
        auth.admit(record)
    auth.release(record, 150)  # this request used more than the minute's budget
    with pytest.raises(AuthError, match="tokens per minute"):
        auth.admit(record)


def test_redis_down_keeps_validated_keys_and_follows_the_quota_setting(redis_url):
    store = KeyStore(redis_url, "app")
    key, _ = store.create("dave", KeyLimits(requests_per_min=100))
    fail_open = Authenticator("app", redis_url, quota_fail_open=True)
    fail_closed = Authenticator("app", redis_url, quota_fail_open=False)
    records = [a.authenticate(f"Bearer {key}") for a in (fail_open, fail_closed)]
    redis_server.stop_embedded()
    for a in (fail_open, fail_closed):
        a.clock = Clock(time.time() + 20)  # past the key cache, within the grace period
    assert fail_open.authenticate(f"Bearer {key}").name == "dave"
    fail_open.admit(records[0])  # quotas unchecked
    with pytest.raises(AuthError) as err:
        fail_closed.admit(records[1])
    assert err.value.status == 503
    with pytest.raises(AuthError) as unknown:
        fail_open.authenticate("Bearer tk-never-seen")
    assert unknown.value.status == 503  # cannot be checked: not a 401


def test_when_keys_are_required():
    assert not load_settings(None).auth_required  # loopback dev default
    assert load_settings(None, host="0.0.0.0").auth_required
    assert not load_settings(None, host="0.0.0.0", auth={"allow_unauthenticated": True}).auth_required
    assert load_settings(None, auth={"api_keys": ["tk-x"]}).auth_required
    assert load_settings(None, auth={"required": True}).auth_required
