"""Where Tandem keeps its local state (prepared models, Redis data, pid files)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$TANDEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/tandem``, else ``~/.cache/tandem``."""
    explicit = os.environ.get("TANDEM_CACHE_DIR")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "tandem"
    root.mkdir(parents=True, exist_ok=True)
    return root


def run_dir() -> Path:
    """Pid files and logs of the services `tandem up` started."""
    path = cache_dir() / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path
