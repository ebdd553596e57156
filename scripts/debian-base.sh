#!/usr/bin/env bash
# A Debian bookworm base image made from Debian's packages, for machines that reach Debian's
# mirrors but no container registry: debootstrap a minimal bookworm, import it into podman
# (or docker). Its python3 is 3.11, which is what the Dockerfile needs.
#   sudo bash scripts/debian-base.sh [TAG]        # default localhost/tandem-base:bookworm
#   make image BASE_IMAGE=localhost/tandem-base:bookworm
set -euo pipefail
TAG=${1:-localhost/tandem-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-}
ENGINE=${CONTAINER_ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
command -v debootstrap >/dev/null || { echo "debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=ca-certificates bookworm "$root" ${MIRROR:+"$MIRROR"}
# apt in the image uses the same mirror; no caches, no logs.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*
tar -C "$root" -c . | "$ENGINE" import --change 'CMD ["/bin/bash"]' - "$TAG"
echo "imported $TAG"
