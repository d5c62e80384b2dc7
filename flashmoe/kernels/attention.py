"""The decode step's attention kernels: one launch each on a GPU.

    qk_norm_rope(q, k, q_norm, k_norm, pos, eps=, rope_dims=, traditional=, base=, scale=, backend=)
        -> queries (B, H, 1, hd), keys (B, H_kv, 1, hd): the new token's per-head RMSNorm and
           rotary embedding, queries and keys in one launch
    decode_attention(q, keys, values, k_new, v_new, pos, scale=, backend=)   -> (B, H, 1, hd)

pos is the new token's position as an int32 array of shape (1,), so a compiled decode step keeps
its shapes (and its trace) while the cache fills. decode_attention attends the new token's
queries q (B, H, 1, hd) over positions [0, pos) of the cache buffers keys, values (B, H_kv, S, hd)
and over its own key and value k_new, v_new (B, H_kv, 1, hd) at pos; the caller writes those into
the buffers afterwards (a plain slice write, cheaper than a dynamic one inside the step). H is a
multiple of H_kv (grouped queries). The result is softmax(scale * q K^T) V, as
mx.fast.scaled_dot_product_attention gives for one query token.

Backends: "metal" / "cuda" (src/attention_decode.inc, src/qk_norm_rope.inc), else the pure-MLX
references (mx.fast.rms_norm + mx.fast.rope; a masked mx.fast.scaled_dot_product_attention),
which also serve head dims that are not a multiple of 32.
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import fused_backend, gpu

INPUTS = ("q", "k", "v", "k_new", "v_new", "pos", "dims", "scale")
NORM_ROPE_INPUTS, NORM_ROPE_OUTPUTS = ("q", "k", "q_w", "k_w", "pos", "dims", "params"), ("q_out", "k_out")
SIMDS = 8  # SIMD groups per (sequence, head): each takes every 8th cached position


def decode_attention(q, keys, values, k_new, v_new, pos, *, scale: float, backend: str = "auto") -> mx.array:
    B, H, T, hd = q.shape
    backend = fused_backend(backend)
    if backend == "reference" or T != 1 or hd % 32:
        return reference(q, keys, values, k_new, v_new, pos, scale=scale)
    _, n_kv, cap, _ = keys.shape
    (y,) = gpu.kernel(backend, "attention_decode.inc", "flashmoe_attention_decode", INPUTS)(
        inputs=[q, keys, values, k_new, v_new, pos, gpu.int_array(H, n_kv, cap), gpu.float_array(scale)],
        template=[("T", q.dtype), ("HD", hd), ("SIMDS", SIMDS)],
        grid=(B * H * SIMDS * 32, 1, 1),
        threadgroup=(SIMDS * 32, 1, 1),
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
        **gpu.output_init(),
    )
    return y


def reference(q, keys, values, k_new, v_new, pos, *, scale: float) -> mx.array:
    """The new key and value written at pos, then mx.fast.scaled_dot_product_attention over
    positions [0, pos] (a boolean mask)."""
    keys = mx.slice_update(keys, k_new, pos, axes=(2,))
    values = mx.slice_update(values, v_new, pos, axes=(2,))
    filled = mx.arange(keys.shape[2]) <= pos  # (S,)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=filled)


def qk_norm_rope(
    q,
    k,
    q_norm,
    k_norm,
    pos,
    *,
    eps: float,
    rope_dims: int,
    traditional: bool,
    base: float,
    scale: float,
    backend: str = "auto",
) -> tuple[mx.array, mx.array]:
    """q (B, 1, H, qw) with each head's query in its first hd values (qw = 2 hd when q_proj also
    gives an output gate), k (B, 1, H_kv, hd): one new token's projections; q_norm, k_norm (hd,)
    RMSNorm weights, or both None (no norm); pos (1,) int32 -> queries (B, H, 1, hd), keys
    (B, H_kv, 1, hd), normalised and rotated."""
    B, T, H, qw = q.shape
    n_kv, hd = k.shape[2], k.shape[3]
    backend = fused_backend(backend)
    kw = dict(eps=eps, rope_dims=rope_dims, traditional=traditional, base=base, scale=scale)
    if backend == "reference" or T != 1 or hd % 32 or rope_dims % 2 or rope_dims > hd:
        return qk_norm_rope_reference(q, k, q_norm, k_norm, pos, **kw)
    norm = q_norm is not None
    weights = [q_norm, k_norm] if norm else [gpu.float_array(0.0)] * 2  # unread without NORM
    q_out, k_out = gpu.kernel(
        backend, "qk_norm_rope.inc", "flashmoe_qk_norm_rope", NORM_ROPE_INPUTS, NORM_ROPE_OUTPUTS
    )(
        inputs=[q, k, *weights, pos, gpu.int_array(H, n_kv), gpu.float_array(eps, math.log2(base), scale)],
        template=[
            ("T", q.dtype),
            ("HD", hd),
            ("QW", qw),
            ("ROPE_DIMS", rope_dims),
            ("TRADITIONAL", int(traditional)),
            ("NORM", int(norm)),
        ],
        grid=(B * (H + n_kv) * 32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(B, H, 1, hd), (B, n_kv, 1, hd)],
        output_dtypes=[q.dtype, k.dtype],
        **gpu.output_init(),
    )
    return q_out, k_out


def qk_norm_rope_reference(q, k, q_norm, k_norm, pos, *, eps, rope_dims, traditional, base, scale):
    """mx.fast.rms_norm per head (when weights are given), then mx.fast.rope at pos, on (B, H, 1, hd)."""
    B, hd = k.shape[0], k.shape[-1]
    # one position per sequence: mx.fast.rope reads an array offset per sequence, and on the H200 a
    # (1,) offset with B = 2 gave wrong rotations (the CPU broadcasts it)
    offset = pos if B == 1 else mx.repeat(pos, B)

    def one(x, w):
        if w is not None:
            x = mx.fast.rms_norm(x, w, eps)
        x = x.transpose(0, 2, 1, 3)
        return mx.fast.rope(x, rope_dims, traditional=traditional, base=base, scale=scale, offset=offset)

    return one(q[..., :hd], q_norm), one(k, k_norm)
