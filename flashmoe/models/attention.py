"""Full (softmax) attention for every supported model type, matching mlx-lm's modules.

Shapes: B batch, T new tokens, S tokens seen so far (cache included), D hidden,
H query heads, H_kv key/value heads (H a multiple of H_kv), hd head_dim.

What varies is asked of the architecture's row (models.args.Arch):
    output_gate     q_proj gives a query and an output gate per head (qwen3_next, qwen3_5_moe)
    partial_rotary  rotary on the first head_dim * partial_rotary_factor dims only
    qk_norm         RMSNorm on each query and key head (all but qwen2_moe)
    qkv_bias        q/k/v carry an additive bias, o_proj none (qwen2_moe)
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import FlashMoeError
from ..kernels.attention import decode_attention, qk_norm_rope
from .args import ModelArgs
from .cache import KVCache
from .layers import Linear, Norm, Projections
from .store import TensorStore


def rope_scale(rope_scaling: dict | None) -> float:
    """The position scale mx.fast.rope takes: 1 for default rotary, 1/factor for "linear"."""
    if not rope_scaling:
        return 1.0
    rope_type = rope_scaling.get("type") or rope_scaling.get("rope_type", "default")
    if rope_type == "default":
        return 1.0
    if rope_type == "linear":
        return 1.0 / rope_scaling["factor"]
    raise FlashMoeError(
        f"config.json: rope_scaling type {rope_type!r} is not supported; flashmoe runs 'default' and 'linear'"
    )


class Attention:
    """Multi-head attention with grouped key/value heads and a KV cache: x (B, T, D) -> (B, T, D)."""

    def __init__(self, store: TensorStore, prefix: str, args: ModelArgs):
        arch = args.arch
        self.gated, self.qk_norm = arch.output_gate, arch.qk_norm
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim  # (ModelArgs applies arch.head_dim_from_hidden)
        self.scale = self.head_dim**-0.5
        self.eps = args.rms_norm_eps
        self.rope_dims = (
            int(self.head_dim * args.partial_rotary_factor) if arch.partial_rotary else self.head_dim
        )
        self.rope_traditional = args.rope_traditional and arch.config_rope_traditional
        self.rope_base, self.rope_scale = args.rope_theta, rope_scale(args.rope_scaling)

        qkv_bias = args.attention_bias or arch.qkv_bias
        o_bias = args.attention_bias and not arch.qkv_bias
        q_width = self.n_heads * self.head_dim * (2 if self.gated else 1)
        kv_width = self.n_kv_heads * self.head_dim
        q_proj = _projection(store, f"{prefix}.q_proj", qkv_bias, q_width)
        k_proj = _projection(store, f"{prefix}.k_proj", qkv_bias, kv_width)
        v_proj = _projection(store, f"{prefix}.v_proj", qkv_bias, kv_width)
        self.qkv_proj = Projections(q_proj, k_proj, v_proj)
        self.o_proj = _projection(store, f"{prefix}.o_proj", o_bias, args.hidden_size)
        if self.qk_norm:
            self.q_norm = store.take(f"{prefix}.q_norm.weight")  # (hd,)
            self.k_norm = store.take(f"{prefix}.k_norm.weight")  # (hd,)

    def __call__(
        self, x: mx.array, cache: KVCache | None = None, residual: mx.array | None = None
    ) -> mx.array:
        """x (B, T, D) -> attention's output (B, T, D), plus `residual` (added by o_proj) when given."""
        B, T, _ = x.shape
        offset = 0 if cache is None else cache.offset
        queries, keys, values, gate = self._heads(x, offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)  # (B, H_kv, S, hd)

        # "causal" aligns the last query with the last key, so a chunk after a cached prefix
        # sees the whole prefix (as mlx-lm's KVCache.make_mask); one new token sees everything
        mask = "causal" if T > 1 else None
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return self._output(out, gate, residual)

    def decode(
        self,
        x: mx.array,
        kv: mx.array,
        pos: mx.array,
        residual: mx.array | None = None,
        norm: Norm | None = None,
    ) -> list[mx.array]:
        """One new token per sequence as a pure function of the cache buffer, for a compiled step.

        x (B, 1, D); kv (2, B, H_kv, capacity, hd) (keys, values: KVCache.kv) with positions [0, pos)
        filled; pos (1,) int32; norm: the layer's input RMSNorm, which the q/k/v kernel applies as it
        reads x. Returns [out (B, 1, D) (+ residual), kv_new (2, B, H_kv, 1, hd)]: the caller writes
        the new key and value at pos with one slice write (KVCache.write). The shapes do not change
        as pos grows, so the step is traced once per buffer capacity. One launch takes the
        projections' output as it comes (qk_norm_rope: norms and rotary embeddings of q and k, v
        copied out, kv_new in the buffer's layout), attention another, which reads the buffer whole
        and writes heads side by side as o_proj reads them: no slices, stacks or reshapes between.
        """
        qkv = self.qkv_proj.stacked(x, norm)  # (B, 1, W) when the three are stacked, else (q, k, v)
        queries, kv_new = qk_norm_rope(
            qkv,
            self.q_norm if self.qk_norm else None,
            self.k_norm if self.qk_norm else None,
            pos,
            heads=self.n_heads,
            kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            q_width=self.head_dim * (2 if self.gated else 1),
            eps=self.eps,
            rope_dims=self.rope_dims,
            traditional=self.rope_traditional,
            base=self.rope_base,
            scale=self.rope_scale,
            backend=self.o_proj.backend,
        )  # (B, H, 1, hd), (2, B, H_kv, 1, hd)
        # the gated variants' output gate sits in q_proj's output (in the stacked array from column 0):
        # the attention kernel applies it as it writes
        gate = ((qkv if isinstance(qkv, mx.array) else qkv[0]), 0) if self.gated else None
        out = decode_attention(
            queries, kv, kv_new, pos, scale=self.scale, flat=True, backend=self.o_proj.backend, gate=gate
        )  # (B, 1, H * hd)
        return [self.o_proj(out, residual), kv_new]

    def _heads(self, x: mx.array, offset: int | mx.array) -> tuple:
        """x (B, T, D) at positions offset.. -> queries (B, H, T, hd), keys and values (B, H_kv, T, hd),
        normed and rotated as the architecture asks, and the output gate (B, T, H * hd) or None."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x)
        queries, gate = self._queries(q)  # (B, T, H, hd)
        keys = k.reshape(B, T, self.n_kv_heads, self.head_dim)
        values = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            queries = mx.fast.rms_norm(queries, self.q_norm, self.eps)
            keys = mx.fast.rms_norm(keys, self.k_norm, self.eps)
        queries = self._rope(queries.transpose(0, 2, 1, 3), offset)
        keys = self._rope(keys.transpose(0, 2, 1, 3), offset)
        return queries, keys, values.transpose(0, 2, 1, 3), gate

    def _output(self, out: mx.array, gate: mx.array | None, residual: mx.array | None) -> mx.array:
        """Attention's (B, H, T, hd) back to (B, T, D): heads side by side, gated, o_proj (+ residual)."""
        B, _, T, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)  # (B, T, H * hd)
        if gate is not None:
            out = out * mx.sigmoid(gate)
        return self.o_proj(out, residual)

    def _queries(self, q: mx.array) -> tuple[mx.array, mx.array | None]:
        """Per-head queries from q_proj's output, and for the gated variants the output gate it interleaves."""
        B, T, _ = q.shape
        q = q.reshape(B, T, self.n_heads, -1)  # (B, T, H, hd or 2 * hd)
        if not self.gated:
            return q, None
        queries, gate = mx.split(q, 2, axis=-1)  # (B, T, H, hd) each
        return queries, gate.reshape(B, T, -1)  # gate (B, T, H * hd)

    def _rope(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(
            x,
            self.rope_dims,
            traditional=self.rope_traditional,
            base=self.rope_base,
            scale=self.rope_scale,
            offset=offset,
        )


def _projection(store: TensorStore, prefix: str, bias: bool, out_features: int) -> Linear:
    """store.linear(prefix), checked to give `out_features` outputs."""
    layer = store.linear(prefix, bias=bias)
    if layer.out_features != out_features:
        raise FlashMoeError(
            f"{store.source}: '{prefix}.weight' has {layer.out_features} output rows; the config implies {out_features}"
        )
    return layer
