"""Worst relative error of each backend against mx.dequantize + a float32 matmul (on the CPU, exact).

    python benchmarks/kernel_accuracy.py

Fresh random weights, activations and expert choices each run; one line per backend and bits,
the worst case over group sizes 32/64/128 and the test suite's shapes, plain and gathered.
"""

from __future__ import annotations

import mlx.core as mx

from flashmoe import kernels
from flashmoe.analysis.parity import rel_err

SHAPES = [(1, 64), (13, 256), (37, 1024), (300, 2048), (9, 4224), (17, 8192), (45, 96)]


def worst_error(backend: str, bits: int) -> tuple[float, float]:
    """(plain, gathered) worst relative error over group sizes and shapes."""
    plain = gathered = 0.0
    for group_size in (32, 64, 128):
        for out_dim, in_dim in SHAPES:
            if in_dim % group_size:
                continue
            q, s, b = mx.quantize(mx.random.normal((out_dim, in_dim)), group_size=group_size, bits=bits)
            dense = mx.dequantize(q, s, b, group_size=group_size, bits=bits)
            x = mx.random.normal((3, in_dim))
            y = kernels.dequant_matvec(x, q, s, b, bits=bits, group_size=group_size, backend=backend)
            plain = max(plain, rel_err(y, mx.matmul(x, dense.T, stream=mx.cpu)))
        q, s, b = mx.quantize(mx.random.normal((6, 19, 384)), group_size=group_size, bits=bits)
        dense = mx.dequantize(q, s, b, group_size=group_size, bits=bits)
        idx = mx.random.randint(0, 6, (5, 3)).astype(mx.uint32)
        x = mx.random.normal((5, 3, 384))
        y = kernels.gather_dequant_matvec(x, q, s, b, idx, bits=bits, group_size=group_size, backend=backend)
        ref = mx.matmul(dense[idx], x[..., None], stream=mx.cpu).squeeze(-1)
        gathered = max(gathered, rel_err(y, ref))
    return plain, gathered


def main() -> None:
    print(f"device {mx.default_device()}; worst rel err vs mx.dequantize + float32 matmul")
    print(f"{'backend':>10} {'bits':>4} {'matvec':>10} {'gathered':>10}")
    for backend in kernels.available_backends():
        for bits in (2, 4, 8):
            plain, gathered = worst_error(backend, bits)
            print(f"{backend:>10} {bits:>4} {plain:>10.2e} {gathered:>10.2e}")


if __name__ == "__main__":
    main()
