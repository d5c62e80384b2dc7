"""Held-out perplexity: the measurement the notebooks, training and tests share.

One function scores (`perplexity`, or `measure` for the number with its setting), one held-out set
(training/data/heldout.bin: 39,251 tokens of 16 whole standard-library files). A perplexity means
little without its setting: how many tokens, in windows of what length, with which K and quant
mode. `Perplexity.label()` says all of it. The windows start at multiples of `seq_len` from the
first token, so a budget of N tokens scores exactly the first N/seq_len windows of the full
evaluation (the model card's, over all tokens): the same windows, fewer of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..models.model import Model


@dataclass
class Perplexity:
    """exp(mean next-token NLL) and the setting it was measured in."""

    value: float
    tokens: int  # next-token predictions scored
    seq_len: int  # window length (context the model sees at most)
    window_nll: np.ndarray  # (windows,) mean NLL per window, in order
    k: int | None = None  # experts per token of the model measured
    quant: str | None = None  # the quant mode it was loaded with, as the caller says

    @property
    def windows(self) -> int:
        return len(self.window_nll)

    def window_perplexities(self) -> np.ndarray:
        """exp(mean NLL) of each window on its own: how much the text, not the model, moves the figure."""
        return np.exp(self.window_nll)

    def setting(self) -> str:
        """'1,024 held-out tokens, 4 windows of 256, K=4, quant="config"' (the parts known)."""
        parts = [
            f"{self.tokens:,} held-out tokens",
            f"{self.windows} window{'s' * (self.windows != 1)} of {self.seq_len}",
        ]
        if self.k is not None:
            parts.append(f"K={self.k}")
        if self.quant is not None:
            parts.append(f'quant="{self.quant}"')
        return ", ".join(parts)

    def label(self) -> str:
        """'14.63 (1,024 held-out tokens, 4 windows of 256, K=4, quant="config")'."""
        return f"{self.value:.2f} ({self.setting()})"


def windows(tokens, seq_len: int = 256, max_tokens: int | None = None) -> list[np.ndarray]:
    """The windows of seq_len + 1 ids that score the first `max_tokens` predictions (all when None).

    Consecutive windows share one id: the last target of one is the first input of the next.
    """
    ids = np.asarray(tokens, dtype=np.int32)[: (max_tokens or len(tokens)) + 1]
    return [w for w in (ids[i : i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)) if len(w) > 1]


def window_nlls(
    model: Model, tokens, *, seq_len: int = 256, batch: int = 8, max_tokens: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sum of NLL, predictions) per window, in window order."""
    ws = windows(tokens, seq_len, max_tokens)
    sums, counts = np.zeros(len(ws)), np.array([len(w) - 1 for w in ws])
    for start in range(0, len(ws), batch):
        for group in _same_length(list(range(start, min(start + batch, len(ws)))), ws):
            chunk = mx.array(np.stack([ws[i] for i in group]))  # (b, L + 1)
            losses = token_nll(model(chunk[:, :-1]), chunk[:, 1:]).sum(axis=-1)  # (b,)
            sums[group] = np.array(losses)  # a sync per batch: this is a measurement
    return sums, counts


def measure(
    model: Model,
    tokens,
    *,
    seq_len: int = 256,
    batch: int = 8,
    max_tokens: int | None = None,
    quant: str | None = None,
) -> Perplexity:
    """Perplexity of `model` on `tokens` (1-D ids) with its setting; K read from the model, `quant` as given."""
    sums, counts = window_nlls(model, tokens, seq_len=seq_len, batch=batch, max_tokens=max_tokens)
    k = model.layers[model.moe_layers[0]].mlp.k if getattr(model, "moe_layers", None) else None
    return Perplexity(
        math.exp(sums.sum() / counts.sum()), int(counts.sum()), seq_len, sums / counts, k, quant
    )


def perplexity(
    model: Model, tokens, *, seq_len: int = 256, batch: int = 8, max_tokens: int | None = None
) -> float:
    """exp(mean next-token cross-entropy) over `tokens` (1-D ids), in windows of seq_len + 1."""
    return measure(model, tokens, seq_len=seq_len, batch=batch, max_tokens=max_tokens).value


def token_nll(logits: mx.array, targets: mx.array) -> mx.array:
    """Negative log-likelihood of each target in nats: (B, T, V), (B, T) -> (B, T) float32."""
    logits = logits.astype(mx.float32)
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _same_length(indices: list[int], ws: list[np.ndarray]) -> list[list[int]]:
    """Group window indices by window length so each group stacks into one batch."""
    groups: dict[int, list[int]] = {}
    for i in indices:
        groups.setdefault(len(ws[i]), []).append(i)
    return list(groups.values())
