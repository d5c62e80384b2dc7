"""The decode step's attention kernels: one launch each on a GPU.

    qk_norm_rope(qkv, q_norm, k_norm, pos, heads=, kv_heads=, head_dim=, q_width=, eps=, rope_dims=,
                 traditional=, base=, scale=, backend=)
        -> queries (B, H, 1, hd), kv_new (2, B, H_kv, 1, hd) (keys in [0], values in [1]): the new
           token's per-head RMSNorm and rotary embedding of queries and keys, and its values, in one
           launch, read straight from the projections' output (one stacked array or three)
    decode_attention(q, kv, kv_new, pos, scale=, flat=, backend=, gate=)
        -> (B, H, 1, hd), or (B, 1, H * hd) with flat=True (heads side by side, as o_proj takes them),
           times sigmoid of the output gate for the gated variants (gate: where q_proj's output holds it)

pos is the new token's position as an int32 array of shape (1,), so a compiled decode step keeps
its shapes (and its trace) while the cache fills. decode_attention attends the new token's
queries q (B, H, 1, hd) over positions [0, pos) of the cache buffer kv (2, B, H_kv, S, hd) (keys
in kv[0], values in kv[1], as models.cache.KVCache keeps them) and over its own key and value
kv_new at pos; the caller writes kv_new into the buffer afterwards (one plain slice write, cheaper
than a dynamic one inside the step). Keys and values travel as one array so that the step takes
and gives one array per layer and the cache write is one node, not two. H is a multiple of H_kv
(grouped queries). The result is softmax(scale * q K^T) V, as
mx.fast.scaled_dot_product_attention gives for one query token.

Backends: "metal" / "cuda" (src/attention_decode.inc, src/qk_norm_rope.inc), else the pure-MLX
references (mx.fast.rms_norm + mx.fast.rope; a masked mx.fast.scaled_dot_product_attention),
which also serve head dims that are not a multiple of 32.
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import fused_backend, gpu

INPUTS = ("q", "kv", "kv_new", "pos", "dims", "scale", "gate")
NORM_ROPE_INPUTS = ("q", "k", "v", "q_w", "k_w", "pos", "params")
NORM_ROPE_OUTPUTS = ("q_out", "kv_out")
SIMDS = 8  # SIMD groups per (sequence, head): each takes every 8th cached position


def decode_attention(
    q, kv, kv_new, pos, *, scale: float, flat: bool = False, backend: str = "auto", gate=None
) -> mx.array:
    """gate: None, or (array, offset) for the gated variants (Qwen3-Next): the array (B, 1, row) that
    holds q_proj's output from column `offset` on, each head's queries then its output gate (hd
    each); the result is multiplied by sigmoid(gate), in the kernel on a GPU."""
    B, H, T, hd = q.shape
    backend = fused_backend(backend)
    if backend == "reference" or T != 1 or hd % 32:
        y = reference(q, kv, kv_new, pos, scale=scale)  # (B, H, T, hd)
        if gate is not None:  # one token
            y = y * mx.sigmoid(gate_values(gate, H, hd)).reshape(B, 1, H, hd).transpose(0, 2, 1, 3)
        return y.transpose(0, 2, 1, 3).reshape(B, T, H * hd) if flat else y
    _, _, n_kv, cap, _ = kv.shape
    gate_array, offset = gate if gate is not None else (gpu.unread(q.dtype), 0)
    row = gate_array.shape[-1] if gate is not None else 0
    # kv whole: the kernel finds the values B * H_kv * cap * hd in (kv[1] would be a slice node)
    (y,) = gpu.kernel(backend, "attention_decode.inc", "flashmoe_attention_decode", INPUTS)(
        inputs=[
            q,
            kv,
            kv_new,
            pos,
            gpu.int_array(H, n_kv, cap, B, row, offset),
            gpu.float_array(scale),
            gate_array,
        ],
        template=[("T", q.dtype), ("HD", hd), ("SIMDS", SIMDS), ("GATED", int(gate is not None))],
        grid=(B * H * SIMDS * 32, 1, 1),
        threadgroup=(SIMDS * 32, 1, 1),
        output_shapes=[(B, 1, H * hd) if flat else q.shape],  # one token: the same memory either way
        output_dtypes=[q.dtype],
        **gpu.output_init(),
    )
    return y


def gate_values(gate, heads: int, head_dim: int) -> mx.array:
    """The output gate (B, 1, H * hd) from decode_attention's `gate` (array (B, 1, row), offset)."""
    array, offset = gate
    B = array.shape[0]
    per_head = array[..., offset : offset + heads * 2 * head_dim].reshape(B, 1, heads, 2, head_dim)
    return per_head[..., 1, :].reshape(B, 1, heads * head_dim)


