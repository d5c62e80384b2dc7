"""Single-token attention over a KV cache buffer, for the decode step: one launch on a GPU.

    qk_norm_rope(q, k, q_w, k_w, pos, eps=, rope_dims=, ...)       -> (B, H, 1, hd), (B, H_kv, 1, hd)
        the new token's per-head RMSNorm and rotary embedding, queries and keys in one launch
    decode_attention(q, keys, values, length, scale=, backend=)      -> (B, H, 1, hd)

q (B, H, 1, hd) the new token's queries (rotary applied); keys, values (B, H_kv, S, hd) cache
buffers whose first `length` positions are filled, `length` an int32 array of shape (1,), so a
compiled decode step keeps its shapes (and its trace) while the cache fills. H is a multiple of
H_kv (grouped queries). The result is softmax(scale * q K^T) V over those positions, as
mx.fast.scaled_dot_product_attention gives for one query token.

Backends: "metal" / "cuda" (src/attention_decode.inc), else the pure-MLX reference (a masked
mx.fast.scaled_dot_product_attention), which also serves head dims that are not a multiple of 32.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from . import GPU_BACKENDS, gpu

INPUTS = ("q", "k", "v", "length", "dims", "scale")
NORM_ROPE_INPUTS, NORM_ROPE_OUTPUTS = ("q", "k", "q_w", "k_w", "pos", "dims", "params"), ("q_out", "k_out")
SIMDS = 4  # SIMD groups per (sequence, head): each takes every 4th cached position


def decode_attention(q, keys, values, length, *, scale: float, backend: str = "reference") -> mx.array:
    B, H, T, hd = q.shape
    if backend not in GPU_BACKENDS or T != 1 or hd % 32:
        return reference(q, keys, values, length, scale=scale)
    _, n_kv, cap, _ = keys.shape
    (y,) = gpu.kernel(backend, "attention_decode.inc", "flashmoe_attention_decode", INPUTS)(
        inputs=[q, keys, values, length, gpu.int_array(H, n_kv, cap), _scale(scale)],
        template=[("T", q.dtype), ("HD", hd), ("SIMDS", SIMDS)],
        grid=(B * H * SIMDS * 32, 1, 1),
        threadgroup=(SIMDS * 32, 1, 1),
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
        **gpu.output_init(),
    )
    return y


def qk_norm_rope(
    q,
    k,
    q_w,
    k_w,
    pos,
    *,
    eps: float,
    rope_dims: int,
    traditional: bool,
    base: float,
    scale: float,
    backend: str = "reference",
) -> tuple[mx.array, mx.array]:
    """q (B, 1, H, hd), k (B, 1, H_kv, hd) projections of one new token; q_w, k_w (hd,) RMSNorm
    weights; pos (1,) int32 its position -> rotated, normalised q (B, H, 1, hd) and k (B, H_kv, 1, hd)."""
    B, T, H, hd = q.shape
    n_kv = k.shape[2]
    if backend not in GPU_BACKENDS or T != 1 or hd % 32 or rope_dims % 2 or rope_dims > hd:
        return qk_norm_rope_reference(
            q, k, q_w, k_w, pos, eps=eps, rope_dims=rope_dims, traditional=traditional, base=base, scale=scale
        )
    q_out, k_out = gpu.kernel(
        backend, "qk_norm_rope.inc", "flashmoe_qk_norm_rope", NORM_ROPE_INPUTS, NORM_ROPE_OUTPUTS
    )(
        inputs=[q, k, q_w, k_w, pos, gpu.int_array(H, n_kv), _params(eps, math.log2(base), scale)],
        template=[("T", q.dtype), ("HD", hd), ("ROPE_DIMS", rope_dims), ("TRADITIONAL", int(traditional))],
        grid=(B * (H + n_kv) * 32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(B, H, 1, hd), (B, n_kv, 1, hd)],
        output_dtypes=[q.dtype, k.dtype],
        **gpu.output_init(),
    )
    return q_out, k_out


def qk_norm_rope_reference(q, k, q_w, k_w, pos, *, eps, rope_dims, traditional, base, scale):
    """mx.fast.rms_norm per head, then mx.fast.rope at pos, on (B, H, 1, hd) views."""

    def one(x, w):
        x = mx.fast.rms_norm(x, w, eps).transpose(0, 2, 1, 3)
        return mx.fast.rope(x, rope_dims, traditional=traditional, base=base, scale=scale, offset=pos)

    return one(q, q_w), one(k, k_w)


def reference(q, keys, values, length, *, scale: float) -> mx.array:
    """mx.fast.scaled_dot_product_attention over the first `length` positions (a boolean mask)."""
    filled = mx.arange(keys.shape[2]) < length  # (S,)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=filled)


@functools.lru_cache(maxsize=64)
def _params(*values: float) -> mx.array:
    return mx.array(values, dtype=mx.float32)


@functools.lru_cache(maxsize=64)
def _scale(scale: float) -> mx.array:
    return mx.array([scale], dtype=mx.float32)
