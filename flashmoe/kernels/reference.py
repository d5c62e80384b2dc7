"""Pure-MLX references: unpacking by shifts and masks, the ground truth the kernels are tested against.

Slow and memory-hungry (the whole matrix is dequantized to float32), but written
from the format's definition alone: value i of a row sits in word i // (32/bits), at
bit offset bits * (i % (32/bits)), and w = q * scale + bias per group of inputs.
"""

from __future__ import annotations

import mlx.core as mx


def unpack(w: mx.array, bits: int) -> mx.array:
    """(..., words) uint32 -> (..., words * 32/bits) uint32 codes, little-endian within a word."""
    per_word = 32 // bits
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    codes = (w[..., None] >> shifts) & ((1 << bits) - 1)  # (..., words, per_word)
    return codes.reshape(*w.shape[:-1], w.shape[-1] * per_word)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, *, bits: int, group_size: int) -> mx.array:
    """(..., out, words) packed -> (..., out, in) float32 weights."""
    q = unpack(w, bits).astype(mx.float32)
    groups = q.reshape(*scales.shape, group_size)  # (..., out, in/group, group)
    scale = scales.astype(mx.float32)[..., None]
    bias = biases.astype(mx.float32)[..., None]
    return (groups * scale + bias).reshape(q.shape)


def dot(weights: mx.array, x: mx.array) -> mx.array:
    """weights (..., out, in) . x (..., in) -> (..., out) by multiply-and-sum in true float32.

    Not a matmul: a GPU's float32 matmul may round its inputs through TF32 (~1e-3).
    """
    return (weights * x.astype(mx.float32)[..., None, :]).sum(-1)


def dequant_matvec(x, w, scales, biases, *, bits: int, group_size: int) -> mx.array:
    """x (..., in) @ dequantize(w).T -> (..., out), computed in float32, returned in x's dtype."""
    weights = dequantize(w, scales, biases, bits=bits, group_size=group_size)  # (out, in)
    return dot(weights, x).astype(x.dtype)


def gather_dequant_matvec(x, w, scales, biases, indices, *, bits: int, group_size: int) -> mx.array:
    """x (..., in) or (..., K, in) against experts `indices` (..., K) of w (E, out, words) -> (..., K, out)."""
    weights = dequantize(w[indices], scales[indices], biases[indices], bits=bits, group_size=group_size)
    xk = x[..., None, :] if x.ndim == indices.ndim else x  # (..., K or 1, in)
    return dot(weights, xk).astype(x.dtype)  # (..., K, out)
