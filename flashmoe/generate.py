"""Text generation, gpt-fast style: prefill the prompt in chunks, then decode one token at a time.

    B batch (1 here), T tokens in one forward call, V vocabulary

MLX is lazy: the next token's graph is built and started (`mx.async_eval`) before the
current one is read back, so the model computes while the caller handles text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import mlx.core as mx

from . import timing
from .errors import FlashMoeError
from .sample import Sampler, make_sampler
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
        model(tokens[None, start:start + chunk], cache)  # (1, chunk) -> logits, left unevaluated
        mx.eval(_cache_state(cache))  # bound the graph: one chunk of work at a time


def decode_one_token(model: Any, token: mx.array, cache: list, sampler: Sampler) -> mx.array:
    """The id that follows `token` (1,), as a lazy (1,) array."""
    timing.timer.restart()  # the caller's handling of the last token belongs to no phase
    logits = model(token[:, None], cache)[:, -1, :]  # (1, 1) -> (1, 1, V) -> (1, V)
    next_token = sampler(logits)
    timing.timer.mark("sampling", next_token)
    return next_token


def decode_tokens(model: Any, token: mx.array, cache: list, sampler: Sampler, n: int) -> Iterator[int]:
    """Yield `n` ids, starting with `token` (1,); each next one is computing while the caller handles this one."""
    for i in range(n):
        following = decode_one_token(model, token, cache, sampler) if i + 1 < n else None
        if following is not None:
            mx.async_eval(following)
        yield int(token.item())  # the one sync per token: hand the id to the caller
        token = following


def _prompt_ids(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    """The prompt as ids: a string is encoded, a list is taken as is."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise FlashMoeError("the prompt is empty: generation needs at least one token to start from")
    return ids


def _prompt_phase(model: Any, ids: list[int], sampler: Sampler, chunk: int) -> tuple[mx.array, list, float]:
    """Prefill all but the last prompt id, sample the first token; return it, the cache and prompt tokens/s."""
    cache = model.make_cache()
    tic = time.perf_counter()
    prefill(model, mx.array(ids[:-1], dtype=mx.int32), cache, max(1, chunk))
    first = decode_one_token(model, mx.array(ids[-1:], dtype=mx.int32), cache, sampler)  # (1,)
    mx.eval(first)  # sync: the prompt phase ends here, for prompt_tps
    return first, cache, len(ids) / (time.perf_counter() - tic)


def stream_generate(model: Any, tokenizer: Tokenizer, prompt: str | list[int], max_tokens: int = 64,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                    prefill_chunk: int = 512) -> Iterator[GenerationStep]:
    """Yield one GenerationStep per generated token until EOS or `max_tokens`."""
    ids = _prompt_ids(tokenizer, prompt)
    sampler = make_sampler(temperature, top_p, top_k)
    if max_tokens < 1:
        return
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
        yield GenerationStep(token, text, len(ids), prompt_tps, n + 1, (n + 1) / elapsed,
                             mx.get_peak_memory() / 1e9, finish)
        if stop:
            return


def generate(model: Any, tokenizer: Tokenizer, prompt: str | list[int], **kwargs: Any) -> str:
    """The whole generated text; keyword arguments as for stream_generate."""
    return "".join(step.text for step in stream_generate(model, tokenizer, prompt, **kwargs))


def format_stats(step: GenerationStep) -> str:
    """The closing statistics, as mlx_lm.generate prints them."""
    return (
        f"Prompt: {step.prompt_tokens} tokens, {step.prompt_tps:.3f} tokens-per-sec\n"
        f"Generation: {step.generation_tokens} tokens, {step.generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {step.peak_memory_gb:.3f} GB"
    )


