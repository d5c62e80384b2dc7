"""Single-token attention over a KV cache buffer, for the decode step: one launch on a GPU.

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

import mlx.core as mx

from . import fused_backend, gpu

INPUTS = ("q", "k", "v", "length", "dims", "scale")
SIMDS = 4  # SIMD groups per (sequence, head): each takes every 4th cached position


def decode_attention(q, keys, values, length, *, scale: float, backend: str = "auto") -> mx.array:
    B, H, T, hd = q.shape
    backend = fused_backend(backend)
    if backend == "reference" or T != 1 or hd % 32:
        return reference(q, keys, values, length, scale=scale)
    _, n_kv, cap, _ = keys.shape
    (y,) = gpu.kernel(backend, "attention_decode.inc", "flashmoe_attention_decode", INPUTS)(
        inputs=[q, keys, values, length, gpu.int_array(H, n_kv, cap), gpu.float_array(scale)],
        template=[("T", q.dtype), ("HD", hd), ("SIMDS", SIMDS)],
        grid=(B * H * SIMDS * 32, 1, 1),
        threadgroup=(SIMDS * 32, 1, 1),
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
        **gpu.output_init(),
    )
    return y


def reference(q, keys, values, length, *, scale: float) -> mx.array:
    """mx.fast.scaled_dot_product_attention over the first `length` positions (a boolean mask)."""
    filled = mx.arange(keys.shape[2]) < length  # (S,)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=filled)
