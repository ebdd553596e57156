"""The connector's side of KV compression: which profile a transfer uses, and how a
request's blocks go through the codecs (`kv_transport.codecs`) on the way out and back
into the paged cache on the way in."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import torch

from kv_transport import codecs
from kv_transport.decisions import DecisionCache
from kv_transport.layout import KVLayout
from kv_transport.wire import BufferInfo, CodecSpec

log = logging.getLogger(__name__)

IDENTITY = "identity"
# The codecs quantise floating-point caches; an fp8 cache travels as it is.
CODEC_DTYPES = {"bfloat16", "float16", "float32"}
_LAYER_NUMBER = re.compile(r"layers?\.(\d+)(?:\.|$)")


def layer_indices(layout: KVLayout) -> list[int]:
    """The model's layer number of each of the layout's layers (sorted by name, so
    `layers.10` comes before `layers.2`); they seed rotations and per-layer overrides."""
    return [layer_number(layout, position) for position in range(len(layout.layers))]


def layer_number(layout: KVLayout, position: int) -> int:
    """The model's layer number of the layout's `position`-th layer."""
    match = _LAYER_NUMBER.search(layout.layers[position].name)
    return int(match.group(1)) if match else position


def codec_layout(layout: KVLayout) -> str | None:
    """The codecs' name for this cache layout, or None if they can't read it."""
    if layout.dtype not in CODEC_DTYPES:
        return None
    parts = layout.layers[0].parts
    if len(parts) == 1 and layout.device.type == "cpu" and parts[0].dim() == 4:
        # The block interior is the attention kernel's own; the codecs know the one its
        # vec and vec16 ISAs write (K dim-major, V token-major), not AMX's.
        if _cpu_attention_isa(parts[0].dtype, layout.block_size, parts[0].shape[-1] // 2) not in ("vec", "vec16"):
            return None
        return codecs.LayoutKind.CPU.value  # [blocks, H, N, 2D]
    if len(parts) == 2 and parts[0].dim() == 4:
        return codecs.LayoutKind.FLASH.value  # K, V: [blocks, N, H, D]
    return None


def _cpu_attention_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return _get_attn_isa(dtype, block_size, head_size)
    except Exception:  # noqa: BLE001 - unknown vLLM build: don't guess the layout
        return "unknown"


def head_dim(layout: KVLayout, kind: str) -> int:
    part = layout.layers[0].parts[0]
    return part.shape[-1] // 2 if kind == codecs.LayoutKind.CPU.value else part.shape[-1]


class CodecChooser:
    """Per transfer: off → identity; static → one profile; adaptive → the controller's
    decision for the link and the request's SLO class (identity until there is one)."""

    def __init__(
        self,
        mode: str,
        static_profile: str = IDENTITY,
        redis_url: str | None = None,
        app_name: str = "tandem",
        cache_s: float = 2.0,
    ):
        self.mode = mode
        self.static_profile = static_profile
        self.decisions = DecisionCache(redis_url, app_name, static_profile, cache_s) if mode == "adaptive" else None
        self._specs: dict[tuple[str, int], codecs.Profile] = {}

    def choose(self, link: str, slo_class: str) -> codecs.Profile | None:
        if self.mode == "off":
            return None
        if self.decisions is None:
            return self._resolve(self.static_profile, None)
        decision = self.decisions.decision(link, slo_class)
        if decision is None:
            return self._resolve(self.static_profile, None)
        return self._resolve(str(decision["profile"]), decision.get("spec"))

    def pinned(self, name: str) -> codecs.Profile | None:
        """A built-in profile a request asked for by name (identity if unknown)."""
        return self._resolve(name, None)

    def _resolve(self, name: str, spec: dict[str, Any] | None) -> codecs.Profile | None:
        if name == IDENTITY:
            return None
        try:
            if spec is not None:
                key = (name, int(spec.get("version", 1)))
                if key not in self._specs:
                    self._specs[key] = codecs.Profile.from_dict(spec)
                return self._specs[key]
            return codecs.get_profile(name)
        except (codecs.CodecError, KeyError, ValueError, TypeError) as exc:
            log.warning("unknown compression profile %r (%s): sending uncompressed", name, exc)
            return None

    def close(self) -> None:
        if self.decisions is not None:
            self.decisions.close()


def encode_blocks(
    profile: codecs.Profile, layout: KVLayout, block_ids: list[int], num_tokens: int
) -> tuple[Iterator[memoryview], list[BufferInfo], CodecSpec]:
    """One encoded blob per layer of the given blocks (holding ``num_tokens`` tokens), made
    lazily: a layer is read from the cache and encoded when the sender asks for it, so the
    blocks must stay held until the iterator is done. The BufferInfos' sizes on the wire are
    known only then (a streamed frame)."""
    kind = codec_layout(layout)
    if kind is None or not profile.supports(head_dim(layout, kind)):
        raise codecs.CodecError(f"profile {profile.name} cannot encode this KV cache layout")
    index = torch.tensor(block_ids, dtype=torch.long, device=layout.device)
    numbers = layer_indices(layout)

    def encoded() -> Iterator[memoryview]:
        for layer, number in zip(layout.layers, numbers, strict=True):
            picked = [part.index_select(0, index) for part in layer.parts]
            blocks = picked[0] if kind == codecs.LayoutKind.CPU.value else torch.stack(picked)
            yield memoryview(codecs.encode_layer(profile, number, *codecs.blocks_to_kv(blocks, kind, num_tokens)))

    infos = [BufferInfo(layer.name, 0, layer.block_nbytes * len(block_ids), [len(block_ids)]) for layer in layout.layers]
    spec = CodecSpec(id=profile.name, params={"version": profile.version, "layout": kind})
    return encoded(), infos, spec


def decode_layer_into_blocks(
    layout: KVLayout, codec: CodecSpec, position: int, blob: memoryview, block_ids: list[int], start: int
) -> float:
    """One layer's blob (the layout's `position`-th layer) into its blocks at ``block_ids``:
    decoded blocks [start, start + len(block_ids)). Returns the decode time."""
    kind = codec_layout(layout)
    if kind is None or codec.params.get("layout") != kind:
        raise codecs.CodecError(f"cannot decode {codec.params.get('layout')!r} KV into this cache")
    started = time.perf_counter()
    layer = layout.layers[position]
    [blocks] = codecs.decode_request(
        [blob], kind, layout.block_size, layer.parts[0].dtype, layout.device, [layer_number(layout, position)]
    )
    stop = start + len(block_ids)
    if (blocks.shape[0] if kind == codecs.LayoutKind.CPU.value else blocks.shape[1]) < stop:
        raise codecs.CodecError("decoded fewer blocks than the transfer announced")
    index = torch.tensor(block_ids, dtype=torch.long, device=layout.device)
    if kind == codecs.LayoutKind.CPU.value:
        layer.parts[0].index_copy_(0, index, blocks[start:stop].to(layer.parts[0].dtype))
    else:
        for part, half in zip(layer.parts, blocks, strict=True):
            part.index_copy_(0, index, half[start:stop].to(part.dtype))
    return time.perf_counter() - started
