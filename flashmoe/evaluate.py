"""Held-out perplexity and routing statistics: the measurements the notebooks and tests share."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .model import Model


def perplexity(model: Model, tokens, *, seq_len: int = 256, batch: int = 8, max_tokens: int | None = None) -> float:
    """exp(mean next-token cross-entropy) over `tokens` (1-D ids), in windows of seq_len + 1."""
    ids = np.asarray(tokens, dtype=np.int32)[: (max_tokens or len(tokens)) + 1]
    windows = [ids[i : i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) > 1]
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        for window in _same_length(windows[start : start + batch]):
            chunk = mx.array(np.stack(window))  # (b, L + 1)
            logits = model(chunk[:, :-1]).astype(mx.float32)  # (b, L, V)
            losses = nn_cross_entropy(logits, chunk[:, 1:])
            total += losses.sum().item()  # a sync per batch: this is a measurement
            count += losses.size
    return math.exp(total / count)


def nn_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross-entropy, (B, T, V) logits against (B, T) ids -> (B, T)."""
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _same_length(windows: list) -> list[list]:
    """Group windows of equal length so each group stacks into one batch."""
    groups: dict[int, list] = {}
    for w in windows:
        groups.setdefault(len(w), []).append(w)
    return list(groups.values())


def expert_load(model: Model, tokens: mx.array) -> dict[int, np.ndarray]:
    """Per MoE layer, the share of routed slots each expert gets for `tokens` (B, T)."""
    model(tokens)
    loads = {}
    for layer, routing in model.routing().items():
        experts = np.array(routing.experts).reshape(-1)
        loads[layer] = np.bincount(experts, minlength=model.args.num_experts) / experts.size
    return loads


def routing_entropy(load: np.ndarray) -> float:
    """Entropy (bits) of an expert-load distribution; log2(E) when perfectly balanced."""
    p = load[load > 0]
    return float(-(p * np.log2(p)).sum())
