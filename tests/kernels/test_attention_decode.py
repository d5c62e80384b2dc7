"""Single-token attention over KV cache buffers (flashmoe.kernels.attention) on fresh random data:
the kernel against its reference, and the reference against MLX's attention over the filled slice."""

from __future__ import annotations

import mlx.core as mx
import pytest

from flashmoe.kernels import attention
from tests.helpers import needs_cuda, rel_err


def case(batch, heads, kv_heads, head_dim, capacity, dtype=mx.float32):
    q = mx.random.normal((batch, heads, 1, head_dim)).astype(dtype)
    keys = mx.random.normal((batch, kv_heads, capacity, head_dim)).astype(dtype)
    values = mx.random.normal((batch, kv_heads, capacity, head_dim)).astype(dtype)
    return q, keys, values


@pytest.mark.parametrize("length", [1, 13, 40])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_reference_is_attention_over_the_filled_positions(length, kv_heads, seed):
    q, keys, values = case(2, 8, kv_heads, 64, 40)
    got = attention.reference(q, keys, values, mx.array([length], dtype=mx.int32), scale=0.125)
    want = mx.fast.scaled_dot_product_attention(q, keys[:, :, :length], values[:, :, :length], scale=0.125)
    assert rel_err(got, want) < 1e-5, f"seed {seed}"


@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("length", [1, 3, 37, 300])
@pytest.mark.parametrize("batch", [1, 2])
def test_kernel_matches_reference(head_dim, kv_heads, length, batch, seed):
    q, keys, values = case(batch, 8, kv_heads, head_dim, 320)
    n = mx.array([length], dtype=mx.int32)
    y = attention.decode_attention(q, keys, values, n, scale=head_dim**-0.5, backend="cuda")
    ref = attention.reference(q, keys, values, n, scale=head_dim**-0.5)
    assert y.shape == q.shape and rel_err(y, ref) < 1e-5, f"seed {seed}"


@needs_cuda
def test_kernel_bfloat16_within_rounding(seed):
    q, keys, values = case(1, 32, 4, 128, 256, mx.bfloat16)
    n = mx.array([200], dtype=mx.int32)
    y = attention.decode_attention(q, keys, values, n, scale=128**-0.5, backend="cuda")
    ref = attention.reference(*(a.astype(mx.float32) for a in (q, keys, values)), n, scale=128**-0.5)
    assert y.dtype == mx.bfloat16 and rel_err(y, ref) < 1e-2, f"seed {seed}"
