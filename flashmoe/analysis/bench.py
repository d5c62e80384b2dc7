"""Measurements for the profiling notebook and benchmarks: bandwidth, kernels, formulas, decode phases, tokens/s.

Every function here syncs (mx.eval) on purpose: these are measurements. Times are medians of
repeats after a warm-up. Tests check what the numbers mean (sums, agreement), never their size.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from .. import kernels, timing
from ..generate import decode_one_token, prefill, stream_generate
from ..sample import make_sampler
from .parity import greedy_tokens_per_second, rel_err


def median_seconds(fn: Callable[[], Any], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of `fn()` with its result evaluated (a sync: this is a measurement)."""
    def run():
        result = fn()
        if result is not None:  # numpy work returns None
            mx.eval(result)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def measure_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """This machine's memory bandwidth in GB/s: bytes read + written by a large copy over its time.

    On a GPU the copy is MLX's `a * 2`; on the CPU, MLX's elementwise ops are compute-bound
    (~0.5 GB/s here), so the CPU figure is numpy's copy, which memory bounds.
    """
    n = megabytes * 2**20 // 4
    if mx.default_device() == mx.cpu:
        a, b = np.ones(n, np.float32), np.empty(n, np.float32)
        seconds = median_seconds(lambda: np.copyto(b, a), repeats=repeats, warmup=1)
        return 2 * n * 4 / seconds / 1e9
    a = mx.random.uniform(shape=(n,))
    mx.eval(a)
    seconds = median_seconds(lambda: a * 2, repeats=repeats, warmup=1)
    return 2 * n * 4 / seconds / 1e9


def weight_bytes_per_token(directory, k: int | None = None) -> dict[str, float]:
    """Weight bytes one decode step reads, from the checkpoint's headers (gpt-fast's figure).

    Every non-expert tensor in full (the embedding table: one row), and K/E of each stacked expert
    tensor (the K experts a token routes to). Returns {"dense", "experts", "total"} in bytes.
    """
    from ..loader import read_config
    from ..models.args import ModelArgs
    from ..safetensors import nbytes, tensor_infos

    args = ModelArgs.from_config(read_config(directory))
    share = (k or args.num_experts_per_tok) / max(args.num_experts, 1)
    dense = experts = 0.0
    for name, info in tensor_infos(directory).items():
        size = nbytes(info.dtype, info.shape)
        if ".switch_mlp." in name or ".experts." in name:
            experts += size * share
        elif "embed_tokens" in name and not args.tie_word_embeddings:
            dense += size / info.shape[0]  # one row of the table per token
        else:
            dense += size
    return {"dense": dense, "experts": experts, "total": dense + experts}


@dataclass
class KernelTiming:
    """One dequant-matvec configuration: median seconds and the bandwidth it achieved."""

    backend: str
    bits: int
    group_size: int
    out_dim: int
    in_dim: int
    seconds: float
    bytes: int  # packed weights + scales + biases + x + y

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9


def random_quantized(out_dim: int, in_dim: int, bits: int, group_size: int, seed: int = 0):
    """A random float32 (out, in) matrix, its quantized form (w, scales, biases), and an input x (in,)."""
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    dense = mx.random.normal((out_dim, in_dim), key=k1) * 0.05
    w, scales, biases = mx.quantize(dense, group_size=group_size, bits=bits)
    x = mx.random.normal((in_dim,), key=k2)
    mx.eval(dense, w, scales, biases, x)
    return dense, (w, scales, biases), x


def time_kernel(backend: str, bits: int, group_size: int, out_dim: int, in_dim: int,
                repeats: int = 10) -> KernelTiming:
    """Median time of flashmoe.kernels.dequant_matvec for one shape on one backend."""
    _, (w, scales, biases), x = random_quantized(out_dim, in_dim, bits, group_size)
    seconds = median_seconds(
        lambda: kernels.dequant_matvec(x, w, scales, biases, bits=bits, group_size=group_size, backend=backend),
        repeats=repeats)
    moved = w.nbytes + scales.nbytes + biases.nbytes + x.nbytes + out_dim * x.itemsize
    return KernelTiming(backend, bits, group_size, out_dim, in_dim, seconds, moved)


def kernel_errors(bits: int, group_size: int, out_dim: int = 256, in_dim: int = 512, seed: int = 0) -> dict[str, float]:
    """Per available backend, max|kernel - mx.dequantize @ x| / max|mx.dequantize @ x| (float32)."""
    _, (w, scales, biases), x = random_quantized(out_dim, in_dim, bits, group_size, seed)
    ref = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits) @ x  # (out,)
    errors = {}
    for backend in kernels.available_backends():
        y = kernels.dequant_matvec(x, w, scales, biases, bits=bits, group_size=group_size, backend=backend)
        errors[backend] = rel_err(y, ref)
    return errors


