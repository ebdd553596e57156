"""Settings are a leaf: every part of the product reads them, and they read nothing of the
product (no import cycles through them; the checks that need a part, such as the router
options, are made by that part)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("control_plane", "workers", "routing", "kv_transport", "loadtest")


def _imported(path: Path) -> set[str]:
    """The top-level packages a module imports, wherever in it (functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_settings_imports_nothing_of_the_product():
    imported = _imported(ROOT / "control_plane" / "settings.py")
    assert not imported & {*PRODUCT, "bench", "tests"}, sorted(imported)

