"""Per-layer state carried between forward calls: keys/values, or conv + recurrent state.

KVCache                 keys, values (B, H_kv, T_seen, head_dim)
LinearAttentionCache    conv (B, conv_kernel - 1, conv_dim), state (B, H_v, D_v, D_k) float32
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of every position seen so far, for one full-attention layer."""

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions seen

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, H, T, hd) keys/values; return everything so far."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        return self.keys, self.values

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
