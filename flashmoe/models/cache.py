"""Per-layer state carried between forward calls: keys/values, or conv + recurrent state.

KVCache                 keys, values (B, H_kv, capacity, head_dim) buffers, the first `offset` filled
LinearAttentionCache    conv (B, conv_kernel - 1, conv_dim), state (B, H_v, D_v, D_k) float32
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of every position seen so far, for one full-attention layer.

    They live in buffers (B, H_kv, capacity, hd) that grow STEP positions at a time, filled up
    to `offset`: appending a token writes one slice instead of copying the whole cache, and a
    compiled decode step (models.attention.Attention.decode) keeps its shapes while the
    buffer has room.
    """

    STEP = 256

    def __init__(self):
        self.keys: mx.array | None = None  # (B, H_kv, capacity, hd) buffers
        self.values: mx.array | None = None
        self.offset = 0  # positions seen (filled)

    def reserve(self, n: int, batch: int, kv_heads: int, head_dim: int, dtype: mx.Dtype) -> None:
        """Room for n positions: the buffers grow to the next multiple of STEP when they are short."""
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if n <= capacity:
            return
        shape = (batch, kv_heads, -(-n // self.STEP) * self.STEP - capacity, head_dim)
        # two arrays: slice assignment replaces an array in place, so keys and values must not be one
        extra_k, extra_v = mx.zeros(shape, dtype=dtype), mx.zeros(shape, dtype=dtype)
        if self.keys is None:
            self.keys, self.values = extra_k, extra_v
        else:
            self.keys = mx.concatenate([self.keys, extra_k], axis=2)
            self.values = mx.concatenate([self.values, extra_v], axis=2)

    def make_room(self) -> None:
        """Room in the buffers (which exist) for one more token: a decode step's `write`."""
        B, H, _, hd = self.keys.shape
        self.reserve(self.offset + 1, B, H, hd, self.keys.dtype)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, H_kv, T, hd) keys/values; return everything so far, (B, H_kv, offset, hd)."""
        B, H, T, hd = keys.shape
        start = self.offset
        self.reserve(start + T, B, H, hd, keys.dtype)
        self.keys[..., start : start + T, :] = keys
        self.values[..., start : start + T, :] = values
        self.offset += T
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def write(self, keys: mx.array, values: mx.array) -> None:
        """Store one decode token's (B, H_kv, 1, hd) key and value at `offset` (room reserved) and
        count it: a plain slice write (the buffers are updated in place when nothing else holds them)."""
        at = self.offset
        self.keys[..., at : at + 1, :] = keys
        self.values[..., at : at + 1, :] = values
        self.offset += 1

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]


class LinearAttentionCache:
    """The last conv_kernel - 1 conv inputs and the recurrent state, for one Gated DeltaNet layer."""

    def __init__(self):
        self.conv: mx.array | None = None
        self.state_: mx.array | None = None  # (B, H_v, D_v, D_k), float32
        self.offset = 0

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.conv, self.state_) if a is not None]
