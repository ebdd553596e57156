"""The container image's recipe stays in step with the project (the image itself is built
and run with `make image` where docker or podman exists: README, "Container image")."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_every_package_is_copied_into_the_image():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {name.rstrip("*") for name in include}
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", DOCKERFILE, flags=re.M))
    assert packages <= copied, f"not copied into the image: {packages - copied}"


def test_the_image_installs_with_the_readme_install_script():
    assert "bash scripts/install.sh" in DOCKERFILE
    assert re.search(r"^COPY scripts/ scripts/$", DOCKERFILE, flags=re.M)
    # The model is prepared at build time unless BAKE_MODEL=0 (then mounted).
    assert "tandem model prepare" in DOCKERFILE


def test_the_build_context_leaves_out_local_state():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests", "bench"} <= ignored
    # The install step bind-mounts .image-wheels from the context: it must not be ignored.
    assert not any(entry.startswith(".image-wheels") for entry in ignored)
    assert (ROOT / ".image-wheels").is_dir()


def test_the_container_serves_in_the_foreground_and_stops_on_sigterm():
    assert 'ENTRYPOINT ["tandem"]' in DOCKERFILE
    assert 'CMD ["up", "--host", "0.0.0.0", "--block"]' in DOCKERFILE


def test_the_base_image_is_an_argument_without_a_registry_host():
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, flags=re.M)
    assert match and "/" not in match.group(1).split(":")[0], match
    assert "FROM ${BASE_IMAGE}" in DOCKERFILE
