"""Worst relative error of each backend against mx.dequantize + a float32 matmul (on the CPU, exact).

    python benchmarks/kernel_accuracy.py

Fresh random weights, activations and expert choices each run; one line per backend and bits,
the worst case over group sizes 32/64/128 and the test suite's shapes, plain and gathered.
"""

from __future__ import annotations

import mlx.core as mx

from flashmoe import kernels
from flashmoe.analysis.accuracy import worst_error


def main() -> None:
    print(f"device {mx.default_device()}; worst rel err vs mx.dequantize + float32 matmul")
    print(f"{'backend':>10} {'bits':>4} {'matvec':>10} {'gathered':>10}")
    for backend in kernels.available_backends():
        for bits in (2, 4, 8):
            plain, gathered = worst_error(backend, bits)
            print(f"{backend:>10} {bits:>4} {plain:>10.2e} {gathered:>10.2e}")


if __name__ == "__main__":
    main()
