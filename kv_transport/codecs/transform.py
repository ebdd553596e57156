"""Randomized Hadamard rotation over head_dim.

Rotating each (token, head) vector by R = H·diag(s)/sqrt(d) (H the Sylvester Hadamard
matrix, s random signs) spreads a few outlier channels over all of them, so per-token
quantisation loses less. R is orthonormal: the inverse is diag(s)·H/sqrt(d) and L2 errors
are the same in both domains.

The signs of (seed, layer, head) come from a counter-based hash (splitmix64) computed on
the host, so encoder and decoder derive identical signs whatever device each runs on (a
torch.Generator on CUDA would not give the CPU's stream).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from kv_transport.codecs.errors import CodecError


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=512)
def _host_signs(seed: int, layer: int, num_heads: int, head_dim: int) -> torch.Tensor:
    # Chained hashes, so (seed, layer, head, channel) tuples never alias each other.
    layer_key = _splitmix64(_splitmix64(np.array([seed], dtype=np.uint64)) ^ np.uint64(layer))
    head_keys = _splitmix64(layer_key ^ np.arange(num_heads, dtype=np.uint64))[:, None]
    bits = _splitmix64(head_keys ^ np.arange(head_dim, dtype=np.uint64)[None, :]) >> np.uint64(63)
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float32))


@functools.lru_cache(maxsize=512)
def _device_signs(seed: int, layer: int, num_heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
    return _host_signs(seed, layer, num_heads, head_dim).to(device)


def hadamard_signs(seed: int, layer: int, num_heads: int, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """±1 float32 signs of shape [num_heads, head_dim] for one layer."""
    return _device_signs(seed, layer, num_heads, head_dim, torch.device(device))


def check_head_dim(head_dim: int) -> None:
    if head_dim <= 0 or head_dim & (head_dim - 1):
        raise CodecError(f"the Hadamard transform needs a power-of-two head_dim, got {head_dim}")


@functools.lru_cache(maxsize=64)
def _sylvester(n: int, device: torch.device) -> torch.Tensor:
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < n:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return matrix.to(device)


def _exact_float32_matmul(device: torch.device) -> bool:
    # TF32 (CUDA) or bf16 passes (oneDNN on CPU) would round the inputs to ~10 bits: then
    # the rotation would add error of its own, so use the add/sub butterflies instead.
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform along the last dim (a power of two).

    The Sylvester matrix is symmetric and, normalised, its own inverse: fwht(fwht(x)) == x.
    It factors as H_d = H_a ⊗ H_b (d = a·b), so the log2(d) butterfly stages can be run as
    two small matmuls, one per factor: two passes over memory instead of log2(d), 2-3x
    faster on CPU. Where float32 matmuls are not exact (TF32), the butterflies run instead.
    """
    d = x.shape[-1]
    check_head_dim(d)
    if not _exact_float32_matmul(x.device):
        return fwht_butterfly(x)
    a = 1 << (d.bit_length() - 1) // 2
    b = d // a
    y = torch.matmul(x.reshape(-1, a, b), _sylvester(b, x.device))  # H_b on the fast index
    y = torch.matmul(_sylvester(a, x.device), y)  # H_a on the slow index
    return (y * d**-0.5).view(x.shape)


def fwht_butterfly(x: torch.Tensor) -> torch.Tensor:
    """The textbook FWHT: log2(d) vectorised add/sub butterfly stages (same result)."""
    d = x.shape[-1]
    check_head_dim(d)
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        pairs = y.view(-1, d // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).view(-1, d)
        h *= 2
    return (y * d**-0.5).view(x.shape)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """[T, H, D] float32 -> rotated, with per-head signs [H, D]."""
    return fwht(x * signs)


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    return fwht(y) * signs
