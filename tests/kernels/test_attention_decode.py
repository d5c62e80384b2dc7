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


def norm_rope_case(batch, heads, kv_heads, head_dim, dtype=mx.float32):
    q = mx.random.normal((batch, 1, heads, head_dim)).astype(dtype)
    k = mx.random.normal((batch, 1, kv_heads, head_dim)).astype(dtype)
    q_w = (1 + 0.1 * mx.random.normal((head_dim,))).astype(dtype)
    k_w = (1 + 0.1 * mx.random.normal((head_dim,))).astype(dtype)
    return q, k, q_w, k_w


def test_norm_rope_reference_is_the_separate_ops(seed):
    q, k, q_w, k_w = norm_rope_case(1, 4, 2, 64)
    kw = dict(eps=1e-6, rope_dims=32, traditional=False, base=10000.0, scale=1.0)
    got_q, got_k = attention.qk_norm_rope(q, k, q_w, k_w, mx.array([7], dtype=mx.int32), **kw)
    want_q = mx.fast.rope(
        mx.fast.rms_norm(q, q_w, 1e-6).transpose(0, 2, 1, 3),
        32,
        traditional=False,
        base=1e4,
        scale=1.0,
        offset=7,
    )
    assert got_q.shape == (1, 4, 1, 64) and got_k.shape == (1, 2, 1, 64)
    assert mx.array_equal(got_q, want_q)


@needs_cuda
@pytest.mark.parametrize("head_dim, rope_dims", [(128, 128), (64, 64), (256, 64), (128, 32)])
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("position", [0, 5, 3000])
def test_norm_rope_kernel_matches_reference(head_dim, rope_dims, traditional, position, seed):
    q, k, q_w, k_w = norm_rope_case(2, 8, 2, head_dim)
    pos = mx.array([position], dtype=mx.int32)
    kw = dict(eps=1e-6, rope_dims=rope_dims, traditional=traditional, base=1e6, scale=0.5)
    got = attention.qk_norm_rope(q, k, q_w, k_w, pos, **kw, backend="cuda")
    want = attention.qk_norm_rope_reference(q, k, q_w, k_w, pos, **kw)
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel_err(g, w) < 1e-5, f"seed {seed}"


@needs_cuda
def test_norm_rope_kernel_bfloat16_within_rounding(seed):
    q, k, q_w, k_w = norm_rope_case(1, 32, 4, 128, mx.bfloat16)
    pos = mx.array([41], dtype=mx.int32)
    kw = dict(eps=1e-6, rope_dims=128, traditional=False, base=1e6, scale=1.0)
    got = attention.qk_norm_rope(q, k, q_w, k_w, pos, **kw, backend="cuda")
    want = attention.qk_norm_rope_reference(q, k, q_w, k_w, pos, **kw)
    for g, w in zip(got, want):
        assert g.dtype == mx.bfloat16 and rel_err(g, w) < 1e-2, f"seed {seed}"
