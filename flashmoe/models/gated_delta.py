"""Gated DeltaNet, the linear-attention layer of the hybrid models (qwen3_next, qwen3_5_moe).

Shapes: B batch, T new tokens, D hidden, H_k / H_v key / value heads (H_v a multiple of H_k),
d_k / d_v their widths, C = 2 * H_k * d_k + H_v * d_v conv channels, W conv kernel width.

Per token: project to q, k, v (conv channels), z (output gate), b (update rate), a (decay);
run q, k, v through a depthwise causal conv and silu; L2-normalise q and k; update the
recurrent state S (B, H_v, d_v, d_k) with the gated delta rule; read out with q; RMSNorm
gated by silu(z); project back to D. Two checkpoint layouts hold the same projections:

    fused (qwen3_next)          in_proj_qkvz, in_proj_ba, interleaved per key head
    split (arch.split_in_proj)  in_proj_qkv, in_proj_z, in_proj_b, in_proj_a
"""

from __future__ import annotations

import mlx.core as mx

from .. import kernels
from ..errors import FlashMoeError
from ..kernels.gated_delta import QK_L2_EPS, gated_delta_step, native_step_runs, recurrence, split_key_heads
from .args import ModelArgs
from .cache import LinearAttentionCache
from .layers import Norm, Projections, silu
from .store import TensorStore


