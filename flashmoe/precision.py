"""The one place that decides the dtype computation runs in."""

from __future__ import annotations

import mlx.core as mx


def compute_dtype(stored: mx.Dtype, device: mx.Device | None = None) -> mx.Dtype:
    """float32 on the CPU backend, the checkpoint's own dtype on a GPU.

    On CPU, MLX's quantized matmul is ~8x slower with bf16 activations than with
    float32 (4096x4096 4-bit matvec: ~24 ms vs ~200 ms) and float16 is slower still.
    """
    device = device or mx.default_device()
    if device == mx.cpu and mx.issubdtype(stored, mx.floating):
        return mx.float32
    return stored
