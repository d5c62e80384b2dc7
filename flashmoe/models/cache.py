"""Per-layer state carried between forward calls: keys/values, or conv + recurrent state.

KVCache                 kv (2, B, H_kv, capacity, head_dim) buffer (keys in [0], values in [1]), the
                        first `offset` positions filled
LinearAttentionCache    conv (B, conv_kernel - 1, conv_dim), state (B, H_v, D_v, D_k) float32
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of every position seen so far, for one full-attention layer.

    They live in one buffer kv (2, B, H_kv, capacity, hd), keys in kv[0] and values in kv[1], that
    grows STEP positions at a time, filled up to `offset`: appending a token writes one slice
    instead of copying the whole cache, and a compiled decode step (models.attention.Attention.decode)
    keeps its shapes while the buffer has room. One buffer, not two: a decode token is one slice
    write per layer (a graph node each, which on a GPU costs host time per token), and the decode
    kernels read keys and values at two offsets of the one input.
    """

    STEP = 256

    def __init__(self):
        self.kv: mx.array | None = None  # (2, B, H_kv, capacity, hd)
        self.offset = 0  # positions seen (filled)

    def reserve(self, n: int, batch: int, kv_heads: int, head_dim: int, dtype: mx.Dtype) -> None:
        """Room for n positions: the buffer grows to the next multiple of STEP when it is short."""
        capacity = 0 if self.kv is None else self.kv.shape[3]
        if n <= capacity:
            return
        extra = mx.zeros(
            (2, batch, kv_heads, -(-n // self.STEP) * self.STEP - capacity, head_dim), dtype=dtype
        )
        self.kv = extra if self.kv is None else mx.concatenate([self.kv, extra], axis=3)

    def make_room(self) -> None:
        """Room in the buffer (which exists) for one more token: a decode step's `write`."""
        _, B, H, _, hd = self.kv.shape
        self.reserve(self.offset + 1, B, H, hd, self.kv.dtype)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, H_kv, T, hd) keys/values; return everything so far, (B, H_kv, offset, hd)."""
        B, H, T, hd = keys.shape
        start = self.offset
        self.reserve(start + T, B, H, hd, keys.dtype)
        self.kv[..., start : start + T, :] = mx.stack([keys, values])  # (2, B, H_kv, T, hd): one write
        self.offset += T
        return self.kv[0, ..., : self.offset, :], self.kv[1, ..., : self.offset, :]

    def write(self, kv_new: mx.array) -> None:
        """Store one decode token's kv_new (2, B, H_kv, 1, hd) (key in [0], value in [1]) at `offset`
        (room reserved) and count it: one plain slice write (the buffer is updated in place when
        nothing else holds it)."""
        at = self.offset
        self.kv[..., at : at + 1, :] = kv_new
        self.offset += 1

    @property
    def state(self) -> list[mx.array]:
        return [] if self.kv is None else [self.kv]


class LinearAttentionCache:
    """The last conv_kernel - 1 conv inputs and the recurrent state, for one Gated DeltaNet layer."""

    def __init__(self):
        self.conv: mx.array | None = None
        self.state_: mx.array | None = None  # (B, H_v, D_v, D_k), float32
        self.offset = 0

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.conv, self.state_) if a is not None]
