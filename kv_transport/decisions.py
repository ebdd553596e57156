"""Where the controller's per-link codec decisions live in Redis, and how connectors read
them: a short local cache in front of Redis, the last decision kept if Redis or the
controller goes away, the safe default if nothing was ever known. No Ray here: connectors
run inside vLLM worker processes."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


def decision_key(app_name: str, link: str, slo_class: str) -> str:
    return f"tandem:{app_name}:codec:{link}:{slo_class}"


class DecisionCache:
    """The profile to use on one link for one SLO class."""

    def __init__(
        self,
        redis_url: str | None,
        app_name: str,
        default_profile: str = "identity",
        cache_s: float = 2.0,
        timeout_s: float = 0.05,
    ) -> None:
        self.default_profile = default_profile
        self.app_name = app_name
        self.cache_s = cache_s
        self._client: Any = None
        if redis_url:
            import redis

            # A short timeout: a transfer must never wait on a slow Redis.
            self._client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._known: dict[tuple[str, str], tuple[dict[str, Any] | None, float]] = {}
        self._lock = threading.Lock()
        self._warned = False

    def profile(self, link: str, slo_class: str) -> str:
        decision = self.decision(link, slo_class)
        return str(decision.get("profile", self.default_profile)) if decision else self.default_profile

    def decision(self, link: str, slo_class: str) -> dict[str, Any] | None:
        """The controller's latest decision for the link and class (profile name, and the
        profile's full spec when it is not a built-in), or None if none is known."""
        key = (link, slo_class)
        now = time.monotonic()
        with self._lock:
            known = self._known.get(key)
        if known is not None and now - known[1] < self.cache_s:
            return known[0]
        fetched = self._fetch(link, slo_class)
        # Redis down or no decision yet: keep the last one (refreshing its age so a dead
        # Redis is not asked on every transfer).
        decision = fetched if fetched is not None else (known[0] if known is not None else None)
        with self._lock:
            self._known[key] = (decision, now)
        return decision

    def _fetch(self, link: str, slo_class: str) -> dict[str, Any] | None:
        if self._client is None:
            return None
        import redis

        try:
            raw = self._client.get(decision_key(self.app_name, link, slo_class))
            self._warned = False
        except (redis.RedisError, OSError) as exc:
            if not self._warned:
                log.warning("codec decisions: Redis unavailable (%s); keeping the last known", exc)
                self._warned = True
            return None
        if raw is None:
            return None
        try:
            decision = json.loads(raw)
        except ValueError:
            return None
        return decision if isinstance(decision, dict) and isinstance(decision.get("profile"), str) else None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
