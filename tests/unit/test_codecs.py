"""The KV codec library: profiles, every stage, the blob format, layouts and error bounds.

Round trips run on random KV and on real KV of the default model (SmolLM2-135M, computed
once per session with transformers on CPU): bit-exact for lossless profiles, within the
profile's stated bound for lossy ones. Header fuzzing checks that corrupt, truncated or
forged blobs raise CodecError and nothing else.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import lz4.frame
import pytest
import torch
import zstandard

from kv_transport.codecs import (
    SEARCH_SPACE,
    CodecError,
    KVQuant,
    LayoutKind,
    LosslessSpec,
    Profile,
    QuantizeSpec,
    QuantSpec,
    TransformSpec,
    bitpack,
    blocks_from_bytes,
    blocks_to_kv,
    bound_ratio,
    container,
    decode_header,
    decode_layer,
    decode_request,
    encode_layer,
    encode_request,
    encoded_size_estimate,
    get_profile,
    iter_profiles,
    kv_quality,
    kv_to_blocks,
    list_profiles,
    lossless,
    profile_from_choices,
    profiles,
    register_profile,
)
from kv_transport.codecs.quantize import section_layout
from kv_transport.codecs.transform import fwht, fwht_butterfly, hadamard_signs
from kv_transport.layout import KVLayout

BUILTINS = [p.name for p in list_profiles()]
LOSSY = [p.name for p in list_profiles() if not p.is_lossless]


def random_kv(tokens: int = 300, heads: int = 3, head_dim: int = 64, dtype=torch.bfloat16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    k = torch.randn(tokens, heads, head_dim, generator=generator)
    k[:, :, 3] += 6.0  # a key channel outlier, as real keys have
    v = torch.randn(tokens, heads, head_dim, generator=generator) * 0.5
    return k.to(dtype), v.to(dtype)


@pytest.fixture(scope="session")
def real_kv() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k, v) [tokens, 3, 64] bf16 of the default model on a short prompt."""
    from control_plane.model import ModelPreparationError, resolve_model

    try:
        path = resolve_model(None)
    except ModelPreparationError as exc:
        pytest.fail(f"real-KV codec tests need the default model: {exc}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    # float32 weights: fast on any CPU; the KV is then rounded to bf16, the cache dtype.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = (
        "Disaggregated serving runs the prefill of a prompt on one engine and its decode on "
        "another, so the key/value cache must travel between them. Compressing it trades "
        "a little accuracy for bandwidth. " * 4
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, :200]
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    layers = []
    for layer in cache.layers:
        # [batch, kv_heads, tokens, head_dim] -> canonical [tokens, kv_heads, head_dim]
        k, v = (t[0].permute(1, 0, 2).to(torch.bfloat16).contiguous() for t in (layer.keys, layer.values))
        layers.append((k, v))
    assert len(layers) == 30 and layers[0][0].shape == (ids.shape[1], 3, 64)
    return layers


def roundtrip(profile: Profile, layer: int, k: torch.Tensor, v: torch.Tensor, **decode_kwargs):
    blob = encode_layer(profile, layer, k, v)
    k_hat, v_hat = decode_layer(blob, **decode_kwargs)
    return blob, k_hat, v_hat


def check_roundtrip(profile: Profile, layer: int, k: torch.Tensor, v: torch.Tensor) -> float:
    blob, k_hat, v_hat = roundtrip(profile, layer, k, v)
    assert k_hat.shape == k.shape and v_hat.shape == v.shape
    assert k_hat.dtype == k.dtype and v_hat.dtype == v.dtype
    if profile.is_lossless:
        assert torch.equal(k_hat.view(torch.uint8), k.view(torch.uint8))
        assert torch.equal(v_hat.view(torch.uint8), v.view(torch.uint8))
        return 0.0
    ratio = bound_ratio(profile, layer, k, v, k_hat, v_hat)
    assert ratio <= 1.0, f"{profile.name}: error {ratio:.3f}x its stated bound"
    return ratio


# -- profiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_profiles_serialise(name):
    profile = get_profile(name)
    assert profile.name == name and profile.version >= 1
    assert Profile.from_dict(profile.to_dict()) == profile
    assert Profile.from_json(profile.to_json()) == profile
    assert json.loads(profile.to_json())["name"] == name
    assert profile.stated_bound()["lossless"] == profile.is_lossless


def test_builtin_set_covers_the_issue():
    for name in ("identity", "fp8", "int8-kivi", "int4-kivi-g64", "int2-kivi-g32-recent128", "zstd3-byteplane"):
        get_profile(name)
    with pytest.raises(CodecError, match="unknown codec profile"):
        get_profile("int5-magic")