class GatedDeltaNet:
    """Gated delta rule linear attention with conv + recurrent state in a cache: x (B, T, D) -> (B, T, D)."""

    def __init__(self, store: TensorStore, prefix: str, args: ModelArgs):
        self.n_k, self.n_v = args.linear_num_key_heads, args.linear_num_value_heads
        self.d_k, self.d_v = args.linear_key_head_dim, args.linear_value_head_dim
        if self.n_k <= 0 or self.n_v % self.n_k:
            raise FlashMoeError(
                f"config.json: linear_num_value_heads ({self.n_v}) must be a multiple of "
                f"linear_num_key_heads ({self.n_k})"
            )
        self.key_dim, self.value_dim = self.n_k * self.d_k, self.n_v * self.d_v
        self.conv_dim = 2 * self.key_dim + self.value_dim  # C
        self.width = args.linear_conv_kernel_dim  # W
        self.eps = args.rms_norm_eps
        self.backend = store.backend  # a GPU (or native, float32) backend: a decode token in one kernel

        self.split = args.arch.split_in_proj
        names = ("qkv", "z", "b", "a") if self.split else ("qkvz", "ba")
        # split: [qkv, z, b, a]; fused: [qkvz, ba]
        self.in_proj = Projections(*(store.linear(f"{prefix}.in_proj_{name}") for name in names))
        self.conv_weight = self._conv_weight(store, f"{prefix}.conv1d.weight")  # (W, C)
        # kept as stored: the decay is computed in float32 from A_log, and a + dt_bias
        # promotes as mlx-lm's does when the checkpoint keeps these in float32
        self.A_log = store.take(f"{prefix}.A_log", cast=False)  # (H_v,)
        self.dt_bias = store.take(f"{prefix}.dt_bias", cast=False)  # (H_v,)
        self.norm = store.take(f"{prefix}.norm.weight")  # (d_v,)
        self.out_proj = store.linear(f"{prefix}.out_proj")

    def __call__(
        self,
        x: mx.array,
        cache: LinearAttentionCache | None = None,
        residual: mx.array | None = None,
        norm: Norm | None = None,
    ) -> mx.array:
        """x (B, T, D) (through the RMSNorm `norm` first when given: the layer's input norm, which a
        decode token's in_proj kernel applies as it reads x) -> the mixer's output (B, T, D), plus
        `residual` (added by out_proj) when given."""
        B, T, _ = x.shape
        one_step = self.backend in kernels.GPU_BACKENDS or native_step_runs(self.backend, x.dtype)
        if T == 1 and cache is not None and one_step:
            return self.out_proj(self._fused_step(x, cache, norm), residual)
        x = kernels.rms_norm(x, norm)
        qkv, z, b, a = self._project(x)  # (B, T, C), (B, T, H_v, d_v), (B, T, H_v) x2
        conv = silu(self._conv(qkv, cache))  # (B, T, C)
        q, k, v = mx.split(conv, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(B, T, self.n_k, self.d_k)  # (B, T, H_k, d_k)
        k = k.reshape(B, T, self.n_k, self.d_k)
        v = v.reshape(B, T, self.n_v, self.d_v)  # (B, T, H_v, d_v)
        q, k = self._normalize_qk(q, k)

        decay = mx.exp(-mx.exp(self.A_log.astype(mx.float32)) * _softplus(a + self.dt_bias))  # (B, T, H_v)
        beta = mx.sigmoid(b)  # (B, T, H_v)
        state = None if cache is None else cache.state_  # (B, H_v, d_v, d_k) float32
        if state is None:  # a fresh sequence: zeros given explicitly (as mlx-lm does), not left to the op
            state = mx.zeros((B, self.n_v, self.d_v, self.d_k), dtype=mx.float32)
        out, state = recurrence(q, k, v, decay, beta, state, backend=self.backend)  # out (B, T, H_v, d_v)
        if cache is not None:
            cache.state_ = state
            cache.offset += T

        out = self._gated_norm(out, z)
        return self.out_proj(out.reshape(B, T, -1), residual)  # (B, T, H_v * d_v) -> (B, T, D)

    def _fused_step(self, x: mx.array, cache: LinearAttentionCache, norm: Norm | None = None) -> mx.array:
        """One decode token in one launch (kernels.gated_delta, a GPU's or the native CPU kernel): conv,
        gating, state update, gated norm.

        The same math as the lines of __call__ (its reference is that path); returns (B, 1, H_v * d_v).
        The projections go in as they come out: their stacked output (one array the kernel reads at
        each part's offset) or, when they are not stacked, qkv, z, b, a (qwen3_next: qkvz, ba, grouped
        by key head); no copies or slices split them.
        """
        B = x.shape[0]
        out = self.in_proj.stacked(x, norm)
        if isinstance(out, mx.array):  # (B, 1, sum of widths): every part read where it lies
            starts = [0, *self.in_proj.ends]
            starts = starts if self.split else [starts[0], starts[0], starts[1], starts[1]]
            parts, layout = [out] * 4, tuple((out.shape[-1], at) for at in starts)
        else:
            parts = list(out) if self.split else [out[0], out[0], out[1], out[1]]
            layout = None
        qkv, z, b, a = parts
        past = cache.conv
        if past is None:
            past = mx.zeros((B, self.width - 1, self.conv_dim), dtype=x.dtype)
        state = cache.state_
        if state is None:
            state = mx.zeros((B, self.n_v, self.d_v, self.d_k), dtype=mx.float32)
        out, cache.state_, cache.conv = gated_delta_step(
            qkv,
            past,
            self.conv_weight,
            z,
            b,
            a,
            self.A_log,
            self.dt_bias,
            self.norm,
            state,
            n_k=self.n_k,
            n_v=self.n_v,
            d_k=self.d_k,
            d_v=self.d_v,
            rms_eps=self.eps,
            key_heads=not self.split,
            layout=layout,
            flat=True,
            backend=self.backend,
        )
        cache.offset += 1
        return out  # (B, 1, H_v * d_v)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """qkv in conv-channel order [q | k | v], z per value head, b and a per value head."""
        B, T, _ = x.shape
        if self.split:
            qkv, z, b, a = self.in_proj(x)
            return qkv, z.reshape(B, T, self.n_v, self.d_v), b, a  # z (B, T, H_v, d_v)
        # the fused layout groups everything by key head: [q, k, v (r heads), z (r heads)] per head
        qkvz, ba = self.in_proj(x)
        return split_key_heads(qkvz, ba, self.n_k, self.n_v, self.d_k, self.d_v)

    def _conv(self, qkv: mx.array, cache: LinearAttentionCache | None) -> mx.array:
        """Depthwise causal conv over the cached last W - 1 inputs and the new T: (B, T, C)."""
        B, T, C = qkv.shape
        keep = self.width - 1
        past = None if cache is None else cache.conv
        if past is None:  # a fresh sequence starts from zeros, as the reference does
            past = mx.zeros((B, keep, C), dtype=qkv.dtype)
        window = mx.concatenate([past, qkv], axis=1)  # (B, W - 1 + T, C)
        if cache is not None:
            cache.conv = mx.contiguous(window[:, window.shape[1] - keep :])  # (B, W - 1, C)
        out = window[:, :T] * self.conv_weight[0]
        for j in range(1, self.width):
            out = out + window[:, j : j + T] * self.conv_weight[j]
        return out

    def _normalize_qk(self, q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
        """Unit-length q and k, q times d_k**-1 and k times d_k**-0.5 (mlx-lm's normalize_qk)."""
        # rms_norm divides by sqrt(mean(x^2) + eps'), so eps' = eps / d_k matches an l2 norm
        # with eps added to sum(x^2); the rms itself carries a factor d_k**0.5
        inv = self.d_k**-0.5
        eps = QK_L2_EPS * inv**2
        return (inv**2) * mx.fast.rms_norm(q, None, eps), inv * mx.fast.rms_norm(k, None, eps)

    def _gated_norm(self, out: mx.array, z: mx.array) -> mx.array:
        """RMSNorm(out) * silu(z), the product in float32 (mlx-lm's precise_swiglu)."""
        normed = mx.fast.rms_norm(out, self.norm, self.eps)  # (B, T, H_v, d_v)
        return (silu(z.astype(mx.float32)) * normed.astype(mx.float32)).astype(out.dtype)

    def _conv_weight(self, store: TensorStore, name: str) -> mx.array:
        """The depthwise kernel as mlx-lm saves it, (C, W, 1), turned to (W, C)."""
        weight = store.take(name)
        expected = (self.conv_dim, self.width, 1)
        if tuple(weight.shape) != expected:
            raise FlashMoeError(
                f"{store.source}: '{name}' has shape {tuple(weight.shape)}; expected {expected} "
                f"(mlx-lm's sanitized layout: channels, kernel width, 1)"
            )
        # row-contiguous: a transposed view would be copied by every decode step's kernel launch (a copy
        # launch per layer and token, seen on the H200)
        return mx.contiguous(weight[:, :, 0].T)  # (W, C)


def _softplus(x: mx.array) -> mx.array:
    return mx.logaddexp(x, 0)
