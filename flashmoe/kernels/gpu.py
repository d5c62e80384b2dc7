"""Launching the dequant-matvec kernel through mx.fast.metal_kernel or mx.fast.cuda_kernel.

Both backends run the same body (src/dequant_matvec.inc); only the prelude differs.
Kernel objects are built once per backend; MLX compiles one variant per template
(dtype, bits, group size) and caches it by name.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from . import sources

SIMDS_PER_GROUP = 8  # SIMD groups (warps) per threadgroup
ROWS_PER_SIMD = 1  # output rows per SIMD group: each x value read from shared memory serves them all
WORD_LOADS_IN_FLIGHT = 4  # uint32 loads each lane issues before using them
X_TILE = 2048  # input values staged in shared memory at a time (8 KiB of float32)
INPUT_NAMES = ["x", "w", "scales", "biases", "idx", "dims"]

_poison: float | None = None


def set_output_poison(value: float | None) -> None:
    """Tests: fill kernel outputs with `value` (e.g. NaN) before the kernel runs, so unwritten rows show."""
    global _poison
    _poison = value


@functools.cache
def _kernel(backend: str):
    """The kernel object for `backend`, built once."""
    header, body = sources.compose(backend, "dequant_matvec.inc")
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    return make(
        name="flashmoe_dequant_matvec",
        input_names=INPUT_NAMES,
        output_names=["y"],
        source=body,
        header=header,
    )


@functools.lru_cache(maxsize=256)
def _dims(out_dim: int, in_dim: int, x_div: int) -> mx.array:
    return mx.array([out_dim, in_dim, x_div], dtype=mx.int32)


@functools.lru_cache(maxsize=64)
def _zeros(pairs: int) -> mx.array:
    return mx.zeros((pairs,), dtype=mx.uint32)


def gathered_matvec(backend, x, w, scales, biases, idx, *, x_div, bits, group_size, out_shape) -> mx.array:
    """Pairs p = 0..P-1 (P = idx.size): y[p] = dequant(w[idx[p]]) @ x[p // x_div] -> y of out_shape.

    x (P / x_div rows of in), w (E, out, words) or (out, words) when idx is all zeros,
    row-contiguous: the kernel indexes flat memory, so no reshape (an extra op per call) is needed.
    """
    pairs, out_dim, in_dim = idx.size, w.shape[-2], x.shape[-1]
    threads = SIMDS_PER_GROUP * 32
    rows_per_group = SIMDS_PER_GROUP * ROWS_PER_SIMD
    kwargs = {} if _poison is None else {"init_value": _poison}
    (y,) = _kernel(backend)(
        inputs=[x, w, scales, biases, idx, _dims(out_dim, in_dim, x_div)],
        template=[
            ("T", x.dtype),
            ("BITS", bits),
            ("GROUP_SIZE", group_size),
            ("SIMDS", SIMDS_PER_GROUP),
            ("RPS", ROWS_PER_SIMD),
            ("UNROLL", WORD_LOADS_IN_FLIGHT),
            ("TILE", X_TILE),
        ],
        grid=(pairs * threads, math.ceil(out_dim / rows_per_group), 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[x.dtype],
        **kwargs,
    )
    return y


def matvec(backend, x, w, scales, biases, *, bits, group_size) -> mx.array:
    """x (..., in) against one matrix w (out, words) -> (..., out): the gathered kernel with expert 0."""
    pairs = x.size // x.shape[-1]
    return gathered_matvec(
        backend, x, w, scales, biases, _zeros(pairs),
        x_div=1, bits=bits, group_size=group_size, out_shape=(*x.shape[:-1], w.shape[-2]),
    )
