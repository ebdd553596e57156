"""Cheap quality proxies of a reconstruction, and the check of a profile's stated bound.

The proxies (relative L2 error, mean cosine similarity of the (token, head) vectors) are
what the online controller can afford per request. `bound_ratio` recomputes, from the
original tensors and the profile alone, the error each element may have, and returns the
worst observed/allowed ratio: <= 1 means the reconstruction kept the profile's promise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kv_transport.codecs.pipeline import plan_parts
from kv_transport.codecs.profiles import (
    FP8_MAX,
    FP8_REL_ERROR,
    FP8_SUBNORMAL_HALF_STEP,
    Profile,
    QuantSpec,
)
from kv_transport.codecs.quantize import arrange, group_spans, unarrange
from kv_transport.codecs.transform import hadamard_signs, rotate

# Half an ulp of each output dtype, relative to the value: decoding rounds to it.
_OUTPUT_HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
# Parameter rounding (relative, absolute) of the stored min/step/scale, with headroom.
_PARAM_ROUNDING = {"float16": (2.0**-9, 2.0**-23), "float32": (2.0**-19, 1e-37)}
# float32 arithmetic of quantise + dequantise, relative to the magnitudes involved.
_ARITHMETIC = 2.0**-20


def relative_l2(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference|| / ||reference|| over the whole tensor (0 for identical)."""
    ref = reference.float()
    denominator = torch.linalg.vector_norm(ref)
    error = torch.linalg.vector_norm(approx.float() - ref)
    if float(denominator) == 0.0:
        return 0.0 if float(error) == 0.0 else float("inf")
    return float(error / denominator)


def cosine_similarity(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean cosine similarity of the head_dim vectors (one per token and head)."""
    if reference.numel() == 0:
        return 1.0
    ref = reference.float().reshape(-1, reference.shape[-1])
    est = approx.float().reshape(-1, reference.shape[-1])
    return float(torch.nn.functional.cosine_similarity(ref, est, dim=-1, eps=1e-12).mean())


@dataclass(frozen=True)
class KVQuality:
    k_rel_l2: float
    v_rel_l2: float
    k_cosine: float
    v_cosine: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def kv_quality(k: torch.Tensor, v: torch.Tensor, k_hat: torch.Tensor, v_hat: torch.Tensor) -> KVQuality:
    return KVQuality(relative_l2(k, k_hat), relative_l2(v, v_hat), cosine_similarity(k, k_hat), cosine_similarity(v, v_hat))


def allowed_error(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-element error `spec` may introduce on x (float32, in the quantised domain),
    float16 parameter rounding and float32 arithmetic included."""
    values = x.float()
    if spec.method == "none":
        return torch.zeros_like(values)
    rel, absolute = _PARAM_ROUNDING[spec.param_dtype]
    rows = arrange(values, spec.axis)
    allowed = torch.empty_like(rows)
    for start, count, width in group_spans(rows.shape[1], spec.group_size):
        groups = rows[:, start : start + count * width].reshape(rows.shape[0], count, width)
        target = allowed[:, start : start + count * width].view(rows.shape[0], count, width)
        magnitude = groups.abs()
        if spec.method == "fp8":
            scale = (magnitude.amax(-1, keepdim=True) / FP8_MAX) * (1 + rel) + absolute
            target.copy_(magnitude * (FP8_REL_ERROR + _ARITHMETIC) + scale * FP8_SUBNORMAL_HALF_STEP)
        else:
            lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
            step = (hi - lo + lo.abs() * rel + absolute) / spec.levels * (1 + rel) + absolute
            target.copy_(0.5 * step + (magnitude + (hi - lo)) * _ARITHMETIC)
    return unarrange(allowed, spec.axis, tuple(values.shape))


def bound_ratio(
    profile: Profile,
    layer_index: int,
    k: torch.Tensor,
    v: torch.Tensor,
    k_hat: torch.Tensor,
    v_hat: torch.Tensor,
) -> float:
    """Worst observed error / allowed error over K and V (<= 1: within the stated bound).

    Without a transform the check is element-wise. With the Hadamard rotation the bound
    holds element-wise in the rotated domain, so it is checked as the L2 norm of each
    (token, head) vector's error, which the orthonormal rotation preserves.
    """
    worst = 0.0
    for part in plan_parts(profile, layer_index, k.shape[0]):
        original = (k if part.tensor == "k" else v)[part.start : part.stop].float()
        decoded = (k_hat if part.tensor == "k" else v_hat)[part.start : part.stop]
        output_rounding = decoded.float().abs() * _OUTPUT_HALF_ULP[decoded.dtype]
        error = (decoded.float() - original).abs()
        if part.quant.method == "none" and decoded.dtype == k.dtype:
            # Raw parts must come back bit-exact.
            if not torch.equal(decoded, (k if part.tensor == "k" else v)[part.start : part.stop]):
                return float("inf")
            continue
        if profile.transform.applies(part.tensor, part.quant):
            signs = hadamard_signs(profile.transform.seed, layer_index, original.shape[1], original.shape[2], original.device)
            allowed_rotated = allowed_error(rotate(original, signs), part.quant)
            allowed = torch.linalg.vector_norm(allowed_rotated, dim=-1) + torch.linalg.vector_norm(output_rounding, dim=-1)
            observed = torch.linalg.vector_norm(error, dim=-1)
        else:
            allowed = allowed_error(original, part.quant) + output_rounding
            observed = error
        if observed.numel():
            ratio = observed / allowed.clamp_min(torch.finfo(torch.float32).tiny)
            worst = max(worst, float(ratio.max()))
    return worst
