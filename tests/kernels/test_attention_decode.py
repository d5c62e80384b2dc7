"""The decode step's attention kernels (flashmoe.kernels.attention) on fresh random data: each kernel
against its reference, and each reference against MLX's own ops (attention over the filled positions;
mx.fast.rms_norm then mx.fast.rope), with float64 arithmetic as the judge where float32 rounding of a
large rotation angle makes two correct float32 answers differ."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.kernels import attention
from tests.helpers import needs_cuda, rel_err


def case(batch, heads, kv_heads, head_dim, capacity, dtype=mx.float32):
    """q (B, H, 1, hd), a cache buffer kv (2, B, H_kv, capacity, hd) and the new token's kv_new
    (2, B, H_kv, 1, hd), keys in [0] and values in [1] of both."""
    q = mx.random.normal((batch, heads, 1, head_dim)).astype(dtype)
    kv = mx.random.normal((2, batch, kv_heads, capacity, head_dim)).astype(dtype)
    kv_new = mx.random.normal((2, batch, kv_heads, 1, head_dim)).astype(dtype)
    return q, kv, kv_new


@pytest.mark.parametrize("pos", [0, 12, 39])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_reference_is_attention_over_the_cache_and_the_new_token(pos, kv_heads, seed):
    q, kv, kv_new = case(2, 8, kv_heads, 64, 40)
    got = attention.reference(q, kv, kv_new, mx.array([pos], dtype=mx.int32), scale=0.125)
    k = mx.concatenate([kv[0, :, :, :pos], kv_new[0]], axis=2)
    v = mx.concatenate([kv[1, :, :, :pos], kv_new[1]], axis=2)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)
    assert rel_err(got, want) < 1e-5, f"seed {seed}"


@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("pos", [0, 2, 36, 299])
@pytest.mark.parametrize("batch", [1, 2])
def test_kernel_matches_reference(head_dim, kv_heads, pos, batch, seed):
    q, kv, kv_new = case(batch, 8, kv_heads, head_dim, 320)
    at = mx.array([pos], dtype=mx.int32)
    kw = dict(scale=head_dim**-0.5)
    y = attention.decode_attention(q, kv, kv_new, at, **kw, backend="cuda")
    ref = attention.reference(q, kv, kv_new, at, **kw)
    assert y.shape == q.shape and rel_err(y, ref) < 1e-5, f"seed {seed}"


@needs_cuda
def test_kernel_bfloat16_within_rounding(seed):
    args = case(1, 32, 4, 128, 256, mx.bfloat16)
    at = mx.array([199], dtype=mx.int32)
    y = attention.decode_attention(*args, at, scale=128**-0.5, backend="cuda")
    ref = attention.reference(*(a.astype(mx.float32) for a in args), at, scale=128**-0.5)
    assert y.dtype == mx.bfloat16 and rel_err(y, ref) < 1e-2, f"seed {seed}"


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_gated_kernel_matches_reference(dtype, seed):
    """Qwen3-Next's full attention (16 heads of 256, 2 key/value heads): the output gate read from a
    stacked q/k/v row, applied by the kernel, against the reference's attention then mx.sigmoid, in
    float32 on the same inputs (as test_kernel_bfloat16_within_rounding judges bf16: a bf16 reference
    carries its own rounding, 1.01e-2 from the kernel on the H200 in session 9)."""
    B, H, hd, pos = 2, 16, 256, 37
    q, kv, kv_new = case(B, H, 2, hd, 64, dtype)
    row = mx.random.normal((B, 1, H * 2 * hd + 2 * 2 * hd)).astype(dtype)  # q_proj's output, then k, v
    at = mx.array([pos], dtype=mx.int32)
    kw = dict(scale=hd**-0.5, flat=True)
    y = attention.decode_attention(q, kv, kv_new, at, **kw, gate=(row, 0), backend="cuda")
    exact = [a.astype(mx.float32) for a in (q, kv, kv_new, row)]
    ref = attention.decode_attention(*exact[:3], at, **kw, gate=(exact[3], 0), backend="reference")
    assert y.dtype == dtype and y.shape == (B, 1, H * hd), f"seed {seed}"
    assert rel_err(y, ref) < (1e-5 if dtype == mx.float32 else 1e-2), f"seed {seed}"
    if dtype == mx.bfloat16:  # and no farther from float32 than MLX's own ops in bf16
        theirs = attention.decode_attention(q, kv, kv_new, at, **kw, gate=(row, 0), backend="reference")
        assert rel_err(y, ref) <= rel_err(theirs, ref), f"seed {seed}"


# --- q/k RMSNorm + rotary embedding ----------------------------------------------------------------


def norm_rope_case(batch, heads, kv_heads, head_dim, gated=False, dtype=mx.float32):
    q = mx.random.normal((batch, 1, heads, head_dim * (2 if gated else 1))).astype(dtype)
    k = mx.random.normal((batch, 1, kv_heads, head_dim)).astype(dtype)
    q_w = (1 + 0.1 * mx.random.normal((head_dim,))).astype(dtype)
    k_w = (1 + 0.1 * mx.random.normal((head_dim,))).astype(dtype)
    return q, k, q_w, k_w


def norm_rope_float64(x, w, position, *, eps, rope_dims, traditional, base, scale):
    """One (B, 1, H, hd) input normalised and rotated in float64 numpy -> (B, H, 1, hd)."""
    x = np.array(x.astype(mx.float32), dtype=np.float64)
    if w is not None:
        w = np.array(w.astype(mx.float32), dtype=np.float64)
        x = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w
    half = rope_dims // 2
    theta = scale * position * base ** (-np.arange(half) / half)
    c, s = np.cos(theta), np.sin(theta)
    out = x.copy()
    if traditional:
        x1, x2 = x[..., 0:rope_dims:2], x[..., 1:rope_dims:2]
        out[..., 0:rope_dims:2], out[..., 1:rope_dims:2] = x1 * c - x2 * s, x1 * s + x2 * c
    else:
        x1, x2 = x[..., :half], x[..., half:rope_dims]
        out[..., :half], out[..., half:rope_dims] = x1 * c - x2 * s, x1 * s + x2 * c
    return out.transpose(0, 2, 1, 3)


def norm_rope(q, k, q_w, k_w, pos, *, stacked=True, backend="cuda", **kw):
    """attention.qk_norm_rope on q (B, 1, H, qw), k (B, 1, H_kv, hd) and a fresh v, given as the
    stacked projection output or as three arrays; checks that kv_new is (2, B, H_kv, 1, hd) with v
    in [1] as it went in, exactly, and returns the queries and the keys (kv_new[0])."""
    B, _, H, qw = q.shape
    n_kv, hd = k.shape[2], k.shape[3]
    v = mx.random.normal(k.shape).astype(k.dtype)
    parts = (q.reshape(B, 1, -1), k.reshape(B, 1, -1), v.reshape(B, 1, -1))
    qkv = mx.concatenate(parts, axis=-1) if stacked else parts
    dims = dict(heads=H, kv_heads=n_kv, head_dim=hd, q_width=qw)
    queries, kv_new = attention.qk_norm_rope(qkv, q_w, k_w, pos, **dims, **kw, backend=backend)
    assert kv_new.shape == (2, B, n_kv, 1, hd)
    assert mx.array_equal(kv_new[1], v.transpose(0, 2, 1, 3)), "values not copied out as they are"
    return queries, kv_new[0]


def err64(y, truth) -> float:
    return float(np.abs(np.array(y.astype(mx.float32), dtype=np.float64) - truth).max() / np.abs(truth).max())


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("norm", [True, False])
def test_norm_rope_reference_is_the_separate_ops(gated, norm, seed):
    q, k, q_w, k_w = norm_rope_case(1, 4, 2, 64, gated)
    q_w, k_w = (q_w, k_w) if norm else (None, None)
    kw = dict(eps=1e-6, rope_dims=32, traditional=False, base=10000.0, scale=1.0)
    got_q, got_k = attention.qk_norm_rope_reference(q, k, q_w, k_w, mx.array([7], dtype=mx.int32), **kw)
    query = mx.fast.rms_norm(q[..., :64], q_w, 1e-6) if norm else q[..., :64]
    want_q = mx.fast.rope(query.transpose(0, 2, 1, 3), 32, traditional=False, base=1e4, scale=1.0, offset=7)
    assert got_q.shape == (1, 4, 1, 64) and got_k.shape == (1, 2, 1, 64)
    assert mx.array_equal(got_q, want_q)
    truth = norm_rope_float64(k, k_w, 7, **kw)
    assert err64(got_k, truth) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("traditional", [False, True])
def test_norm_rope_reference_matches_float64_for_two_sequences(traditional, seed):
    q, k, q_w, k_w = norm_rope_case(2, 8, 2, 128, gated=True)
    kw = dict(eps=1e-6, rope_dims=64, traditional=traditional, base=1e6, scale=0.5)
    got = attention.qk_norm_rope_reference(q, k, q_w, k_w, mx.array([5], dtype=mx.int32), **kw)
    truths = [norm_rope_float64(x[..., :128], w, 5, **kw) for x, w in ((q, q_w), (k, k_w))]
    for g, truth in zip(got, truths):
        assert err64(g, truth) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "three"])
def test_norm_rope_reference_path_gives_kv_new_in_the_cache_layout(stacked, seed):
    """qk_norm_rope's own reference path (what a head dim not a multiple of 32 runs): queries, and
    keys then values in one (2, B, H_kv, 1, hd) array, as KVCache.write takes them."""
    q, k, q_w, k_w = norm_rope_case(2, 4, 2, 64, gated=True)
    kw = dict(eps=1e-6, rope_dims=32, traditional=False, base=1e6, scale=0.5)
    got = norm_rope(q, k, q_w, k_w, mx.array([9], dtype=mx.int32), stacked=stacked, backend="reference", **kw)
    for g, x, w in zip(got, (q, k), (q_w, k_w)):
        assert err64(g, norm_rope_float64(x[..., :64], w, 9, **kw)) < 1e-5, f"seed {seed}"


@needs_cuda
@pytest.mark.parametrize("head_dim, rope_dims", [(128, 128), (64, 64), (256, 64), (128, 32)])
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("position", [0, 5, 3000])
@pytest.mark.parametrize("gated, norm", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "three"])
def test_norm_rope_kernel_matches_float64(
    head_dim, rope_dims, traditional, position, gated, norm, stacked, seed
):
    """Judged by float64 arithmetic (norm_rope_float64): within 1e-5 where the angle is small; at
    position 3000 (theta up to 1500, whose float32 rounding alone moves cos by ~1e-4) within 3e-4.

    Not judged by MLX's own ops here: on the H200 (MLX 0.32.4 CUDA), mx.fast.rms_norm then
    mx.fast.rope with a (1,) position array on B=2 came out 1.46 (relative) from float64 at
    position 5 while this kernel was 1.4e-7 from it. mx.fast.rope reads an array offset per
    sequence (the CPU broadcasts a (1,) one); the reference now repeats it per sequence, not yet
    re-run on a GPU. The CPU test above holds the reference to float64."""
    q, k, q_w, k_w = norm_rope_case(2, 8, 2, head_dim, gated)
    q_w, k_w = (q_w, k_w) if norm else (None, None)
    pos = mx.array([position], dtype=mx.int32)
    kw = dict(eps=1e-6, rope_dims=rope_dims, traditional=traditional, base=1e6, scale=0.5)
    got = norm_rope(q, k, q_w, k_w, pos, stacked=stacked, **kw)
    truths = [norm_rope_float64(x[..., :head_dim], w, position, **kw) for x, w in ((q, q_w), (k, k_w))]
    tolerance = 1e-5 if position < 1000 else 3e-4
    for name, g, truth in zip("qk", got, truths):
        assert g.shape == truth.shape
        assert err64(g, truth) < tolerance, f"{name}: {err64(g, truth):.2e} from float64 (seed {seed})"


@needs_cuda
def test_norm_rope_kernel_bfloat16_within_rounding(seed):
    q, k, q_w, k_w = norm_rope_case(1, 32, 4, 128, dtype=mx.bfloat16)
    pos = mx.array([41], dtype=mx.int32)
    kw = dict(eps=1e-6, rope_dims=128, traditional=False, base=1e6, scale=1.0)
    got = norm_rope(q, k, q_w, k_w, pos, **kw)
    truths = [norm_rope_float64(x, w, 41, **kw) for x, w in ((q, q_w), (k, k_w))]
    for g, truth in zip(got, truths):
        assert g.dtype == mx.bfloat16 and err64(g, truth) < 1e-2, f"seed {seed}"