# --------------------------------------------------------------------------- the two formulas


def naive_form(q: mx.array, scales: mx.array, biases: mx.array, x: mx.array, group_size: int) -> mx.array:
    """sum over inputs of (q*s + b) * x: dequantize each weight, then multiply. q (out, in) codes -> (out,)."""
    out_dim, in_dim = q.shape
    qg = q.reshape(out_dim, -1, group_size)  # (out, groups, g)
    w = qg * scales[..., None] + biases[..., None]
    return (w * x.reshape(1, -1, group_size)).sum(axis=(-1, -2))


def fma_form(q: mx.array, scales: mx.array, biases: mx.array, x: mx.array, group_size: int) -> mx.array:
    """sum over inputs of q*(s*x) + b*x, with s*x and b*x formed per input once (the kernels' FMA form)."""
    out_dim, in_dim = q.shape
    xg = x.reshape(1, -1, group_size)  # (1, groups, g)
    sx, bx = scales[..., None] * xg, biases[..., None] * xg  # (out, groups, g)
    return (q.reshape(out_dim, -1, group_size) * sx + bx).sum(axis=(-1, -2))


@dataclass
class FormulaComparison:
    """Median seconds and relative error (against mx.dequantize @ x) of the naive and FMA forms."""

    naive_seconds: float
    fma_seconds: float
    naive_error: float
    fma_error: float


def compare_formulas(out_dim: int, in_dim: int, bits: int = 4, group_size: int = 64,
                     repeats: int = 10) -> FormulaComparison:
    """Time and check both formulas as plain MLX ops on unpacked float32 codes."""
    _, (w, scales, biases), x = random_quantized(out_dim, in_dim, bits, group_size)
    q = kernels.reference.unpack(w, bits).astype(mx.float32)  # (out, in) codes
    s, b = scales.astype(mx.float32), biases.astype(mx.float32)
    ref = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits) @ x
    naive = lambda: naive_form(q, s, b, x, group_size)  # noqa: E731
    fma = lambda: fma_form(q, s, b, x, group_size)  # noqa: E731
    return FormulaComparison(median_seconds(naive, repeats), median_seconds(fma, repeats),
                             rel_err(naive(), ref), rel_err(fma(), ref))


# --------------------------------------------------------------------------- decoding


@dataclass
class PhaseBreakdown:
    """Seconds per decode step, per phase (flashmoe.timing.timing), and the measured step time."""

    phases: dict[str, float]
    step_seconds: float
    steps: int

    @property
    def total(self) -> float:
        return sum(self.phases.values())


def decode_phase_breakdown(model: Any, tokenizer: Any, prompt: str | list[int], n: int = 8) -> PhaseBreakdown:
    """Greedy-decode `n` tokens after `prompt` with per-phase timing on; each step's wall time measured around it."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    cache, sampler = model.make_cache(), make_sampler(0.0)
    prefill(model, mx.array(ids[:-1], dtype=mx.int32), cache, 512)
    token = mx.array(ids[-1:], dtype=mx.int32)
    wall = 0.0
    with timing.timing() as timer:
        for _ in range(n):
            tic = time.perf_counter()
            token = decode_one_token(model, token, cache, sampler)
            mx.eval(token)  # sync: the step ends here
            wall += time.perf_counter() - tic
        phases = {p: s / n for p, s in timer.seconds.items()}
    order = [p for p in timing.PHASES if p in phases] + sorted(set(phases) - set(timing.PHASES))
    return PhaseBreakdown({p: phases[p] for p in order}, wall / n, n)


def tokens_per_second(model: Any, tokenizer: Any, prompt: str | list[int], n: int = 32) -> float:
    """Decode tokens/s of flashmoe.stream_generate (greedy), as the CLI reports it."""
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=n):
        pass
    return last.generation_tps if last else 0.0


@dataclass
class KPoint:
    """Decode speed and held-out perplexity with K experts per token."""

    k: int
    tokens_per_second: float
    perplexity: float


def k_sweep(directory, ks: list[int], heldout, prompt: list[int], *, decode_tokens: int = 16,
            max_tokens: int = 1024, seq_len: int = 256) -> list[KPoint]:
    """For each K: load with k=K, time greedy decoding and measure perplexity on `heldout` ids."""
    from .evaluate import perplexity
    from ..loader import load_model

    points = []
    for k in ks:
        model = load_model(directory, k=k)
        tps = greedy_tokens_per_second(model, model.make_cache, prompt, decode_tokens)
        points.append(KPoint(k, tps, perplexity(model, heldout, seq_len=seq_len, max_tokens=max_tokens)))
    return points


