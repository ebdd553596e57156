"""The profile library: what the offline profiler measured of each compression profile on
one model × hardware, as JSON on disk and in Redis.

    {"model": ..., "hardware": ..., "created_at": ...,
     "profiles": [{"name": ..., "profile": {...codec profile...}, "ratio": ...,
                   "encode_bytes_per_s": ..., "decode_bytes_per_s": ..., "fixed_s": ...,
                   "quality_loss": ..., "pareto": true, ...}, ...]}
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from control_plane.controller.policy import ProfileCost
from control_plane.paths import cache_dir

log = logging.getLogger(__name__)


def library_key(model: str) -> str:
    return f"tandem:profiles:{model}"


def library_path(model: str) -> Path:
    return cache_dir() / "profiles" / f"{model}.json"


def costs_from_library(library: dict[str, Any], pareto_only: bool = True) -> list[ProfileCost]:
    costs = []
    for entry in library.get("profiles", []):
        if pareto_only and not entry.get("pareto", True):
            continue
        try:
            costs.append(
                ProfileCost(
                    name=str(entry["name"]),
                    ratio=float(entry["ratio"]),
                    encode_bytes_per_s=float(entry.get("encode_bytes_per_s", math.inf)),
                    decode_bytes_per_s=float(entry.get("decode_bytes_per_s", math.inf)),
                    fixed_s=float(entry.get("fixed_s", 0.0)),
                    quality_loss=float(entry.get("quality_loss", 0.0)),
                    # Libraries from before the flag: only identity is known lossless.
                    lossless=bool(entry.get("lossless", entry["name"] == "identity")),
                )
            )
        except (KeyError, TypeError, ValueError):
            log.warning("profile library: skipping malformed entry %r", entry.get("name"))
    return costs


def specs_from_library(library: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Profile name -> its full codec spec, so connectors can use profiles that are not
    built in (the controller ships the spec with its decision)."""
    return {
        str(entry["name"]): entry["profile"]
        for entry in library.get("profiles", [])
        if isinstance(entry.get("profile"), dict) and "name" in entry
    }


def read_library(model: str, explicit: str | None = None, redis_url: str | None = None) -> dict[str, Any] | None:
    """The library from an explicit file, else Redis, else the cache dir; None if none."""
    if explicit:
        return json.loads(Path(explicit).read_text())
    if redis_url:
        import redis

        try:
            raw = redis.Redis.from_url(redis_url, socket_timeout=2).get(library_key(model))
            if raw:
                return json.loads(raw)
        except (redis.RedisError, OSError, ValueError) as exc:
            log.warning("profile library: Redis unavailable (%s)", exc)
    path = library_path(model)
    if path.exists():
        return json.loads(path.read_text())
    return None


def store_library(library: dict[str, Any], model: str, redis_url: str | None = None) -> Path:
    path = library_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(library, indent=2))
    if redis_url:
        import redis

        redis.Redis.from_url(redis_url, socket_timeout=2).set(library_key(model), json.dumps(library))
    return path


def load_library(settings: Any) -> dict[str, Any]:
    """The library the controller chooses from for these settings (empty if none: then
    only identity, which the policy always adds)."""
    compression = settings.kv_connector.compression
    library = read_library(settings.model.served_name, compression.library, settings.redis_url)
    if library is None:
        log.warning(
            "no compression profile library for %s: adaptive compression can only choose "
            "'identity' until `tandem profile` has run",
            settings.model.served_name,
        )
        return {"profiles": []}
    return library
