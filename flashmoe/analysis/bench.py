"""Measurements for the notebooks and benchmarks: bandwidth, kernels, formulas, decode phases, tokens/s.

Every function here syncs (mx.eval) on purpose: these are measurements. On a shared machine one
timing means little (two runs of the same thing differ by 20% and more), so what is compared is
measured as a researcher would: the contenders in turns (A, B, B, A, A, B...: `interleaved`), several
repeats each, kept as a `Spread` (median, min-max, quartiles), and a conclusion only where the
spread supports one (`compare`: "faster", "slower" or "within noise"; `verdict` words it).
Tests check what the numbers mean (sums, agreement, the verdict rule), never their size.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .. import kernels, timing
from ..generate import decode_one_token, prefill, stream_generate
from ..sample import make_sampler
from .parity import greedy_tokens_per_second, rel_err

# --------------------------------------------------------------------------- repeats, spread, verdicts

MIN_SAMPLES = 3  # fewer samples than this per side: no conclusion


@dataclass(frozen=True)
class Spread:
    """Repeated samples of one measurement: median, min-max and quartiles (for error bars and verdicts)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def lo(self) -> float:
        return min(self.samples)

    @property
    def hi(self) -> float:
        return max(self.samples)

    @property
    def iqr(self) -> tuple[float, float]:
        """(first quartile, third quartile)."""
        q1, q3 = np.percentile(self.samples, [25, 75])
        return float(q1), float(q3)

    @property
    def yerr(self) -> tuple[float, float]:
        """(median - min, max - median): matplotlib's error bar lengths for min-max bars."""
        return self.median - self.lo, self.hi - self.median

    def scaled(self, factor: float) -> Spread:
        """The same samples times `factor` (seconds to milliseconds, say)."""
        return Spread(tuple(factor * s for s in self.samples))

    def __str__(self) -> str:
        return f"{_g(self.median)} [{_g(self.lo)}-{_g(self.hi)}, n={len(self.samples)}]"


def spread(samples: Sequence[float]) -> Spread:
    """A Spread of `samples` (at least one)."""
    if len(samples) == 0:
        raise ValueError("no samples")
    return Spread(tuple(float(s) for s in samples))


def error_bars(spreads: Sequence[Spread]) -> tuple[list[float], np.ndarray]:
    """(medians, yerr of shape (2, n)) for plt.bar / plt.errorbar with min-max bars."""
    return [s.median for s in spreads], np.array([s.yerr for s in spreads]).T.reshape(2, len(spreads))


def interleaved(
    measurements: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1
) -> dict[str, list]:
    """Each measurement's results over `repeats` rounds, the measurements taken in turns.

    Round r runs every measurement once, in the given order on even rounds and reversed on odd ones
    (A, B, B, A, A, B...), so a slow spell of a shared machine lands on all of them alike instead of
    on whichever ran second. `warmup` untimed rounds first (compilation, allocation, caches).
    """
    names = list(measurements)
    for _ in range(warmup):
        for name in names:
            measurements[name]()
    results: dict[str, list] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(measurements[name]())
    return results


def print_speedups(samples: dict[str, Sequence[float]], base: str, unit: str) -> None:
    """One line per measurement of times `samples` (in `unit`): median, min-max, speed-up over `base`."""
    reference = spread(samples[base]).median
    width = max(len(name) for name in samples)
    for name, values in samples.items():
        s = spread(values)
        print(
            f"{name:>{width}}: {s.median:8.1f} {unit} (min {s.lo:.1f}, max {s.hi:.1f})  "
            f"speedup {reference / s.median:.2f}x"
        )


def compare(
    a: Sequence[float] | Spread, b: Sequence[float] | Spread, *, higher_is_faster: bool = True
) -> str:
    """ "faster", "slower" or "within noise": A against B, from repeated samples of each.

    A direction only when the min-max ranges do not overlap (every sample of A beats every sample
    of B, or the reverse); with 5 interleaved samples each, chance alone orders them that cleanly
    2 times in 252. Overlapping ranges, or fewer than MIN_SAMPLES samples a side, are "within noise":
    a re-run on a busy machine can then turn the order either way. `higher_is_faster`: True for
    rates (tokens/s, GB/s), False for times (seconds).
    """
    a, b = (x if isinstance(x, Spread) else spread(x) for x in (a, b))
    if min(len(a.samples), len(b.samples)) < MIN_SAMPLES:
        return "within noise"
    if a.lo > b.hi:
        return "faster" if higher_is_faster else "slower"
    if a.hi < b.lo:
        return "slower" if higher_is_faster else "faster"
    return "within noise"


