"""Token embeddings from a quantized table, in one launch on a GPU.

    embed_rows(tokens, w, scales, biases, bits=, group_size=, mode=, dtype=, backend=)
        tokens (...) int, table w (V, D * bits / 32) -> (..., D) in dtype

`reference`, MLX's ops, gathers the rows of the weight, scales and biases (three Gathers), casts the
scales and biases to the compute dtype and dequantizes them (a Quantize): five or more graph nodes
before the first layer of a decode step, each ~14 us of host time on an NVIDIA GPU. The kernel
(src/embed_rows.inc) is one, and rounds as mx.dequantize does on a GPU (scale * q + bias rounded once),
so there its rows are bit-identical to the reference's. It serves affine 2/4/8-bit tables on "metal" / "cuda" for up to
MAX_TOKENS tokens (decode); anything else (prefill, other formats, other backends) takes `reference`.
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import KERNEL_BITS, fused_backend, gpu

INPUTS, OUTPUTS = ("tokens", "w", "scales", "biases"), ("y",)
THREADS = 256  # threads a threadgroup, one per packed word of a row
MAX_TOKENS = 64  # more (a prefill chunk) go through MLX's gather and dequantize, as before


def embed_rows(
    tokens: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    *,
    bits: int,
    group_size: int,
    mode: str = "affine",
    dtype: mx.Dtype = mx.float32,
    backend: str = "auto",
) -> mx.array:
    """The table's rows `tokens` (...) dequantized -> (..., D) in `dtype` (the compute dtype)."""
    backend = fused_backend(backend)
    kernel = mode == "affine" and bits in KERNEL_BITS and 0 < tokens.size <= MAX_TOKENS
    if backend == "reference" or not kernel:
        return reference(tokens, w, scales, biases, bits=bits, group_size=group_size, mode=mode, dtype=dtype)
    rows, words = w.shape
    dim = words * 32 // bits
    (y,) = gpu.kernel(backend, "embed_rows.inc", "flashmoe_embed_rows", INPUTS, OUTPUTS)(
        inputs=[tokens, w, scales, biases],
        template=[
            ("T", dtype),
            ("BITS", bits),
            ("GROUP_SIZE", group_size),
            ("D", dim),
            ("V", rows),
            ("THREADS", THREADS),
        ],
        grid=(math.ceil(words / THREADS) * THREADS, tokens.size, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(*tokens.shape, dim)],
        output_dtypes=[dtype],
        **gpu.output_init(),
    )
    return y


def reference(tokens, w, scales, biases, *, bits, group_size, mode="affine", dtype=mx.float32) -> mx.array:
    """MLX's ops: the rows of each array gathered, then mx.dequantize -> (..., D) in `dtype`."""
    # Affine scales and biases in the compute dtype first: mx.dequantize returns the scales' dtype
    # (bf16 on disk) and computes in it.
    scales = scales[tokens] if mode != "affine" else scales[tokens].astype(dtype)
    biases = None if biases is None else biases[tokens].astype(dtype)
    kw = dict(group_size=group_size, bits=bits, mode=mode)
    return mx.dequantize(w[tokens], scales, biases, **kw).astype(dtype)
