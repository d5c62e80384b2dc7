"""Text generation, gpt-fast style: prefill the prompt in chunks, then decode one token at a time.

    B batch (1 here), T tokens in one forward call, V vocabulary

MLX is lazy: the next token's graph is built and started (`mx.async_eval`) before the
current one is read back, so the model computes while the caller handles text.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from . import timing
from .errors import FlashMoeError
from .kernels.greedy import checked_pick, greedy_pick
from .sample import Sampler, greedy, make_sampler
from .tokenizer import Tokenizer


@dataclass
class GenerationStep:
    """One generated token, its text and the running statistics."""

    token: int
    text: str  # new text this token completes ("" mid-character and for EOS)
    prompt_tokens: int
    prompt_tps: float  # prompt tokens per second, first token included
    generation_tokens: int  # tokens generated so far, this one included
    generation_tps: float  # tokens per second since the first token
    peak_memory_gb: float
    finish_reason: str | None = None  # None, "stop" (EOS) or "length" (max_tokens)


def _cache_state(cache: list) -> list:
    """The arrays a cache holds, to force them at the end of a prefill chunk."""
    return [getattr(c, "state", []) for c in cache]


def prefill(model: Any, tokens: mx.array, cache: list, chunk: int) -> None:
    """Feed `tokens` (T,) through the cache `chunk` at a time; their logits are never computed."""
    for start in range(0, tokens.shape[0], chunk):
        model(tokens[None, start : start + chunk], cache)  # (1, chunk) -> logits, left unevaluated
        mx.eval(_cache_state(cache))  # bound the graph: one chunk of work at a time


# MLX's CPU backend aborts the process when two threads evaluate graphs at once
# (ml-explore/mlx#2133 and friends: its streams are not thread safe); generation steps take
# this lock, so a model shared between threads is used by one of them at a time.
MODEL_LOCK = threading.RLock()
_active = [0]  # generations in progress: with more than one, a step is finished before the lock is let go


def _settle() -> None:
    """With several generations, wait for whatever another one left computing before evaluating anew."""
    if not _overlap():
        mx.synchronize()


def _overlap() -> bool:
    """Whether the next step may still be computing when the lock is released (one generation only)."""
    return _active[0] <= 1


def decode_step(model: Any, token: mx.array, cache: list, sampler: Sampler) -> mx.array:
    """The id that follows `token` (1,) and a finiteness flag, as one lazy (2,) int32 array [id, finite].

    The flag rides along with the id, so reading both back is still the one sync per token;
    an id drawn from non-finite logits is replaced by 0, so it never indexes out of the table.
    """
    timing.timer.restart()  # the caller's handling of the last token belongs to no phase
    logits = model(token[:, None], cache)[:, -1, :]  # (1, 1) -> (1, 1, V) -> (1, V)
    if sampler is greedy:  # one launch on a GPU backend (kernels.greedy)
        packed = greedy_pick(logits, backend=getattr(model, "backend", "reference"))
    else:
        packed = checked_pick(logits, sampler)
    timing.timer.mark("sampling", packed)
    return packed


def decode_one_token(model: Any, token: mx.array, cache: list, sampler: Sampler) -> mx.array:
    """The id that follows `token` (1,), as a lazy (1,) array."""
    return decode_step(model, token, cache, sampler)[:1]


def _unpack(step: mx.array, i: int) -> int:
    """The id of a decode_step result (the one sync), or an error when its logits were not finite."""
    if step.shape == (1,):  # a plain id (decode_one_token's): nothing to check
        return int(step.item())
    token, finite = step.tolist()
    if not finite:
        raise FlashMoeError(
            f"generation step {i}: the model's logits are not finite (NaN or inf); the "
            "checkpoint's weights or the prompt drove it out of range, stopping"
        )
    return token


def decode_tokens(model: Any, token: mx.array, cache: list, sampler: Sampler, n: int) -> Iterator[int]:
    """Yield `n` ids, starting with `token` ((1,) id or (2,) decode_step result); each next one is computing
    while the caller handles this one. Non-finite logits stop it with a FlashMoeError naming the step."""
    for i in range(n):
        with MODEL_LOCK:
            _settle()
            following = decode_step(model, token[:1], cache, sampler) if i + 1 < n else None
            if following is not None:
                (mx.async_eval if _overlap() else mx.eval)(following)
            value = _unpack(token, i)  # the one sync per token: hand the id to the caller
        yield value
        token = following


def _prompt_ids(tokenizer: Tokenizer, prompt: str | list[int], vocab_size: int | None = None) -> list[int]:
    """The prompt as ids: a string is encoded, a list is taken as is; every id must be in [0, vocab_size)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        ids = []
        for t in prompt:
            if (
                isinstance(t, bool)
                or not isinstance(t, (int, np.integer))
                and not (isinstance(t, float) and t.is_integer())
            ):
                raise FlashMoeError(f"prompt token {t!r} is not an integer id")
            ids.append(int(t))
    if not ids:
        raise FlashMoeError("the prompt is empty: generation needs at least one token to start from")
    if vocab_size is not None:
        for position, t in enumerate(ids):
            if not 0 <= t < vocab_size:
                raise FlashMoeError(
                    f"prompt token {t} at position {position} is outside the model's vocabulary "
                    f"[0, {vocab_size}) (config.json vocab_size)"
                )
    return ids


