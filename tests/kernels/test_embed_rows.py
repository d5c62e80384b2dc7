"""kernels.embedding.embed_rows (a quantized table's rows dequantized in one launch) against MLX's own path
(gathers, then mx.dequantize), bit for bit: every bits and group size, float32 and bf16, the first and last
rows. Also what that path computes: `rows_rounded` models both of mx.dequantize's roundings, and the
model is checked against MLX here, so an MLX that rounds otherwise shows. tests/kernels/test_emulated_kernels.py
runs the same kernel on the CPU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.kernels.embedding import embed_rows, reference
from tests.helpers import needs_cuda

BITS_GROUPS = [(bits, group) for bits in (2, 4, 8) for group in (32, 64, 128)]
# (the table's dtype: scales and biases as stored, the compute dtype): as quantized, bf16 scales in float32
# (a bf16 checkpoint computed in float32), float32 scales in bf16 (rounded first)
DTYPES = {
    "f32": (mx.float32, mx.float32),
    "bf16": (mx.bfloat16, mx.bfloat16),
    "bf16-in-f32": (mx.bfloat16, mx.float32),
    "f32-in-bf16": (mx.float32, mx.bfloat16),
}


def table(rows: int, dim: int, bits: int, group_size: int, dtype: mx.Dtype = mx.float32):
    """A random table quantized by MLX: (packed (rows, dim * bits / 32), scales, biases) in dtype."""
    dense = (0.05 * mx.random.normal((rows, dim)) + 0.01).astype(dtype)
    return mx.quantize(dense, group_size=group_size, bits=bits)


def tokens_of(rows: int) -> mx.array:
    """(1, 6) int32: the first and last rows, one twice, two at random."""
    picks = [0, rows - 1, 5, 5, *mx.random.randint(0, rows, (2,)).tolist()]
    return mx.array([picks], dtype=mx.int32)


def codes(w: mx.array, bits: int) -> np.ndarray:
    """The packed words' codes (..., words * 32 / bits), little-endian within a word, as float64."""
    words = np.array(w).astype(np.uint64)
    parts = [(words >> (bits * k)) & ((1 << bits) - 1) for k in range(32 // bits)]
    return np.stack(parts, -1).reshape(*words.shape[:-1], -1).astype(np.float64)


def to_dtype(x: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """float64 values rounded once (to nearest, ties to even) to dtype, back as float64."""
    if dtype == mx.float32:
        return x.astype(np.float32).astype(np.float64)
    mantissa, exponent = np.frexp(x)  # bf16: 8 significant bits
    return np.ldexp(np.rint(mantissa * 256), exponent - 8)


def rows_rounded(tokens, w, scales, biases, *, bits, group_size, dtype, once: bool) -> np.ndarray:
    """scale * q + bias for the rows `tokens`, scales and biases rounded to dtype first, in float64 (exact
    here), then rounded to dtype: once (MLX's GPU kernel, an FMA) or the product first (its CPU ops)."""
    q = codes(w[tokens], bits)
    s, b = (to_dtype(np.array(a[tokens].astype(mx.float32)), dtype) for a in (scales, biases))
    s, b = np.repeat(s, group_size, -1), np.repeat(b, group_size, -1)
    return to_dtype(s * q + b if once else to_dtype(s * q, dtype) + b, dtype)


def as_f64(y: mx.array) -> np.ndarray:
    return np.array(y.astype(mx.float32)).astype(np.float64)


@pytest.mark.parametrize("dtypes", sorted(DTYPES))
@pytest.mark.parametrize("bits,group_size", BITS_GROUPS)
def test_mlx_dequantize_rounds_as_modelled(bits, group_size, dtypes, seed):
    """On the default device (here the CPU, on an H200 the GPU), MLX's path is `rows_rounded`."""
    stored, dtype = DTYPES[dtypes]
    w, scales, biases = table(37, 384, bits, group_size, stored)
    tokens = tokens_of(37)
    got = reference(tokens, w, scales, biases, bits=bits, group_size=group_size, dtype=dtype)
    want = rows_rounded(
        tokens,
        w,
        scales,
        biases,
        bits=bits,
        group_size=group_size,
        dtype=dtype,
        once=mx.default_device() == mx.gpu,
    )
    assert got.dtype == dtype and np.array_equal(as_f64(got), want), f"seed {seed}"


@needs_cuda
@pytest.mark.parametrize("dtypes", sorted(DTYPES))
@pytest.mark.parametrize("bits,group_size", BITS_GROUPS)
def test_the_kernel_is_mlx_dequantize_bit_for_bit(bits, group_size, dtypes, seed):
    stored, dtype = DTYPES[dtypes]
    w, scales, biases = table(151936, 2048, bits, group_size, stored)  # a real vocabulary and width
    tokens = tokens_of(151936)
    kw = dict(bits=bits, group_size=group_size, dtype=dtype)
    got = embed_rows(tokens, w, scales, biases, **kw, backend="cuda")
    want = reference(tokens, w, scales, biases, **kw)
    assert got.shape == (1, 6, 2048) and got.dtype == dtype
    assert mx.array_equal(got, want).item(), f"seed {seed}: {int((got != want).sum().item())} values differ"