def test_stated_bounds():
    assert get_profile("int4-kivi-g64").stated_bound()["key"] == {
        "metric": "abs_error_over_group_range",
        "value": 0.5 / 15,
    }
    assert get_profile("fp8").stated_bound()["value"]["value"] == 2.0**-4
    assert get_profile("identity").stated_bound()["key"]["metric"] == "exact"
    assert "rotated" in get_profile("int4-hadamard-g64").stated_bound()["domain"]


@pytest.mark.parametrize(
    "data",
    [
        {"name": "x", "quantize": {"main": {"key": {"method": "minmax", "bits": 5}}}},
        {"name": "x", "quantize": {"main": {"key": {"method": "minmax", "bits": 4, "group_size": 48}}}},
        {"name": "x", "quantize": {"main": {"key": {"method": "fp8", "bits": 4}}}},
        {"name": "x", "transform": {"kind": "hadamard"}},  # nothing quantised to rotate
        {"name": "x", "lossless": {"codec": "none", "byteplane": True}},
        {"name": "x", "lossless": {"codec": "zstd", "level": 40}},
        {"name": "Bad Name"},
        {"name": "x", "version": 0},
        {"name": "x", "surprise": 1},
        {"version": 1},
    ],
)
def test_invalid_profiles_raise_codec_error(data):
    with pytest.raises(CodecError):
        Profile.from_dict(data)


def test_profile_json_errors():
    with pytest.raises(CodecError):
        Profile.from_json("{not json")
    with pytest.raises(CodecError):
        Profile.from_json("[1, 2]")


def test_register_profile_versions(monkeypatch):
    monkeypatch.setattr(profiles, "_REGISTRY", dict(profiles._REGISTRY))
    base = get_profile("int4-kivi-g64")
    assert register_profile(base) is base  # same name, version and parameters: a no-op
    changed = base.model_copy(update={"lossless": LosslessSpec(codec="zstd", level=1)})
    with pytest.raises(CodecError, match="bump the version"):
        register_profile(changed)
    bumped = changed.model_copy(update={"version": 2})
    assert register_profile(bumped) is bumped
    assert get_profile("int4-kivi-g64").version == 2


def test_search_space_points_are_valid_profiles():
    rng = random.Random(0)
    keys = list(SEARCH_SPACE)
    for _ in range(50):
        choices = {key: rng.choice(SEARCH_SPACE[key]) for key in keys}
        try:
            profile = profile_from_choices(choices)
        except CodecError:
            # The only invalid points: a rotation with nothing quantised, byteplane without a codec.
            assert (choices["lossless"] == "none" and choices["byteplane"]) or choices["transform"] != "none"
            continue
        assert Profile.from_json(profile.to_json()) == profile
        assert profile.name == profile.auto_name()
    with pytest.raises(CodecError, match="missing"):
        profile_from_choices({"transform": "none"})


def test_iter_profiles_yields_distinct_valid_profiles():
    small = {**SEARCH_SPACE, "key_quant": ("raw", "int4"), "value_quant": ("raw", "fp8"), "lossless": ("none", "zstd3")}
    found = list(iter_profiles(small))
    keys = {p.params_key for p in found}
    names = {p.name for p in found}
    assert len(keys) == len(found) == len(names)
    assert any(p.is_lossless for p in found) and any(p.transform.kind == "hadamard" for p in found)
    # The full space is lazy: its first points come at once.
    assert len(list(itertools.islice(iter_profiles(), 20))) == 20


# -- stages -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", bitpack.SUPPORTED_BITS)
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_bitpack_roundtrip(bits, count):
    codes = torch.randint(0, 1 << bits, (count,), dtype=torch.uint8, generator=torch.Generator().manual_seed(count))
    packed = bitpack.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == bitpack.packed_nbytes(count, bits)
    assert packed.numel() <= -(-count * bits // 8) + 3
    assert torch.equal(bitpack.unpack(packed, bits, count), codes)


def test_bitpack_layout_is_pinned():
    # The wire format: code i of a word at bit bits*i, little endian. Changing it breaks peers.
    assert bitpack.pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    assert bitpack.pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8), 3).tolist() == [0xD1, 0x58, 0x1F]
    assert bitpack.pack(torch.tensor([63, 0, 1, 32], dtype=torch.uint8), 6).tolist() == [0x3F, 0x10, 0x80]
    with pytest.raises(CodecError):
        bitpack.unpack(torch.zeros(5, dtype=torch.uint8), 3, 8)


def test_fwht_is_orthonormal_and_self_inverse():
    for head_dim in (1, 2, 8, 64, 128, 256):
        x = torch.randn(5, 3, head_dim, dtype=torch.float64).float()
        y = fwht(x)
        assert torch.allclose(fwht(y), x, atol=1e-5)
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
        assert torch.allclose(fwht_butterfly(x), y, atol=1e-5)
    # Against the dense Sylvester matrix.
    dense = torch.ones(1, 1)
    while dense.shape[0] < 16:
        dense = torch.cat((torch.cat((dense, dense), 1), torch.cat((dense, -dense), 1)), 0)
    x = torch.randn(4, 16)
    assert torch.allclose(fwht(x), x @ dense / 4, atol=1e-5)
    with pytest.raises(CodecError, match="power-of-two"):
        fwht(torch.randn(2, 48))


