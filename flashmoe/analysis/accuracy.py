"""The kernel-accuracy sweep the tests and benchmarks/kernel_accuracy.py share: every backend against
mx.dequantize + an exact float32 matmul, on fresh random weights, activations and expert choices."""

from __future__ import annotations

import mlx.core as mx

from .. import kernels
from .parity import rel_err

# (out, in): out not a multiple of the rows a threadgroup takes; in from 64 to 8192, past the
# 2048-value shared-memory tile, with and without 16-byte aligned rows of words.
SHAPES = [(1, 64), (13, 256), (37, 1024), (300, 2048), (9, 4224), (17, 8192), (45, 96)]
BITS = (2, 4, 8)
GROUP_SIZES = (32, 64, 128)
GATHERED = dict(experts=6, out_dim=19, in_dim=384, tokens=5, k=3)  # the gathered case's sizes


def exact_matmul(a: mx.array, b: mx.array) -> mx.array:
    """float32 matmul on the CPU: a GPU's float32 matmul may round through TF32 (~1e-3)."""
    return mx.matmul(a, b, stream=mx.cpu)


def quantized(shape, bits: int, group_size: int, dtype=mx.float32):
    """Fresh random weights quantized by MLX itself: (packed, scales, biases, dequantized float32)."""
    w = mx.random.normal(shape).astype(dtype)
    q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    dense = mx.dequantize(q, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
    return q, scales, biases, dense


def matvec_error(backend: str, bits: int, group_size: int, out_dim: int, in_dim: int) -> float:
    """rel_err of dequant_matvec (3 rows of x) against the exact reference."""
    q, scales, biases, dense = quantized((out_dim, in_dim), bits, group_size)
    x = mx.random.normal((3, in_dim))
    y = kernels.dequant_matvec(x, q, scales, biases, bits=bits, group_size=group_size, backend=backend)
    if y.shape != (3, out_dim) or y.dtype != mx.float32:
        raise AssertionError(f"{backend}: output {y.shape} {y.dtype}, expected (3, {out_dim}) float32")
    return rel_err(y, exact_matmul(x, dense.T))


def gathered_error(backend: str, bits: int, group_size: int, shared_input: bool) -> float:
    """rel_err of gather_dequant_matvec (x shared by the K experts, or one x per expert)."""
    e, out_dim, in_dim, tokens, k = (GATHERED[n] for n in ("experts", "out_dim", "in_dim", "tokens", "k"))
    q, scales, biases, dense = quantized((e, out_dim, in_dim), bits, group_size)
    indices = mx.random.randint(0, e, (tokens, k)).astype(mx.uint32)
    x = mx.random.normal((tokens, in_dim) if shared_input else (tokens, k, in_dim))
    y = kernels.gather_dequant_matvec(
        x, q, scales, biases, indices, bits=bits, group_size=group_size, backend=backend
    )
    if y.shape != (tokens, k, out_dim):
        raise AssertionError(f"{backend}: output {y.shape}, expected {(tokens, k, out_dim)}")
    xk = x[:, None, :] if shared_input else x
    return rel_err(y, exact_matmul(dense[indices], xk[..., None]).squeeze(-1))  # (tokens, K, out)


def worst_error(backend: str, bits: int) -> tuple[float, float]:
    """(plain, gathered) worst relative error over every group size, shape and input layout."""
    plain = max(matvec_error(backend, bits, g, o, i) for g in GROUP_SIZES for o, i in SHAPES if i % g == 0)
    gathered = max(gathered_error(backend, bits, g, shared) for g in GROUP_SIZES for shared in (True, False))
    return plain, gathered


def kernel_errors(
    bits: int, group_size: int, out_dim: int = 256, in_dim: int = 512, seed: int = 0
) -> dict[str, float]:
    """matvec_error per backend available here, every backend on the same seeded weights and inputs."""
    errors = {}
    for backend in kernels.available_backends():
        mx.random.seed(seed)
        errors[backend] = matvec_error(backend, bits, group_size, out_dim, in_dim)
    return errors