def verdict(
    name_a: str,
    a: Sequence[float] | Spread,
    name_b: str,
    b: Sequence[float] | Spread,
    *,
    unit: str = "tokens/s",
    higher_is_faster: bool = True,
) -> str:
    """One sentence for a notebook: both medians with their ranges, and what `compare` concludes."""
    a, b = (x if isinstance(x, Spread) else spread(x) for x in (a, b))
    result = compare(a, b, higher_is_faster=higher_is_faster)
    numbers = f"{name_a} {a} vs {name_b} {b} {unit} (median [min-max, runs])"
    if result == "within noise":
        return f"{numbers}: within noise, the ranges overlap, so no difference can be claimed from these runs"
    ratio = a.median / b.median if higher_is_faster else b.median / a.median
    return f"{numbers}: {name_a} is {result} than {name_b} ({ratio:.2f}x by the medians; the ranges do not overlap)"


def _g(x: float) -> str:
    """3 significant digits, no exponent for everyday sizes."""
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e5 or x == 0 else f"{x:.2e}"


def seconds_per_call(fn: Callable[[], Any], number: int = 1) -> float:
    """Mean wall time of `number` calls of `fn()`, each result evaluated (one sample for `interleaved`)."""
    tic = time.perf_counter()
    for _ in range(number):
        result = fn()
        if result is not None:  # numpy work returns None
            mx.eval(result)
    return (time.perf_counter() - tic) / number


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
    tensor (the K experts a token routes to). Returns {"dense", "experts", "total"} in bytes: the
    loader's figure (flashmoe.loader.bytes_per_token, also `model.report.bytes_per_token`).
    """
    from ..loader import bytes_per_token, read_config
    from ..models.args import ModelArgs
    from ..safetensors import tensor_infos

    return bytes_per_token(tensor_infos(directory), ModelArgs.from_config(read_config(directory)), k)


@dataclass
class KernelTiming:
    """One dequant-matvec configuration: median seconds, its samples, and the bandwidth it achieved."""

    backend: str
    bits: int
    group_size: int
    out_dim: int
    in_dim: int
    seconds: float  # the median of `samples`
    bytes: int  # packed weights + scales + biases + x + y
    samples: tuple[float, ...] = ()  # seconds per call, one per repeat

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9

    @property
    def gbps_spread(self) -> Spread:
        """Achieved GB/s per sample (the slowest sample is the lowest GB/s)."""
        return spread([self.bytes / s / 1e9 for s in (self.samples or (self.seconds,))])


def random_quantized(out_dim: int, in_dim: int, bits: int, group_size: int, seed: int = 0):
    """A random float32 (out, in) matrix, its quantized form (w, scales, biases), and an input x (in,)."""
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    dense = mx.random.normal((out_dim, in_dim), key=k1) * 0.05
    w, scales, biases = mx.quantize(dense, group_size=group_size, bits=bits)
    x = mx.random.normal((in_dim,), key=k2)
    mx.eval(dense, w, scales, biases, x)
    return dense, (w, scales, biases), x


def time_kernels(
    backends: Sequence[str],
    bits: int,
    group_size: int,
    out_dim: int,
    in_dim: int,
    repeats: int = 5,
    number: int = 5,
) -> list[KernelTiming]:
    """flashmoe.kernels.dequant_matvec for one shape on each backend, the backends timed in turns.

    Each of the `repeats` samples is the mean of `number` calls (one call of a small matvec is
    shorter than the timer's jitter on a shared machine).
    """
    _, (w, scales, biases), x = random_quantized(out_dim, in_dim, bits, group_size)

    def sample(backend):
        def call():
            return kernels.dequant_matvec(
                x, w, scales, biases, bits=bits, group_size=group_size, backend=backend
            )

        return lambda: seconds_per_call(call, number)

    samples = interleaved({b: sample(b) for b in backends}, repeats)
    moved = w.nbytes + scales.nbytes + biases.nbytes + x.nbytes + out_dim * x.itemsize
    return [
        KernelTiming(
            b,
            bits,
            group_size,
            out_dim,
            in_dim,
            statistics.median(samples[b]),
            moved,
            tuple(samples[b]),
        )
        for b in backends
    ]


def time_kernel(
    backend: str, bits: int, group_size: int, out_dim: int, in_dim: int, repeats: int = 10
) -> KernelTiming:
    """Median time of flashmoe.kernels.dequant_matvec for one shape on one backend."""
    return time_kernels([backend], bits, group_size, out_dim, in_dim, repeats, number=1)[0]


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
    """Seconds (repeated, interleaved) and relative error (against mx.dequantize @ x) of the naive and FMA forms."""

    naive: Spread
    fma: Spread
    naive_error: float
    fma_error: float

    @property
    def naive_seconds(self) -> float:
        return self.naive.median

    @property
    def fma_seconds(self) -> float:
        return self.fma.median


def compare_formulas(
    out_dim: int,
    in_dim: int,
    bits: int = 4,
    group_size: int = 64,
    repeats: int = 5,
    number: int = 3,
) -> FormulaComparison:
    """Time (in turns) and check both formulas as plain MLX ops on unpacked float32 codes."""
    _, (w, scales, biases), x = random_quantized(out_dim, in_dim, bits, group_size)
    q = kernels.reference.unpack(w, bits).astype(mx.float32)  # (out, in) codes
    s, b = scales.astype(mx.float32), biases.astype(mx.float32)
    ref = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits) @ x
    naive = lambda: naive_form(q, s, b, x, group_size)  # noqa: E731
    fma = lambda: fma_form(q, s, b, x, group_size)  # noqa: E731
    samples = interleaved(
        {
            "naive": lambda: seconds_per_call(naive, number),
            "fma": lambda: seconds_per_call(fma, number),
        },
        repeats,
    )
    return FormulaComparison(
        spread(samples["naive"]), spread(samples["fma"]), rel_err(naive(), ref), rel_err(fma(), ref)
    )


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
    steps = list(stream_generate(model, tokenizer, prompt, max_tokens=n))
    return steps[-1].generation_tps if steps else 0.0


def median_phases(runs: Sequence[PhaseBreakdown]) -> dict[str, float]:
    """Per phase, the median over repeated breakdowns of its seconds per step."""
    phases = list(dict.fromkeys(p for r in runs for p in r.phases))
    return {p: statistics.median(r.phases.get(p, 0.0) for r in runs) for p in phases}


@dataclass
class KPoint:
    """Decode speed (repeated, interleaved with the other Ks) and held-out perplexity with K experts per token."""

    k: int
    speed: Spread  # greedy decode tokens/s
    perplexity: float
    heldout_tokens: int = 0  # tokens the perplexity scored
    seq_len: int = 0  # its window length

    @property
    def tokens_per_second(self) -> float:
        return self.speed.median


def k_sweep(
    directory,
    ks: list[int],
    heldout,
    prompt: list[int],
    *,
    decode_tokens: int = 16,
    max_tokens: int = 1024,
    seq_len: int = 256,
    repeats: int = 5,
) -> list[KPoint]:
    """For each K: load with k=K; decode tokens/s over `repeats` rounds (the Ks in turns); perplexity on `heldout`.

    The perplexity is flashmoe.analysis.evaluate.perplexity with the same `max_tokens` and `seq_len`
    for every K, so the points compare with each other (and with any other figure of that setting).
    """
    from ..loader import load_model
    from .evaluate import measure

    models = {k: load_model(directory, k=k) for k in ks}
    speeds = interleaved(
        {
            k: (lambda m=m: greedy_tokens_per_second(m, m.make_cache, prompt, decode_tokens))
            for k, m in models.items()
        },
        repeats,
    )
    points = []
    for k, model in models.items():
        ppl = measure(model, heldout, seq_len=seq_len, max_tokens=max_tokens)
        points.append(KPoint(k, spread(speeds[k]), ppl.value, ppl.tokens, seq_len))
    return points


def decode_speeds(
    engines: dict[str, tuple[Any, Callable[[], list]]],
    prompt: list[int],
    tokens: int = 16,
    repeats: int = 5,
) -> dict[str, Spread]:
    """Greedy decode tokens/s of each (model, make_cache), `repeats` runs each with the engines in turns.

    Either engine kind: flashmoe's models or mlx-lm's (parity.mlx_lm_model, parity.mlx_lm_cache).
    """
    runs = interleaved(
        {
            name: (lambda m=m, c=c: greedy_tokens_per_second(m, c, prompt, tokens))
            for name, (m, c) in engines.items()
        },
        repeats,
    )
    return {name: spread(samples) for name, samples in runs.items()}