def reference(q, kv, kv_new, pos, *, scale: float) -> mx.array:
    """The new key and value written at pos, then mx.fast.scaled_dot_product_attention over
    positions [0, pos] (a boolean mask)."""
    kv = mx.slice_update(kv, kv_new, pos, axes=(3,))  # (2, B, H_kv, S, hd)
    filled = mx.arange(kv.shape[3]) <= pos  # (S,)
    return mx.fast.scaled_dot_product_attention(q, kv[0], kv[1], scale=scale, mask=filled)


def qk_norm_rope(
    qkv,
    q_norm,
    k_norm,
    pos,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    q_width: int,
    eps: float,
    rope_dims: int,
    traditional: bool,
    base: float,
    scale: float,
    backend: str = "auto",
) -> tuple[mx.array, mx.array]:
    """One new token's projections -> queries (B, H, 1, hd) and kv_new (2, B, H_kv, 1, hd) (keys in [0],
    values in [1]: the cache buffer's layout, so the caller writes it with one slice write), queries
    and keys normalised (q_norm, k_norm (hd,) RMSNorm weights, or both None) and rotated at pos (1,) int32.

    qkv: the stacked projection output (B, 1, H * qw + 2 * H_kv * hd), or its three parts q (B, 1, H * qw),
    k, v (B, 1, H_kv * hd); each query head is the first hd of its qw = q_width values (qw = 2 hd
    when q_proj also gives an output gate)."""
    stacked = isinstance(qkv, mx.array)
    B, T = (qkv if stacked else qkv[0]).shape[:2]
    dtype = (qkv if stacked else qkv[0]).dtype
    backend = fused_backend(backend)
    kw = dict(eps=eps, rope_dims=rope_dims, traditional=traditional, base=base, scale=scale)
    if backend == "reference" or T != 1 or head_dim % 32 or rope_dims % 2 or rope_dims > head_dim:
        q, k, v = _parts(qkv, heads * q_width, kv_heads * head_dim)
        queries, keys = qk_norm_rope_reference(
            q.reshape(B, T, heads, q_width), k.reshape(B, T, kv_heads, head_dim), q_norm, k_norm, pos, **kw
        )
        values = v.reshape(B, T, kv_heads, head_dim).transpose(0, 2, 1, 3)
        return queries, mx.stack([keys, values])
    norm = q_norm is not None
    weights = [q_norm, k_norm] if norm else [gpu.float_array(0.0)] * 2  # unread without NORM
    if stacked:  # one array read at three offsets: no slices made
        inputs, row = [qkv, qkv, qkv], qkv.shape[-1]
        layout = [row, 0, row, heads * q_width, row, heads * q_width + kv_heads * head_dim]
    else:
        inputs = list(qkv)
        layout = [inputs[0].shape[-1], 0, inputs[1].shape[-1], 0, inputs[2].shape[-1], 0]
    outputs = gpu.kernel(
        backend, "qk_norm_rope.inc", "flashmoe_qk_norm_rope", NORM_ROPE_INPUTS, NORM_ROPE_OUTPUTS
    )(
        inputs=[*inputs, *weights, pos, gpu.float_array(eps, math.log2(base), scale)],
        template=[
            ("T", dtype),
            ("HD", head_dim),
            ("QW", q_width),
            ("ROPE_DIMS", rope_dims),
            ("TRADITIONAL", int(traditional)),
            ("NORM", int(norm)),
            ("NQ", heads),
            ("NK", kv_heads),
            ("BATCH", B),
            *zip(("Q_ROW", "Q_OFF", "K_ROW", "K_OFF", "V_ROW", "V_OFF"), layout),
        ],
        grid=(B * (heads + kv_heads) * 32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(B, heads, 1, head_dim), (2, B, kv_heads, 1, head_dim)],
        output_dtypes=[dtype] * 2,
        **gpu.output_init(),
    )
    return tuple(outputs)


def _parts(qkv, q_size: int, kv_size: int) -> tuple:
    """(q, k, v) of a stacked projection output, or of a tuple of the three."""
    if not isinstance(qkv, mx.array):
        return tuple(qkv)
    return qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]


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
