#!/usr/bin/env bash
# Build Tandem's image with docker or podman, whichever exists (`make image`).
#   IMAGE=tandem:0.1.0 BASE_IMAGE=... EXTRAS=cpu,nixl BAKE_MODEL=1 bash scripts/image.sh
# CONTAINER_ENGINE=podman|docker picks one; with podman, CONTAINER_RUNTIME (default: runc
# when installed) is passed as --runtime: crun, Podman's default, fails on some VMs' cgroup
# setups where runc works.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-tandem:latest}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
EXTRAS=${EXTRAS:-cpu,nixl}
BAKE_MODEL=${BAKE_MODEL:-1}
# docker when its daemon answers (a docker CLI without one is common), else podman.
ENGINE=${CONTAINER_ENGINE:-$( (docker info >/dev/null 2>&1 && echo docker) || (command -v podman >/dev/null && echo podman) || true)}
if [ -z "$ENGINE" ]; then
  echo "no docker daemon and no podman: install one (Debian: apt-get install podman runc)" >&2
  exit 1
fi
args=(build -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "EXTRAS=$EXTRAS"
      --build-arg "BAKE_MODEL=$BAKE_MODEL" --network host)
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
  [ -n "${!var:-}" ] && args+=(--build-arg "$var=${!var}")
done
# Local wheel folders pip is pointed at (PIP_FIND_LINKS) go into the build context's
# .image-wheels/ (bind-mounted by the install step, never copied into the image).
mkdir -p .image-wheels
for dir in ${PIP_FIND_LINKS:-}; do
  [ -d "$dir" ] && cp -u "$dir"/*.whl .image-wheels/ 2>/dev/null || true
done
# An extra CA bundle for pip (PIP_CERT) reaches the install step as a build secret.
[ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ] && args+=(--secret "id=pip_cert,src=$PIP_CERT")
if [ "$(basename "$ENGINE")" = podman ]; then
  runtime=${CONTAINER_RUNTIME:-$(command -v runc >/dev/null && echo runc || true)}
  [ -n "$runtime" ] && args+=(--runtime "$runtime")
  # RUN steps get the host's limits, no higher (podman's defaults can exceed them).
  args+=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)")
fi
# The install step's mounts (a bind from the context, a secret) need BuildKit with docker.
export DOCKER_BUILDKIT=1
started=$(date +%s)
"$ENGINE" "${args[@]}" .
echo "built $IMAGE with $ENGINE in $(( $(date +%s) - started )) s"
"$ENGINE" image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "image size: %.2f GB\n", $1 / 1e9}'
