# Tandem's image: the same install script the README's `make run` uses, on a Debian
# bookworm base with Python 3.11.
#
#   make image                                   # docker or podman, whichever exists
#   make image BASE_IMAGE=localhost/tandem-base:bookworm   # a base built from Debian's
#                                                          # packages (scripts/debian-base.sh)
#   make image EXTRAS=gpu,nixl BASE_IMAGE=<a CUDA 12 image with Python 3.11>   # GPU variant
#
# BASE_IMAGE: any Debian bookworm image (python:3.11-slim-bookworm by default; a plain
# debootstrap of bookworm works too: its python3 is 3.11). EXTRAS: `cpu,nixl` builds vLLM's
# CPU backend; `gpu,nixl` vLLM's CUDA build (on a CUDA base image). BAKE_MODEL=1 prepares the
# bundled model at build time; with 0, mount a model and set TANDEM_MODEL__PATH (README).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG EXTRAS=cpu,nixl
ARG BAKE_MODEL=1
# Where pip looks, for builds behind a mirror (as the install script honours them).
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TANDEM_CACHE_DIR=/var/cache/tandem \
    PATH=/opt/tandem/.venv/bin:$PATH

# Python 3.11 with venv if the base has none (a debootstrap base), what vLLM's CPU backend and
# Ray load at run time (libnuma, libgomp), and ps/ip for `tandem status` and debugging.
RUN apt-get update \
 && if ! command -v python3.11 >/dev/null; then \
      apt-get install -y --no-install-recommends python3 python3-venv python3-dev; \
    fi \
 && apt-get install -y --no-install-recommends ca-certificates libnuma1 libgomp1 procps iproute2 curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tandem
# What the install needs first (its layer is reused while only the code changes)...
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
# ...then the code (see .dockerignore: no tests, benchmarks, results or local venvs).
COPY control_plane/ control_plane/
COPY workers/ workers/
COPY routing/ routing/
COPY kv_transport/ kv_transport/
COPY loadtest/ loadtest/
# Wheels in .image-wheels/ (scripts/image.sh fills it from PIP_FIND_LINKS, e.g. PyTorch's
# CPU wheel) come first; an extra CA bundle for pip arrives as the build secret `pip_cert`
# (a TLS-inspecting proxy). Neither stays in the image.
RUN --mount=type=bind,source=.image-wheels,target=/tmp/wheels \
    --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && PIP_FIND_LINKS=/tmp/wheels PYTHON=python3.11 VENV=/opt/tandem/.venv EXTRAS=${EXTRAS} bash scripts/install.sh \
 && if [ "${BAKE_MODEL}" = "1" ]; then tandem model prepare; fi \
 && find /opt/tandem/.venv -name '__pycache__' -prune -exec rm -rf {} + \
 && rm -rf /root/.cache \
 && echo 'export PATH=/opt/tandem/.venv/bin:$PATH' > /etc/profile.d/tandem.sh
# (KubeRay 1.3, and later ones with ENABLE_LOGIN_SHELL, start Ray in a login shell, whose
# /etc/profile resets PATH: profile.d puts the venv back in front.)

EXPOSE 8000
# The Serve app on all interfaces; set API keys (TANDEM_AUTH__API_KEYS='["tk-..."]') or pass
# --allow-unauthenticated. `docker stop` drains and stops (SIGTERM -> tandem down).
ENTRYPOINT ["tandem"]
CMD ["up", "--host", "0.0.0.0", "--block"]
