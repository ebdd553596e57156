"""The connector's compression path without vLLM: a request's blocks encoded from one paged
cache (vLLM's CPU layout) and decoded into other blocks of another, through the wire
format, with a prefix skip; and the profile choice per mode."""

from __future__ import annotations

import json

import pytest
import torch

from kv_transport import codecs
from kv_transport.compression import (
    CodecChooser,
    codec_layout,
    decode_layer_into_blocks,
    encode_blocks,
    layer_indices,
)
from kv_transport.layout import KVLayout
from kv_transport.transport.base import Publication, PullContext
from kv_transport.wire import TransferHeader, checksum, split_payload, verify

BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM, LAYERS = 12, 3, 16, 64, 4


def _cache(seed: int) -> KVLayout:
    generator = torch.Generator().manual_seed(seed)
    caches = {
        f"model.layers.{i}.self_attn.attn": torch.randn(
            BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM, generator=generator
        ).to(torch.bfloat16)
        for i in (0, 1, 2, 10)  # sorted by name: 0, 1, 10, 2
    }
    return KVLayout(caches, BLOCKS, BLOCK_SIZE, "model")


def _round_trip(profile_name: str, skip: int) -> tuple[KVLayout, KVLayout, list[int], list[int], int]:
    source, target = _cache(1), _cache(2)
    send_ids = [3, 7, 1, 9]  # a request of 4 blocks, the last one partial
    num_tokens = 3 * BLOCK_SIZE + 5
    carried = send_ids[skip:]
    blobs, infos, codec = encode_blocks(codecs.get_profile(profile_name), source, carried, num_tokens - skip * BLOCK_SIZE)
    streamed = TransferHeader("t", source.fingerprint, source.dtype, BLOCK_SIZE, num_tokens, len(carried),
                              infos, codec, first_block=skip, streamed=True)
    # Made whole, as a transport that cannot stream does: sizes and checksum filled in.
    header, blobs = Publication("t", lambda _ctx: (streamed, blobs), lambda *_: None).whole(PullContext())
    assert header.codec.params["encode_s"] > 0 and header.checksum == checksum(blobs)
    frame = header.encode()
    received = TransferHeader.decode(frame[8:])
    payload = b"".join(bytes(b) for b in blobs)
    verify(received, [payload])
    recv_ids = [0, 5, 11, 2][skip:]
    for position, blob in enumerate(split_payload(received, payload)):
        decode_layer_into_blocks(target, received.codec, position, blob, recv_ids, 0)
    return source, target, carried, recv_ids, num_tokens


def test_layers_are_numbered_by_the_model_not_by_name_order():
    assert layer_indices(_cache(0)) == [0, 1, 10, 2]
    assert codec_layout(_cache(0)) == "cpu"


def _tokens(layer, block_ids: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real tokens' K and V of a request's blocks (vLLM's CPU block interior)."""
    return codecs.blocks_to_kv(layer.parts[0][block_ids], "cpu", num_tokens)


def test_int8_round_trip_into_other_blocks_is_close():
    source, target, sent, received, num_tokens = _round_trip("int8-kivi", skip=0)
    for src_layer, dst_layer in zip(source.layers, target.layers, strict=True):
        for src, dst in zip(_tokens(src_layer, sent, num_tokens), _tokens(dst_layer, received, num_tokens), strict=True):
            error = (src.float() - dst.float()).norm() / src.float().norm()
            assert error < 0.02


def test_lossless_round_trip_with_a_prefix_skip_is_bit_exact():
    source, target, sent, received, num_tokens = _round_trip("zstd3", skip=2)
    carried_tokens = num_tokens - 2 * BLOCK_SIZE
    for src_layer, dst_layer in zip(source.layers, target.layers, strict=True):
        for src, dst in zip(_tokens(src_layer, sent, carried_tokens), _tokens(dst_layer, received, carried_tokens), strict=True):
            assert torch.equal(src, dst)


def test_a_corrupt_blob_raises_a_codec_error():
    source, target = _cache(1), _cache(2)
    blobs, infos, codec = encode_blocks(codecs.get_profile("int8-kivi"), source, [1, 2], 2 * BLOCK_SIZE)
    broken = bytearray(next(blobs))
    broken[5] ^= 0xFF
    with pytest.raises(codecs.CodecError):
        decode_layer_into_blocks(target, codec, 0, memoryview(broken), [0, 1], 0)


def test_profile_choice_per_mode(tmp_path, monkeypatch):
    assert CodecChooser("off").choose("a->b", "standard") is None
    assert CodecChooser("static", "int8-kivi").choose("a->b", "standard").name == "int8-kivi"
    assert CodecChooser("static", "no-such-profile").choose("a->b", "standard") is None
    # Adaptive with no decision (no Redis): the static fallback.
    assert CodecChooser("adaptive", "identity").choose("a->b", "standard") is None

    from control_plane import redis_server
    from kv_transport.decisions import decision_key

    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    url = redis_server.start_embedded(port=6494)
    try:
        import redis

        custom = codecs.get_profile("int4-kivi-g64").to_dict() | {"name": "custom-int4"}
        redis.Redis.from_url(url).set(
            decision_key("tandem", "a->b", "relaxed"), json.dumps({"profile": "custom-int4", "spec": custom})
        )
        chosen = CodecChooser("adaptive", "identity", url, "tandem", 0.0).choose("a->b", "relaxed")
        assert chosen is not None and chosen.name == "custom-int4"  # built from the shipped spec
    finally:
        redis_server.stop_embedded()
