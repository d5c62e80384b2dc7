"""flashmoe against mlx-lm, the reference: the same checkpoint, the same decode loop, both engines.

Every loop here is generate.py's (prefill, decode_one_token, decode_tokens): mlx-lm's models take
`model(tokens, cache)` as flashmoe's do, so one loop serves both engines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from ..generate import decode_one_token, decode_tokens, prefill
from ..sample import make_sampler


def greedy_tokens(model: Any, make_cache: Callable[[], list], ids: list[int], steps: int) -> list[int]:
    """Greedy ids after `ids` for model(tokens (1, T), cache) -> (1, T, V): flashmoe or mlx-lm alike."""
    return list(greedy_decode(model, make_cache, ids, steps))


def greedy_tokens_per_second(
    model: Any, make_cache: Callable[[], list], ids: list[int], steps: int = 32, warmup: int = 2
) -> float:
    """Decode rate of the greedy loop (prefill and `warmup` first steps excluded), for either engine."""
    tokens = greedy_decode(model, make_cache, ids, steps + warmup)
    for _ in range(warmup):  # first calls compile and allocate: not timed
        next(tokens)
    tic = time.perf_counter()
    count = sum(1 for _ in tokens)
    return count / (time.perf_counter() - tic)


def greedy_decode(model: Any, make_cache: Callable[[], list], ids: list[int], steps: int):
    """The greedy ids after `ids` as generate.py's pipelined loop yields them (`steps` of them)."""
    greedy, cache = make_sampler(0.0), make_cache()
    prefill(model, mx.array(ids[:-1], dtype=mx.int32), cache, 512)
    first = decode_one_token(model, mx.array(ids[-1:], dtype=mx.int32), cache, greedy)
    return decode_tokens(model, first, cache, greedy, steps)


def forced_decode_logits(model: Any, prompt: list[int], tokens: list[int]) -> mx.array:
    """Logits (len(tokens), V) of each decode step (B=1, T=1: the kernel path) when fed `tokens` after `prompt`.

    Teacher-forced, so two models compared this way see the same inputs whatever they predict.
    """
    cache = model.make_cache()
    model(mx.array([prompt]), cache)
    return mx.concatenate([model(mx.array([[t]]), cache)[:, -1] for t in tokens])


def mlx_lm_model(directory, dtype: mx.Dtype | None = mx.float32) -> Any:
    """mlx-lm's model for a checkpoint, float parameters cast to `dtype` (None: as stored).

    float32 by default, as flashmoe computes on CPU. Raises ImportError without mlx-lm
    (a test and benchmark dependency, never a runtime one).
    """
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    model, _ = load_model(directory)
    if dtype is not None:
        model.update(
            tree_map(
                lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                model.parameters(),
            )
        )
    return model


def mlx_lm_cache(model: Any) -> Callable[[], list]:
    """A make_cache function for an mlx-lm model (for greedy_tokens / greedy_tokens_per_second)."""
    from mlx_lm.models.cache import make_prompt_cache

    return lambda: make_prompt_cache(model)


class WithCache:
    """An mlx-lm model with the make_cache() method forced_decode_logits calls (flashmoe's models have one)."""

    def __init__(self, model: Any):
        self.model, self.make_cache = model, mlx_lm_cache(model)

    def __call__(self, tokens: mx.array, cache: list) -> mx.array:
        return self.model(tokens, cache)


def rel_err(y: mx.array, ref: mx.array) -> float:
    """max |y - ref| / max |ref| in float32 (NaN when y has NaN, e.g. a poisoned row left unwritten)."""
    y, ref = np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32))
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