def test_hadamard_signs_are_deterministic_per_layer_and_head():
    a = hadamard_signs(0, 3, 4, 64)
    assert torch.equal(a, hadamard_signs(0, 3, 4, 64))
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, hadamard_signs(0, 4, 4, 64))  # another layer
    assert not torch.equal(a[0], a[1])  # another head
    assert not torch.equal(a, hadamard_signs(1, 3, 4, 64))  # another seed
    # A head's signs do not depend on how many heads the layer has.
    assert torch.equal(hadamard_signs(0, 3, 8, 64)[:4], a)
    # Pinned: encoder and decoder on different versions must agree.
    assert hadamard_signs(0, 0, 1, 8)[0].tolist() == PINNED_SIGNS


PINNED_SIGNS = [1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0]


@pytest.mark.parametrize("itemsize,dtype", [(2, torch.bfloat16), (2, torch.float16), (4, torch.float32)])
def test_byteplane_split(itemsize, dtype):
    raw = torch.randn(1001).to(dtype).view(torch.uint8)
    planes = lossless.split_planes(raw, itemsize)
    assert torch.equal(planes, raw.view(-1, itemsize).t().contiguous().view(-1))
    assert torch.equal(lossless.join_planes(planes, itemsize), raw)


@pytest.mark.parametrize("codec,level", [("lz4", 0), ("lz4", 9), ("zstd", 1), ("zstd", 3), ("zstd", -1)])
def test_lossless_roundtrip_and_bounds(codec, level):
    spec = LosslessSpec(codec=codec, level=level)
    data = bytes(range(256)) * 40
    packed = lossless.compress(spec, memoryview(data))
    assert bytes(lossless.decompress(spec, memoryview(packed), len(data))) == data
    with pytest.raises(CodecError, match="declares"):
        lossless.decompress(spec, memoryview(packed), len(data) + 1)
    with pytest.raises(CodecError):
        lossless.decompress(spec, memoryview(packed[: len(packed) // 2]), len(data))
    with pytest.raises(CodecError):
        lossless.decompress(spec, memoryview(b"\x00" * 32), len(data))


def test_decompression_never_trusts_the_frame_size():
    # A frame claiming a huge size is refused before allocating anything.
    huge = 1 << 40
    forged = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100)
    with pytest.raises(CodecError, match="declares"):
        lossless.decompress(LosslessSpec(codec="zstd", level=3), memoryview(forged), huge)
    frame = lz4.frame.compress(b"x" * 100, store_size=True)
    with pytest.raises(CodecError, match="declares"):
        lossless.decompress(LosslessSpec(codec="lz4"), memoryview(frame), huge)


# -- round trips on random KV: every stage combination ------------------------------------

QUANTISERS = [QuantSpec.fp8] + [lambda axis, group, b=b: QuantSpec.minmax(b, axis, group) for b in (8, 6, 4, 3, 2)]


@pytest.mark.parametrize("transform", ["none", "hadamard"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("make", QUANTISERS, ids=["fp8", "int8", "int6", "int4", "int3", "int2"])
def test_quantisers_stay_within_bound(make, axis, group, transform):
    spec = make(axis, group)
    profile = Profile(name="t", transform=TransformSpec(kind=transform, seed=7), quantize=QuantizeSpec(main=KVQuant(key=spec, value=spec)))
    k, v = random_kv(tokens=77, heads=2, head_dim=64, seed=group)  # 77: groups with a tail
    check_roundtrip(profile, 5, k, v)


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_builtin_roundtrip_random(name, dtype):
    k, v = random_kv(tokens=300, dtype=dtype, seed=1)
    check_roundtrip(get_profile(name), 2, k, v)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
@pytest.mark.parametrize("byteplane", [False, True])
def test_lossless_over_quantised_decodes_identically(codec, byteplane):
    base = get_profile("int4-kivi-g64")
    compressed = base.model_copy(update={"lossless": LosslessSpec(codec=codec, level=1, byteplane=byteplane)})
    k, v = random_kv(seed=3)
    _, k1, v1 = roundtrip(base, 0, k, v)
    _, k2, v2 = roundtrip(compressed, 0, k, v)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_transform_can_rotate_one_tensor():
    k, v = random_kv(seed=10)
    plain = get_profile("int4-kivi-g64")
    values_rotated = get_profile("int4-kivi-g64-hadamard-v")
    assert values_rotated.transform.tensors == "v"
    _, k1, v1 = roundtrip(plain, 4, k, v)
    _, k2, v2 = roundtrip(values_rotated, 4, k, v)
    assert torch.equal(k1, k2) and not torch.equal(v1, v2)
    # Rotating only tensors that stay raw is no pipeline at all.
    with pytest.raises(CodecError, match="no quantised tensor"):
        Profile.from_dict({"name": "x", "transform": {"kind": "hadamard", "tensors": "k"}, "quantize": {"main": {"value": {"method": "fp8"}}}})


def test_recent_tokens_and_first_layers():
    profile = get_profile("int2-kivi-g32-recent128-first2")
    k, v = random_kv(tokens=300, seed=4)
    header = decode_header(encode_layer(profile, 5, k, v))
    assert [(p.tensor, p.start, p.stop, p.quant.method) for p in header.parts] == [
        ("k", 0, 172, "minmax"),
        ("k", 172, 300, "none"),
        ("v", 0, 172, "minmax"),
        ("v", 172, 300, "none"),
    ]
    blob, k_hat, v_hat = roundtrip(profile, 5, k, v)
    assert torch.equal(k_hat[172:], k[172:]) and torch.equal(v_hat[172:], v[172:])  # recent: raw
    first = decode_header(encode_layer(profile, 1, k, v))
    assert [(p.start, p.stop, p.quant.bits) for p in first.parts] == [(0, 300, 8), (0, 300, 8)]
    check_roundtrip(profile, 1, k, v)
    # A request shorter than the window is all "recent".
    short_k, short_v = random_kv(tokens=50, seed=5)
    _, k_hat, v_hat = roundtrip(profile, 5, short_k, short_v)
    assert torch.equal(k_hat, short_k) and torch.equal(v_hat, short_v)


@pytest.mark.parametrize("name", ["identity", "zstd3-byteplane", "int4-kivi-g64", "int4-hadamard-g64", "int2-kivi-g32-recent128"])
@pytest.mark.parametrize("tokens", [0, 1, 31, 33])
def test_edge_token_counts(name, tokens):
    k, v = random_kv(tokens=tokens, seed=tokens)
    check_roundtrip(get_profile(name), 0, k, v)


def test_head_dims():
    k, v = random_kv(tokens=40, heads=2, head_dim=80)
    check_roundtrip(get_profile("int4-kivi-g64"), 0, k, v)  # not a power of two: fine
    with pytest.raises(CodecError, match="power-of-two"):
        encode_layer(get_profile("int4-hadamard-g64"), 0, k, v)
    k, v = random_kv(tokens=40, heads=8, head_dim=128)
    check_roundtrip(get_profile("int4-hadamard-g64"), 0, k, v)


def test_different_k_and_v_head_dims():
    k, _ = random_kv(tokens=20, head_dim=64)
    _, v = random_kv(tokens=20, head_dim=32)
    check_roundtrip(get_profile("int4-kivi-g64"), 0, k, v)


def test_non_finite_values():
    k, v = random_kv(tokens=16)
    k[3, 1, 5] = float("nan")
    v[2, 0, 0] = float("inf")
    blob, k_hat, v_hat = roundtrip(get_profile("zstd3"), 0, k, v)  # lossless: kept bit-exact
    assert torch.equal(k_hat.view(torch.uint8), k.view(torch.uint8))
    with pytest.raises(CodecError, match="non-finite"):
        encode_layer(get_profile("int4-kivi-g64"), 0, k, v)


def test_large_values_upgrade_parameters_to_float32():
    k, v = random_kv(tokens=64, dtype=torch.float32)
    k = k * 1e6
    profile = get_profile("int8-kivi")
    header = decode_header(encode_layer(profile, 0, k, v))
    assert [p.quant.param_dtype for p in header.parts] == ["float32", "float16"]
    check_roundtrip(profile, 0, k, v)


def test_constant_and_tiny_groups():
    k = torch.full((40, 2, 64), 3.25, dtype=torch.bfloat16)
    v = torch.randn(40, 2, 64).mul(1e-6).to(torch.bfloat16)
    for name in LOSSY:
        check_roundtrip(get_profile(name), 3, k, v)


def test_decode_into_other_dtype_and_device_argument():
    k, v = random_kv(tokens=20)
    blob = encode_layer(get_profile("identity"), 0, k, v)
    k32, v32 = decode_layer(blob, torch.float32, "cpu")
    assert k32.dtype == torch.float32 and torch.equal(k32, k.float()) and torch.equal(v32, v.float())
    with pytest.raises(CodecError):
        decode_layer(blob, torch.int8)


def test_bad_inputs_to_encode():
    k, v = random_kv(tokens=8)
    with pytest.raises(CodecError):
        encode_layer(get_profile("identity"), 0, k[0], v)
    with pytest.raises(CodecError):
        encode_layer(get_profile("identity"), 0, k, v[:4])
    with pytest.raises(CodecError):
        encode_layer(get_profile("identity"), 0, k.to(torch.int8), v.to(torch.int8))


def test_decoded_tensors_are_ordinary_and_writable():
    k, v = random_kv(tokens=20)
    for name in ("identity", "int4-kivi-g64"):
        k_hat, v_hat = decode_layer(encode_layer(get_profile(name), 0, k, v))
        k_hat.add_(1)  # not an inference tensor, not a view of someone else's memory
        assert not k_hat.is_inference() and k_hat.is_contiguous() and v_hat.is_contiguous()


def test_size_estimate_and_nominal_bits():
    k, v = random_kv(tokens=300)
    for name in BUILTINS:
        profile = get_profile(name)
        header = decode_header(encode_layer(profile, 1, k, v))
        assert encoded_size_estimate(profile, 1, 300, 3, 64) == header.raw_nbytes
    assert get_profile("int4-kivi-g64").nominal_bits_per_value() == 4 + 2 * 16 / 64
    assert get_profile("identity").nominal_bits_per_value() == 16


def test_stage_timings():
    k, v = random_kv(tokens=100)
    encoded: dict[str, float] = {}
    decoded: dict[str, float] = {}
    profile = get_profile("int4-hadamard-g64").model_copy(update={"lossless": LosslessSpec(codec="zstd", level=1, byteplane=True)})
    decode_layer(encode_layer(profile, 0, k, v, timings=encoded), timings=decoded)
    assert {"transform", "quantize", "pack", "byteplane", "copy", "lossless"} <= set(encoded)
    assert {"lossless", "copy", "byteplane", "unpack", "dequantize", "transform", "assemble"} <= set(decoded)
    assert all(seconds >= 0 for seconds in [*encoded.values(), *decoded.values()])


def test_concurrent_use_from_threads():
    # The connector encodes and decodes from a thread pool; zstd contexts are per thread.
    jobs = [(name, seed) for name in ("zstd3-byteplane", "lz4", "int4-kivi-g64") for seed in range(4)]

    def job(name_and_seed):
        name, seed = name_and_seed
        k, v = random_kv(tokens=64, seed=seed)
        k_hat, v_hat = decode_layer(encode_layer(get_profile(name), seed, k, v))
        return name, k, v, k_hat, v_hat

    with ThreadPoolExecutor(max_workers=4) as pool:
        for name, k, v, k_hat, v_hat in pool.map(job, jobs * 2):
            if get_profile(name).is_lossless:
                assert torch.equal(k_hat, k) and torch.equal(v_hat, v)


def test_header_is_small_and_self_describing():
    k, v = random_kv(tokens=10)
    blob = encode_layer(get_profile("int2-kivi-g32-recent128-first2"), 7, k, v)
    header = decode_header(blob)
    assert header.profile == "int2-kivi-g32-recent128-first2" and header.profile_version == 1
    assert header.layer == 7 and header.dtype == "bfloat16" and header.k_shape == (10, 3, 64)
    assert len(blob) - header.nbytes < 1024


@pytest.mark.parametrize("name", BUILTINS)
def test_quality_proxies(name):
    k, v = random_kv(seed=6)
    _, k_hat, v_hat = roundtrip(get_profile(name), 0, k, v)
    quality = kv_quality(k, v, k_hat, v_hat)
    if get_profile(name).is_lossless:
        assert quality.to_dict() == {"k_rel_l2": 0.0, "v_rel_l2": 0.0, "k_cosine": pytest.approx(1.0), "v_cosine": pytest.approx(1.0)}
    else:
        assert 0 < quality.k_rel_l2 < 0.5 and 0 < quality.v_rel_l2 < 0.5
        assert 0.9 < quality.k_cosine <= 1.0 + 1e-6 and 0.9 < quality.v_cosine <= 1.0 + 1e-6


def test_more_bits_less_error():
    k, v = random_kv(seed=8)
    errors = []
    for bits in (2, 3, 4, 6, 8):
        profile = Profile(name="t", quantize=QuantizeSpec(main=KVQuant(key=QuantSpec.minmax(bits, "channel"), value=QuantSpec.minmax(bits))))
        _, k_hat, v_hat = roundtrip(profile, 0, k, v)
        errors.append(kv_quality(k, v, k_hat, v_hat).k_rel_l2)
    assert errors == sorted(errors, reverse=True)


# -- round trips on real KV ---------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_roundtrip_real_kv(name, real_kv):
    profile = get_profile(name)
    worst = 0.0
    for layer in (0, 1, 2, 15, 29):  # the first-layer overrides, a middle and the last layer
        k, v = real_kv[layer]
        worst = max(worst, check_roundtrip(profile, layer, k, v))
    assert worst <= 1.0


def test_lossless_compresses_real_kv(real_kv):
    k, v = real_kv[10]
    raw = 2 * k.numel() * k.element_size()
    sizes = {name: len(encode_layer(get_profile(name), 10, k, v)) for name in ("identity", "zstd3", "zstd3-byteplane")}
    assert sizes["zstd3-byteplane"] < sizes["zstd3"] < sizes["identity"] and sizes["identity"] < raw + 1024


def test_hadamard_helps_per_token_keys_on_real_kv(real_kv):
    # Real keys have outlier channels: rotating spreads them, so per-token quantisation of
    # rotated keys beats per-token quantisation of raw ones.
    plain = Profile(name="t", quantize=QuantizeSpec(main=KVQuant(key=QuantSpec.minmax(4, "token"), value=QuantSpec.minmax(4, "token"))))
    rotated = plain.model_copy(update={"transform": TransformSpec(kind="hadamard")})
    gains = []
    for layer in (3, 15, 27):
        k, v = real_kv[layer]
        errors = [kv_quality(k, v, *roundtrip(p, layer, k, v)[1:]).k_rel_l2 for p in (plain, rotated)]
        gains.append(errors[0] / errors[1])
    assert sum(gains) / len(gains) > 1.0


# -- blob fuzzing: corrupt, truncated, forged ---------------------------------------------


@functools.cache
def _small_blobs() -> dict[str, bytes]:
    k, v = random_kv(tokens=9, heads=2, head_dim=16, seed=9)
    return {name: bytes(encode_layer(get_profile(name), 1, k, v)) for name in ("identity", "lz4", "zstd3-byteplane", "int4-kivi-g64", "fp8")}


def _expect_clean(blob) -> None:
    """Decoding must raise CodecError or return well-formed tensors; never anything else."""
    try:
        k, v = decode_layer(blob)
    except CodecError:
        return
    assert k.dim() == 3 and v.dim() == 3


@pytest.mark.parametrize("name", ["identity", "lz4", "zstd3-byteplane", "int4-kivi-g64", "fp8"])
def test_every_truncation_raises(name):
    blob = _small_blobs()[name]
    for length in range(len(blob)):
        with pytest.raises(CodecError):
            decode_layer(blob[:length])
    with pytest.raises(CodecError):
        decode_layer(blob + b"\x00")


@pytest.mark.parametrize("name", ["identity", "zstd3-byteplane", "int4-kivi-g64"])
def test_header_bit_flips_raise(name):
    blob = _small_blobs()[name]
    header_end = container.PREFIX_SIZE + struct.unpack_from("<I", blob, 8)[0]
    rng = random.Random(name)
    for _ in range(300):
        corrupt = bytearray(blob)
        position = rng.randrange(header_end)
        corrupt[position] ^= 1 << rng.randrange(8)
        with pytest.raises(CodecError):
            decode_layer(corrupt)


@pytest.mark.parametrize("name", ["lz4", "zstd3-byteplane", "int4-kivi-g64"])
def test_payload_corruption_never_crashes(name):
    # The payload is covered by the transfer's checksum, not here: a flip may decode to
    # other values, but must never crash, hang or return malformed tensors.
    blob = _small_blobs()[name]
    header_end = container.PREFIX_SIZE + struct.unpack_from("<I", blob, 8)[0]
    rng = random.Random(name)
    for _ in range(100):
        corrupt = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(header_end, len(blob))] = rng.randrange(256)
        _expect_clean(corrupt)


def test_garbage_raises():
    rng = random.Random(1)
    for blob in [b"", b"TKVC", b"TKV1" + b"\x00" * 100, bytes(rng.randrange(256) for _ in range(500)), "text", 12]:
        with pytest.raises(CodecError):
            decode_layer(blob)


def _forge(blob: bytes, mutate) -> bytes:
    """Re-pack a blob with a mutated header and a valid CRC (tests validation, not the CRC)."""
    header_len = struct.unpack_from("<I", blob, 8)[0]
    header = json.loads(blob[container.PREFIX_SIZE : container.PREFIX_SIZE + header_len])
    payload = blob[container.PREFIX_SIZE + header_len :]
    mutated = mutate(header)
    body = (mutated if isinstance(mutated, str) else json.dumps(mutated)).encode()
    prefix = struct.pack("<4sBBHII", container.MAGIC, container.FORMAT_VERSION, 0, 0, len(body), zlib.crc32(body))
    return prefix + body + payload


def _set(path: str, value):
    def mutate(header):
        node = header
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        last = keys[-1]
        if value is KeyError:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
        return header

    return mutate


FORGERIES = {
    "huge tokens": _set("k_shape", [1 << 40, 2, 16]),
    "huge but bounded shapes": _set("k_shape", [1 << 22, 1024, 4096]),
    "negative tokens": _set("parts.0.stop", -3),
    "zero heads": _set("v_shape", [9, 0, 16]),
    "string size": _set("raw_nbytes", "9000"),
    "float layer": _set("layer", 1.5),
    "missing field": _set("dtype", KeyError),
    "extra field": _set("surprise", 1),
    "unknown dtype": _set("dtype", "int8"),
    "parts gap": _set("parts.0.start", 1),
    "parts short": _set("parts.0.stop", 4),
    "bad bits": _set("parts.0.quant.bits", 5),
    "bad method": _set("parts.0.quant.method", "magic"),
    "sections": _set("sections", [1, 2, 3]),
    "raw size": _set("raw_nbytes", 1 << 33),
    "over limit": _set("raw_nbytes", 1 << 40),
    "wire size": _set("nbytes", 3),
    "codec": _set("lossless.codec", "brotli"),
    "transform kind": _set("transform.kind", "fourier"),
    "transform seed": _set("transform.seed", -1),
    "too many parts": lambda h: {**h, "parts": h["parts"] * 20},
    "not an object": lambda h: "[1, 2, 3]",
    "not json": lambda h: "{'profile': 1}",
    "not utf-8": lambda h: "\udcff",
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
@pytest.mark.parametrize("name", ["identity", "zstd3-byteplane", "int4-kivi-g64"])
def test_forged_headers_raise(name, forgery):
    blob = _small_blobs()[name]
    mutate = FORGERIES[forgery]
    if forgery == "not utf-8":
        header_len = struct.unpack_from("<I", blob, 8)[0]
        body = b"\xff" + blob[container.PREFIX_SIZE + 1 : container.PREFIX_SIZE + header_len]
        forged = struct.pack("<4sBBHII", container.MAGIC, 1, 0, 0, len(body), zlib.crc32(body)) + body
    else:
        forged = _forge(blob, mutate)
    with pytest.raises(CodecError):
        decode_layer(forged)


@pytest.mark.parametrize("name", ["identity", "zstd3-byteplane", "int4-kivi-g64"])
def test_a_consistent_huge_claim_fails_before_allocating(name):
    """A header whose shapes, parts and sizes agree on 4 GiB of KV, over a tiny payload:
    refused from the sizes alone (payload length, or the frame's declared size)."""
    tokens, heads, head_dim = 1 << 20, 8, 128

    def claim(header):
        header["k_shape"] = header["v_shape"] = [tokens, heads, head_dim]
        sizes = []
        for part in header["parts"]:
            part["stop"] = tokens
            quant = QuantSpec.model_validate(part["quant"])
            sizes += [s.nbytes for s in section_layout(quant, (tokens, heads, head_dim), 2)]
        header["sections"] = sizes
        header["raw_nbytes"] = sum(container.padded(n) for n in sizes)
        if header["lossless"]["codec"] == "none":
            header["nbytes"] = header["raw_nbytes"]
        return header

    started = time.perf_counter()
    with pytest.raises(CodecError, match="payload is|declares|raw size"):
        decode_layer(_forge(_small_blobs()[name], claim))
    assert time.perf_counter() - started < 1.0


def test_forged_prefix_fields_raise():
    blob = bytearray(_small_blobs()["identity"])
    for offset, value in ((4, 2), (5, 1), (6, 1)):  # version, flags, reserved
        forged = bytearray(blob)
        forged[offset] = value
        with pytest.raises(CodecError):
            decode_layer(forged)
    forged = bytearray(blob)
    struct.pack_into("<I", forged, 8, container.MAX_HEADER_BYTES + 1)
    with pytest.raises(CodecError, match="out of bounds"):
        decode_layer(forged)


def test_a_rotated_blob_header_names_its_seed():
    k, v = random_kv(tokens=9, heads=2, head_dim=16)
    profile = get_profile("int4-hadamard-g64").model_copy(update={"transform": TransformSpec(kind="hadamard", seed=99)})
    blob = bytes(encode_layer(profile, 1, k, v))
    assert decode_header(blob).transform.seed == 99
    # Decoding with another seed (a forged header) gives a different, not a crashed, result.
    forged = _forge(blob, _set("transform.seed", 98))
    k1, _ = decode_layer(blob)
    k2, _ = decode_layer(forged)
    assert not torch.equal(k1, k2)


# -- layouts ------------------------------------------------------------------------------


def cpu_blocks_by_hand(k: torch.Tensor, v: torch.Tensor, block_size: int) -> torch.Tensor:
    """vLLM's CPU attention kernel writing the cache itself (`cpu_attn_reshape_and_cache`,
    the op the engine uses): the ground truth of the CPU block interior."""
    import vllm._custom_ops as ops

    tokens, heads, head_dim = k.shape
    num_blocks = -(-tokens // block_size)
    cache = torch.zeros(num_blocks, heads, block_size, 2 * head_dim, dtype=k.dtype)
    key_cache, value_cache = cache.view(num_blocks, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    isa = "vec" if block_size % 32 == 0 else "vec16"
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, torch.arange(tokens), isa)
    return cache


def flash_blocks_by_hand(k: torch.Tensor, v: torch.Tensor, block_size: int) -> torch.Tensor:
    tokens, heads, head_dim = k.shape
    num_blocks = -(-tokens // block_size)
    cache = torch.zeros(2, num_blocks, block_size, heads, head_dim, dtype=k.dtype)
    for token in range(tokens):
        block, n = divmod(token, block_size)
        cache[0, block, n] = k[token]
        cache[1, block, n] = v[token]
    return cache


@pytest.mark.parametrize("layout,by_hand", [("cpu", cpu_blocks_by_hand), ("flash", flash_blocks_by_hand)])
@pytest.mark.parametrize("tokens", [1, 16, 37])
def test_layout_adapters(layout, by_hand, tokens):
    k, v = random_kv(tokens=tokens, heads=3, head_dim=32, seed=tokens)
    blocks = by_hand(k, v, 16)
    k2, v2 = blocks_to_kv(blocks, layout, tokens)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    assert torch.equal(kv_to_blocks(k, v, layout, 16), blocks)  # padding zero-filled
    out = torch.full_like(blocks, 7)
    assert kv_to_blocks(k, v, layout, 16, out=out) is out and torch.equal(out, blocks)
    with pytest.raises(CodecError):
        blocks_to_kv(blocks, layout, blocks.numel())


def test_layout_errors():
    with pytest.raises(CodecError, match="unknown KV layout"):
        blocks_to_kv(torch.zeros(1, 1, 16, 16), "paged", 4)
    with pytest.raises(CodecError):
        blocks_to_kv(torch.zeros(1, 1, 16, 15), "cpu", 4)
    with pytest.raises(CodecError):
        blocks_to_kv(torch.zeros(3, 1, 16, 1, 8), "flash", 4)
    with pytest.raises(CodecError):
        blocks_from_bytes(b"\x00" * 10, "cpu", torch.bfloat16, 16, 1, 8)


@pytest.mark.parametrize("layout", ["cpu", "flash"])
def test_layouts_from_the_connectors_kv_layout(layout):
    """KVLayout's per-block views (CPU) and gathered buffers are what the connector has."""
    block_size, heads, head_dim, num_blocks = 16, 3, 8, 6
    generator = torch.Generator().manual_seed(0)
    if layout == "cpu":
        cache = torch.randn(num_blocks, heads, block_size, 2 * head_dim, generator=generator).to(torch.bfloat16)
    else:
        cache = torch.randn(2, num_blocks, block_size, heads, head_dim, generator=generator).to(torch.bfloat16)
    kv_layout = KVLayout({"model.layers.0.self_attn.attn": cache}, num_blocks, block_size, "m")
    block_ids, tokens = [4, 1, 2], 40
    expected = cache[block_ids] if layout == "cpu" else cache[:, block_ids]
    from_views = blocks_from_bytes(kv_layout.block_views(block_ids)[0], layout, torch.bfloat16, block_size, heads, head_dim)
    gathered = kv_layout.gather_blocks(block_ids)[0]
    from_gather = blocks_from_bytes(memoryview(gathered.view(torch.uint8).numpy()), layout, torch.bfloat16, block_size, heads, head_dim)
    assert torch.equal(from_views, expected) and torch.equal(from_gather, expected)
    blobs = encode_request(get_profile("zstd3-byteplane"), [from_views], layout, tokens, layer_indices=[0])
    (restored,) = decode_request(blobs, layout, block_size, layer_indices=[0])
    k, v = blocks_to_kv(expected, layout, tokens)
    k2, v2 = blocks_to_kv(restored, layout, tokens)
    assert torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("layout", [LayoutKind.CPU, LayoutKind.FLASH])
@pytest.mark.parametrize("name", ["identity", "int4-kivi-g64", "int2-kivi-g32-recent128-first2"])
def test_request_roundtrip(layout, name, real_kv):
    block_size, tokens = 16, 150
    make = cpu_blocks_by_hand if layout is LayoutKind.CPU else flash_blocks_by_hand
    layers = [make(k[:tokens], v[:tokens], block_size) for k, v in real_kv[:4]]
    profile = get_profile(name)
    blobs = encode_request(profile, layers, layout, tokens, layer_indices=[0, 1, 2, 3])
    restored = decode_request(blobs, layout, block_size, torch.bfloat16, "cpu", layer_indices=[0, 1, 2, 3])
    for index, (original, decoded) in enumerate(zip(layers, restored, strict=True)):
        assert decoded.shape == original.shape
        k, v = blocks_to_kv(original, layout, tokens)
        k2, v2 = blocks_to_kv(decoded, layout, tokens)
        if profile.is_lossless:
            assert torch.equal(decoded, original)
        else:
            assert bound_ratio(profile, index, k, v, k2, v2) <= 1.0
    with pytest.raises(CodecError, match="holds layer"):
        decode_request(blobs[::-1], layout, block_size, layer_indices=[0, 1, 2, 3])
    with pytest.raises(CodecError):
        encode_request(profile, layers, layout, tokens, layer_indices=[0])
