"""Next-token choice from logits: greedy, or temperature with top-k / top-p (nucleus) filtering."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from .errors import FlashMoeError

Sampler = Callable[[mx.array], mx.array]  # logits (B, V) -> token ids (B,) int32


def greedy(logits: mx.array) -> mx.array:
    """The most likely id of each row: (B, V) -> (B,)."""
    return mx.argmax(logits, axis=-1).astype(mx.int32)


def top_k_filter(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits of each row, set the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    dropped = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]  # (B, V - k) ids outside the top k
    return mx.put_along_axis(logits, dropped, mx.array(-float("inf"), logits.dtype), axis=-1)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely ids whose probability reaches p, set the rest to -inf."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)  # (B, V) most likely first
    probs = mx.take_along_axis(mx.softmax(logits, axis=-1), order, axis=-1)  # (B, V) sorted
    before = mx.cumsum(probs, axis=-1) - probs  # mass of the ids ahead of each one; the top id has 0
    drop_sorted = before >= p
    drop = mx.put_along_axis(mx.zeros_like(drop_sorted), order, drop_sorted, axis=-1)  # back to vocab order
    return mx.where(drop, mx.array(-float("inf"), logits.dtype), logits)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> Sampler:
    """A function from logits (B, V) to ids (B,); random draws use mx.random, which the caller seeds."""
    numbers = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in (temperature, top_p, top_k)
    )
    if (
        not numbers
        or not math.isfinite(temperature)
        or not math.isfinite(top_p)
        or temperature < 0
        or not 0 < top_p <= 1
        or top_k < 0
        or top_k != int(top_k)
    ):
        raise FlashMoeError(
            f"sampling needs a finite temperature >= 0, 0 < top_p <= 1 and an integer top_k >= 0; "
            f"got temperature={temperature}, top_p={top_p}, top_k={top_k}"
        )
    top_k = int(top_k)
    if temperature == 0:
        return greedy

    def sample(logits: mx.array) -> mx.array:
        scaled = logits.astype(mx.float32) / temperature
        scaled = top_p_filter(top_k_filter(scaled, top_k), top_p)
        return mx.random.categorical(scaled, axis=-1).astype(mx.int32)

    return sample