def _vocab_size(model: Any) -> int | None:
    size = getattr(getattr(model, "args", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def _prompt_phase(model: Any, ids: list[int], sampler: Sampler, chunk: int) -> tuple[mx.array, list, float]:
    """Prefill all but the last prompt id, sample the first token; return it, the cache and prompt tokens/s."""
    cache = model.make_cache()
    tic = time.perf_counter()
    with MODEL_LOCK:
        _settle()
        prefill(model, mx.array(ids[:-1], dtype=mx.int32), cache, max(1, chunk))
        first = decode_step(model, mx.array(ids[-1:], dtype=mx.int32), cache, sampler)  # (2,) [id, finite]
        mx.eval(first)  # sync: the prompt phase ends here, for prompt_tps
    return first, cache, len(ids) / (time.perf_counter() - tic)


def stream_generate(
    model: Any,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    prefill_chunk: int = 512,
) -> Iterator[GenerationStep]:
    """Yield one GenerationStep per generated token until EOS or `max_tokens`."""
    ids = _prompt_ids(tokenizer, prompt, _vocab_size(model))
    sampler = make_sampler(temperature, top_p, top_k)
    for name, value, low in (
        ("seed", seed, 0),
        ("max_tokens", max_tokens, 0),
        ("prefill_chunk", prefill_chunk, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise FlashMoeError(f"{name} must be an integer >= {low}; got {value!r}")
    if seed >= 2**64:
        raise FlashMoeError(f"seed must be below 2**64; got {seed}")
    if max_tokens < 1:
        return
    with MODEL_LOCK:
        _active[0] += 1
    try:
        yield from _generate(model, tokenizer, ids, sampler, max_tokens, seed, prefill_chunk)
    finally:
        with MODEL_LOCK:
            _active[0] -= 1


def _generate(
    model: Any,
    tokenizer: Tokenizer,
    ids: list[int],
    sampler: Sampler,
    max_tokens: int,
    seed: int,
    prefill_chunk: int,
) -> Iterator[GenerationStep]:
    mx.random.seed(seed)
    first, cache, prompt_tps = _prompt_phase(model, ids, sampler, prefill_chunk)
    if timing.timer.enabled:
        timing.timer.reset()  # the per-phase table covers decode steps only
    tic = time.perf_counter()
    detokenizer = tokenizer.detokenizer()
    for n, token in enumerate(decode_tokens(model, first, cache, sampler, max_tokens)):
        stop = token in tokenizer.eos_token_ids
        text = "" if stop else detokenizer.add_token(token)
        finish = "stop" if stop else ("length" if n + 1 == max_tokens else None)
        if finish:
            text += detokenizer.finalize()
        elapsed = max(time.perf_counter() - tic, 1e-9)
        yield GenerationStep(
            token,
            text,
            len(ids),
            prompt_tps,
            n + 1,
            (n + 1) / elapsed,
            mx.get_peak_memory() / 1e9,
            finish,
        )
        if stop:
            return


def generate(model: Any, tokenizer: Tokenizer, prompt: str | list[int], **kwargs: Any) -> str:
    """The whole generated text; keyword arguments as for stream_generate."""
    return "".join(step.text for step in stream_generate(model, tokenizer, prompt, **kwargs))


def format_stats(step: GenerationStep, bytes_per_token: float | None = None, streamed: bool = False) -> str:
    """The closing statistics, as mlx_lm.generate prints them, with gpt-fast's bandwidth line.

    `bytes_per_token`: weight bytes one decode step reads (model.report.bytes_per_token["total"]; with
    expert streaming, `streamed=True`, the non-expert bytes plus the expert bytes read from disk per
    token); the bandwidth is that times the generation tokens-per-sec.
    """
    lines = [
        f"Prompt: {step.prompt_tokens} tokens, {step.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {step.generation_tokens} tokens, {step.generation_tps:.3f} tokens-per-sec",
    ]
    if bytes_per_token:
        what = (
            "weights read per token, the experts' as streamed from disk"
            if streamed
            else "weights read per token"
        )
        lines.append(
            f"Bandwidth: {bytes_per_token * step.generation_tps / 1e9:.3f} GB/s "
            f"({bytes_per_token / 1e6:.3f} MB of {what} x {step.generation_tps:.3f} tokens-per-sec)"
        )
    lines.append(f"Peak memory: {step.peak_memory_gb:.3f} GB")
    return "\n".join(lines)
