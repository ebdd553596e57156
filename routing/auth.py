"""API keys and per-key limits for the OpenAI endpoint.

Keys are random bearer tokens; only their SHA-256 is ever stored (in Redis, created with
`tandem keys create`) or kept in memory (keys given in settings, e.g. from a Kubernetes
Secret). Limits per key: requests per minute and prompt+completion tokens per minute
(fixed one-minute windows in Redis, shared by every ingress replica) and concurrent
requests (counted in each ingress replica). If Redis is unreachable, keys validated in the
last minutes keep working and quotas follow `auth.quota_on_redis_failure`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("ray.serve")

KEY_PREFIX = "tk-"
# A validated key is trusted this long without asking Redis again; while Redis is down,
# this long after the last successful check.
KEY_CACHE_S = 10.0
KEY_GRACE_S = 300.0


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def redis_key(app_name: str, digest: str) -> str:
    return f"tandem:{app_name}:apikey:{digest}"


@dataclass
class KeyLimits:
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    max_concurrent: int | None = None


@dataclass
class KeyRecord:
    name: str
    digest: str
    limits: KeyLimits = field(default_factory=KeyLimits)
    created_at: float = field(default_factory=time.time)
    # May pin a request's KV compression profile (x-tandem-kv-profile), under
    # auth.kv_profile_pinning "permitted".
    may_pin_kv_profile: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> KeyRecord:
        data = json.loads(raw)
        return cls(
            name=str(data["name"]),
            digest=str(data["digest"]),
            limits=KeyLimits(**data.get("limits", {})),
            created_at=float(data.get("created_at", 0.0)),
            may_pin_kv_profile=bool(data.get("may_pin_kv_profile", False)),
        )


class AuthError(Exception):
    """Why a request is refused: status (401, 429, 503), message, retry_after_s."""

    def __init__(self, status: int, message: str, code: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after_s = retry_after_s


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class KeyStore:
    """Keys in Redis (sync client: the CLI uses it directly, the ingress in a thread)."""

    def __init__(self, redis_url: str, app_name: str):
        import redis

        self.client = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.app_name = app_name

    def create(self, name: str, limits: KeyLimits, may_pin_kv_profile: bool = False) -> tuple[str, KeyRecord]:
        key = new_key()
        record = KeyRecord(name=name, digest=key_hash(key), limits=limits, may_pin_kv_profile=may_pin_kv_profile)
        self.client.set(redis_key(self.app_name, record.digest), record.to_json())
        return key, record

    def get(self, digest: str) -> KeyRecord | None:
        raw = self.client.get(redis_key(self.app_name, digest))
        return KeyRecord.from_json(raw) if raw else None

    def list(self) -> list[KeyRecord]:
        records = []
        for name in self.client.scan_iter(match=redis_key(self.app_name, "*")):
            raw = self.client.get(name)
            if raw:
                records.append(KeyRecord.from_json(raw))
        return sorted(records, key=lambda r: r.created_at)

    def revoke(self, name_or_digest_prefix: str) -> int:
        """Revoke keys by name or by a prefix (≥ 8 hex chars) of their digest."""
        removed = 0
        for record in self.list():
            by_digest = len(name_or_digest_prefix) >= 8 and record.digest.startswith(name_or_digest_prefix)
            if record.name == name_or_digest_prefix or by_digest:
                removed += self.client.delete(redis_key(self.app_name, record.digest))
        return removed


class Authenticator:
    """The ingress's view: who is calling, and may they, right now."""

    def __init__(
        self,
        app_name: str,
        redis_url: str | None,
        static_keys: Iterable[str] = (),
        default_limits: KeyLimits | None = None,
        quota_fail_open: bool = True,
        clock: Any = time.time,
        static_keys_pin_kv_profile: bool = False,
    ):
        self.app_name = app_name
        self.redis_url = redis_url
        self.default_limits = default_limits or KeyLimits()
        self.static_digests = [key_hash(k) for k in static_keys]
        self.static_keys_pin_kv_profile = static_keys_pin_kv_profile
        self.quota_fail_open = quota_fail_open
        self.clock = clock
        self._store: KeyStore | None = KeyStore(redis_url, app_name) if redis_url else None
        # digest -> (record, checked_at)
        self._cache: dict[str, tuple[KeyRecord, float]] = {}
        self._concurrent: dict[str, int] = {}

    def authenticate(self, authorization: str | None) -> KeyRecord:
        token = bearer_token(authorization)
        if token is None:
            raise AuthError(401, "Missing API key: send `Authorization: Bearer <key>`.", "invalid_api_key")
        digest = key_hash(token)
        # Settings keys: compare against every one, without an early exit.
        matched = False
        for known in self.static_digests:
            matched |= hmac.compare_digest(digest, known)
        if matched:
            return KeyRecord(name="settings", digest=digest, limits=self.default_limits,
                             may_pin_kv_profile=self.static_keys_pin_kv_profile)
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[1] < KEY_CACHE_S:
            return cached[0]
        if self._store is None:
            raise AuthError(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            record = self._store.get(digest)
        except Exception as exc:  # noqa: BLE001 - Redis down
            if cached is not None and now - cached[1] < KEY_GRACE_S:
                return cached[0]
            log.warning("auth: cannot check an API key, Redis unavailable: %r", exc)
            raise AuthError(503, "The API key service is unavailable; retry shortly.", "service_unavailable", 5) from None
        if record is None:
            self._cache.pop(digest, None)
            raise AuthError(401, "Incorrect API key provided.", "invalid_api_key")
        if record.limits == KeyLimits():
            record.limits = self.default_limits
        self._cache[digest] = (record, now)
        return record

    # ---- limits ------------------------------------------------------------------------

    def _window(self) -> tuple[int, int]:
        now = self.clock()
        window = int(now // 60)
        return window, max(1, math.ceil((window + 1) * 60 - now))

    def admit(self, record: KeyRecord) -> None:
        """Count one request against the key's limits, or raise 429."""
        self.take_slot(record)
        try:
            self.check_quota(record)
        except AuthError:
            self.release_slot(record)
            raise

    def take_slot(self, record: KeyRecord) -> None:
        """The key's concurrency limit (in this process; call from one thread)."""
        limit = record.limits.max_concurrent
        if limit is not None and self._concurrent.get(record.digest, 0) >= limit:
            raise AuthError(429, f"Too many concurrent requests for this key (limit {limit}).",
                            "rate_limit_exceeded", 1)
        self._concurrent[record.digest] = self._concurrent.get(record.digest, 0) + 1

    def check_quota(self, record: KeyRecord) -> None:
        """Count the request in the key's per-minute windows (Redis), or raise 429."""
        limits = record.limits
        if self._store is not None and (limits.requests_per_min or limits.tokens_per_min):
            window, retry = self._window()
            quota = f"tandem:{self.app_name}:quota:{record.digest}:{window}"
            try:
                pipe = self._store.client.pipeline()
                pipe.hincrby(quota, "requests", 1)
                pipe.hget(quota, "tokens")
                pipe.expire(quota, 120)
                requests, tokens, _ = pipe.execute()
            except Exception as exc:  # noqa: BLE001 - Redis down
                if self.quota_fail_open:
                    log.warning("auth: quotas unchecked, Redis unavailable: %r", exc)
                else:
                    raise AuthError(503, "The quota service is unavailable; retry shortly.", "service_unavailable", 5) from None
            else:
                if limits.requests_per_min is not None and int(requests) > limits.requests_per_min:
                    raise AuthError(429, f"Rate limit reached: {limits.requests_per_min} requests per minute.",
                                    "rate_limit_exceeded", retry)
                if limits.tokens_per_min is not None and int(tokens or 0) >= limits.tokens_per_min:
                    raise AuthError(429, f"Rate limit reached: {limits.tokens_per_min} tokens per minute.",
                                    "rate_limit_exceeded", retry)

    def release(self, record: KeyRecord, tokens: int) -> None:
        """The request ended: free its concurrency slot and charge its tokens."""
        self.release_slot(record)
        self.charge(record, tokens)

    def release_slot(self, record: KeyRecord) -> None:
        self._concurrent[record.digest] = max(0, self._concurrent.get(record.digest, 0) - 1)

    def charge(self, record: KeyRecord, tokens: int) -> None:
        if self._store is None or not record.limits.tokens_per_min or tokens <= 0:
            return
        window, _ = self._window()
        quota = f"tandem:{self.app_name}:quota:{record.digest}:{window}"
        try:
            pipe = self._store.client.pipeline()
            pipe.hincrby(quota, "tokens", tokens)
            pipe.expire(quota, 120)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - Redis down: this request goes uncharged
            log.warning("auth: could not charge %d tokens: %r", tokens, exc)


# The ingress replica's authenticator. The FastAPI app is pickled by value into the replica,
# so the middleware finds it through this module rather than through a closure.
_active: Authenticator | None = None


def install(authenticator: Authenticator | None, metrics_open: bool = True) -> None:
    """This replica's authenticator (None: keys off); ``metrics_open``: /metrics without a key."""
    global _active, _open_paths
    _active = authenticator
    _open_paths = OPEN_PATHS if metrics_open else ("/health",)


def active() -> Authenticator | None:
    return _active


# Paths anyone may reach: probes and scrapes carry no prompt data (/metrics needs a key too
# with auth.metrics_require_key).
OPEN_PATHS = ("/health", "/metrics")
_open_paths: tuple[str, ...] = OPEN_PATHS


class AuthMiddleware:
    """Pure ASGI (streaming responses and disconnects pass through untouched): checks the
    bearer key before the body is even parsed, as OpenAI answers 401 before 400."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        authenticator = _active
        if scope["type"] != "http" or authenticator is None or scope["path"].endswith(_open_paths):
            await self.app(scope, receive, send)
            return
        import asyncio

        from fastapi.responses import JSONResponse

        from routing import metrics
        from routing.errors import error_body

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            record = await asyncio.to_thread(authenticator.authenticate, headers.get("authorization"))
        except AuthError as exc:
            log.info("refused %s %s: %s", scope.get("method"), scope["path"], exc.message)
            metrics.count_request(scope["path"], exc.status)
            extra = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else {}
            response = JSONResponse(error_body(exc.status, exc.message, None, exc.code), exc.status, headers=extra)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = record
        await self.app(scope, receive, send)


def release_later(record: KeyRecord, tokens: int) -> None:
    """Release a key's slot and charge its tokens off the event loop (a Redis call)."""
    authenticator = _active
    if authenticator is None:
        return
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        authenticator.release(record, tokens)
        return
    # The slot frees at once; only a Redis charge (if the key has a token budget) runs in a
    # thread.
    authenticator.release_slot(record)
    if record.limits.tokens_per_min and tokens > 0:
        loop.run_in_executor(None, authenticator.charge, record, tokens)
