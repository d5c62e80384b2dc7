"""Held-out perplexity: the measurement the notebooks, training and tests share."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..models.model import Model


def perplexity(model: Model, tokens, *, seq_len: int = 256, batch: int = 8, max_tokens: int | None = None) -> float:
    """exp(mean next-token cross-entropy) over `tokens` (1-D ids), in windows of seq_len + 1."""
    ids = np.asarray(tokens, dtype=np.int32)[: (max_tokens or len(tokens)) + 1]
    windows = [ids[i : i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) > 1]
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        for window in _same_length(windows[start : start + batch]):
            chunk = mx.array(np.stack(window))  # (b, L + 1)
            losses = token_nll(model(chunk[:, :-1]), chunk[:, 1:])  # (b, L)
            total += losses.sum().item()  # a sync per batch: this is a measurement
            count += losses.size
    return math.exp(total / count)


def token_nll(logits: mx.array, targets: mx.array) -> mx.array:
    """Negative log-likelihood of each target in nats: (B, T, V), (B, T) -> (B, T) float32."""
    logits = logits.astype(mx.float32)
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _same_length(windows: list) -> list[list]:
    """Group windows of equal length so each group stacks into one batch."""
    groups: dict[int, list] = {}
    for w in windows:
        groups.setdefault(len(w), []).append(w)
    return list(groups.values())
