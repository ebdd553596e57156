"""KV codecs: composable transform -> quantize -> lossless pipelines for KV transfers.

A pure library (torch, numpy, zstandard, lz4; no Ray, no vLLM). The connector encodes
each layer of a request into one self-describing blob and decodes it on the other side:

    from kv_transport import codecs
    profile = codecs.get_profile("int4-kivi-g64")
    blob = codecs.encode_layer(profile, layer_index, k, v)     # k, v: [tokens, H, D]
    k2, v2 = codecs.decode_layer(blob, torch.bfloat16, "cuda")  # no side information

    blobs = codecs.encode_request(profile, block_tensors, "cpu", num_tokens, layer_indices)
    blocks = codecs.decode_request(blobs, "cpu", block_size)

Any malformed blob raises `CodecError` (a ValueError).
"""

from kv_transport.codecs.container import FORMAT_VERSION, MAGIC, BlobHeader
from kv_transport.codecs.errors import CodecError
from kv_transport.codecs.layouts import (
    LayoutKind,
    blocks_from_bytes,
    blocks_shape,
    blocks_to_kv,
    kv_to_blocks,
)
from kv_transport.codecs.pipeline import (
    decode_header,
    decode_layer,
    decode_request,
    encode_layer,
    encode_request,
    encoded_size_estimate,
    plan_parts,
)
from kv_transport.codecs.profiles import (
    BUILTIN_PROFILE_NAMES,
    SEARCH_SPACE,
    KVQuant,
    LosslessSpec,
    Profile,
    QuantizeSpec,
    QuantSpec,
    TransformSpec,
    get_profile,
    iter_profiles,
    list_profiles,
    profile_from_choices,
    register_profile,
    search_space_size,
)
from kv_transport.codecs.quality import (
    KVQuality,
    bound_ratio,
    cosine_similarity,
    kv_quality,
    relative_l2,
)

__all__ = [
    "BUILTIN_PROFILE_NAMES",
    "FORMAT_VERSION",
    "MAGIC",
    "SEARCH_SPACE",
    "BlobHeader",
    "CodecError",
    "KVQuality",
    "KVQuant",
    "LayoutKind",
    "LosslessSpec",
    "Profile",
    "QuantSpec",
    "QuantizeSpec",
    "TransformSpec",
    "blocks_from_bytes",
    "blocks_shape",
    "blocks_to_kv",
    "bound_ratio",
    "cosine_similarity",
    "decode_header",
    "decode_layer",
    "decode_request",
    "encode_layer",
    "encode_request",
    "encoded_size_estimate",
    "get_profile",
    "iter_profiles",
    "kv_quality",
    "kv_to_blocks",
    "list_profiles",
    "plan_parts",
    "profile_from_choices",
    "register_profile",
    "relative_l2",
    "search_space_size",
]
