"""Launching the dequant-matvec kernel through mx.fast.metal_kernel or mx.fast.cuda_kernel.

Both backends run the same body (kernels/dequant_matvec.inc); only the prelude differs.
Kernel objects are built once per backend; MLX compiles one variant per template
(dtype, bits, group size) and caches it by name.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from . import sources

ROWS_PER_GROUP = 8  # output rows per threadgroup, one SIMD group (warp) each
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


def gathered_matvec(backend, x, w, scales, biases, idx, *, x_div, bits, group_size) -> mx.array:
    """x (P / x_div, in), w (E, out, words), idx (P,) uint32 -> y (P, out) in x's dtype."""
    pairs, (experts, out_dim, _), in_dim = idx.shape[0], w.shape, x.shape[-1]
    threads = ROWS_PER_GROUP * 32
    kwargs = {} if _poison is None else {"init_value": _poison}
    (y,) = _kernel(backend)(
        inputs=[x, w, scales, biases, idx, _dims(out_dim, in_dim, x_div)],
        template=[
            ("T", x.dtype),
            ("BITS", bits),
            ("GROUP_SIZE", group_size),
            ("ROWS", ROWS_PER_GROUP),
            ("TILE", X_TILE),
        ],
        grid=(pairs * threads, math.ceil(out_dim / ROWS_PER_GROUP), 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(pairs, out_dim)],
        output_dtypes=[x.dtype],
        **kwargs,
    )
    return y


def matvec(backend, x, w, scales, biases, *, bits, group_size) -> mx.array:
    """x (P, in) against one matrix w (out, words) -> (P, out): the gathered kernel with one expert."""
    pairs = x.shape[0]
    return gathered_matvec(
        backend, x, w[None], scales[None], biases[None], _zeros(pairs),
        x_div=1, bits=bits, group_size=group_size,
    )
