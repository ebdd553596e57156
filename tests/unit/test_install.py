"""The install recipe's promises: CPU torch, no CUDA torchvision next to it, clean imports."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_transformers_imports_cleanly_next_to_cpu_torch():
    code = "import torch, transformers; from transformers import AutoModelForCausalLM; print(torch.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "+cpu" in result.stdout


def test_cuda_media_packages_were_removed():
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} must be uninstalled"
