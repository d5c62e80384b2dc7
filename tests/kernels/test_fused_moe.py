"""Fused MoE kernels (flashmoe.kernels.moe) against their pure-MLX references, on fresh random data."""

from __future__ import annotations

import mlx.core as mx
import pytest

from flashmoe.kernels import moe
from tests.helpers import needs_cuda, rel_err

BACKEND = "cuda"


def stack(experts, out_dim, in_dim, bits, group_size, dtype=mx.float32):
    w = mx.random.normal((experts, out_dim, in_dim)).astype(dtype)
    return mx.quantize(w, group_size=group_size, bits=bits)


def experts_layer(x, gate, up, down, ids, weights, *, bits, group_size, backend):
    """A token's experts through the two fused launches: moe_gate_up, then moe_down."""
    kw = dict(bits=bits, group_size=group_size, backend=backend)
    return moe.moe_down(moe.moe_gate_up(x, gate, up, ids, **kw), down, ids, weights, **kw)


def layer(bits, group_size, dtype, experts=8, d=256, inter=128):
    gate, up = (
        stack(experts, inter, d, bits, group_size, dtype),
        stack(experts, inter, d, bits, group_size, dtype),
    )
    down = stack(experts, d - 56, inter, bits, group_size, dtype)  # 200 rows: blocks overhang
    return gate, up, down


@needs_cuda
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("tokens", [None, 3])
def test_gate_up_and_down_match_reference(bits, group_size, tokens, seed):
    gate, up, down = layer(bits, group_size, mx.float32)
    k = 3
    lead = () if tokens is None else (tokens,)
    x = mx.random.normal((*lead, 256))
    ids = mx.random.randint(0, 8, (*lead, k)).astype(mx.uint32)
    weights = mx.softmax(mx.random.normal((*lead, k)), axis=-1)
    h = moe.moe_gate_up(x, gate, up, ids, bits=bits, group_size=group_size, backend=BACKEND)
    h_ref = moe.moe_gate_up_reference(x, gate, up, ids, bits=bits, group_size=group_size)
    assert h.shape == (*lead, k, 128)
    assert rel_err(h, h_ref) < 1e-4, f"gate_up (seed {seed})"
    y = moe.moe_down(h_ref, down, ids, weights, bits=bits, group_size=group_size, backend=BACKEND)
    y_ref = moe.moe_down_reference(h_ref, down, ids, weights, bits=bits, group_size=group_size)
    assert y.shape == (*lead, 200)
    assert rel_err(y, y_ref) < 1e-4, f"down (seed {seed})"


@needs_cuda
def test_streamed_experts_packed_in_a_buffer(seed):
    """The K selected experts copied into a (K, out, words) buffer, ids = arange(K): same answer."""
    gate, up, down = layer(4, 64, mx.float32)
    ids = mx.array([5, 1, 6, 2], dtype=mx.uint32)
    weights = mx.softmax(mx.random.normal((4,)))
    x = mx.random.normal((256,))
    packed = [tuple(t[ids] for t in m) for m in (gate, up, down)]
    local = mx.arange(4, dtype=mx.uint32)
    kw = dict(bits=4, group_size=64)
    y = experts_layer(x, *packed, local, weights, **kw, backend=BACKEND)
    ref = experts_layer(x, gate, up, down, ids, weights, **kw, backend="reference")
    assert rel_err(y, ref) < 1e-4, f"seed {seed}"


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_bfloat16_coder_next_width(bits, seed):
    """Qwen3-Coder-Next's expert shape (D 2048, I 512, 10 of 64 experts here), bf16: within bf16 rounding."""
    gate = stack(64, 512, 2048, bits, 64, mx.bfloat16)
    up = stack(64, 512, 2048, bits, 64, mx.bfloat16)
    down = stack(64, 2048, 512, bits, 64, mx.bfloat16)
    x = mx.random.normal((2048,)).astype(mx.bfloat16)
    ids, weights = moe.route(mx.random.normal((64,)), 10)
    y = experts_layer(x, gate, up, down, ids, weights, bits=bits, group_size=64, backend=BACKEND)
    ref = experts_layer(
        x.astype(mx.float32),
        gate,
        up,
        down,
        ids,
        weights,
        bits=bits,
        group_size=64,
        backend="reference",
    )
    assert y.dtype == mx.bfloat16 and rel_err(y, ref) < 2e-2, f"seed {seed}"


def test_route_renormalises_top_k(seed):
    logits = mx.random.normal((3, 16))
    ids, weights = moe.route(logits, 4, norm_topk_prob=True)
    probs = mx.softmax(logits, axis=-1)
    top = mx.sort(probs, axis=-1)[:, -4:]
    assert mx.allclose(mx.sort(mx.take_along_axis(probs, ids.astype(mx.int32), -1), -1), top).item()
    assert mx.allclose(weights.sum(-1), mx.ones((3,))).item()


def test_reference_backend_runs_anywhere(seed):
    gate, up, down = layer(4, 64, mx.float32)
    ids = mx.array([0, 7], dtype=mx.uint32)
    y = experts_layer(
        mx.random.normal((256,)),
        gate,
        up,
        down,
        ids,
        mx.array([0.5, 0.5]),
        bits=4,
        group_size=64,
        backend="reference",
    )
    assert y.shape == (200,) and not mx.any(mx.isnan(y)).item()


def distinct_logits(rows, experts, dtype):
    """Logits without ties (a permutation of a grid exact in bf16), so every backend picks one set."""
    perm = mx.stack([mx.random.permutation(experts) for _ in range(rows)])
    return ((perm.astype(mx.float32) - experts / 2) / 64).astype(dtype)


@needs_cuda
@pytest.mark.parametrize("experts, k", [(60, 4), (128, 8), (512, 10), (33, 33)])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_route_kernel_matches_reference(experts, k, norm, dtype, seed):
    logits = distinct_logits(3, experts, dtype)
    ids, weights = moe.route(logits, k, norm, backend=BACKEND, out_dtype=mx.float32)
    ref_ids, ref_weights = moe.route_reference(logits, k, norm)
    assert ids.dtype == mx.uint32 and ids.shape == ref_ids.shape == (3, k)
    order, ref_order = mx.argsort(ids, axis=-1), mx.argsort(ref_ids, axis=-1)
    assert mx.array_equal(mx.take_along_axis(ids, order, -1), mx.take_along_axis(ref_ids, ref_order, -1))
    w, ref_w = mx.take_along_axis(weights, order, -1), mx.take_along_axis(ref_weights, ref_order, -1)
    assert rel_err(w, ref_w) < 1e-6, f"seed {seed}"
    probs = mx.take_along_axis(mx.softmax(logits.astype(mx.float32), axis=-1), ids.astype(mx.int32), -1)
    assert mx.all(probs[:, :-1] >= probs[:, 1:]).item()  # the kernel lists them most probable first


@needs_cuda
def test_route_kernel_writes_the_requested_dtype(seed):
    ids, weights = moe.route(distinct_logits(1, 512, mx.bfloat16), 10, backend=BACKEND, out_dtype=mx.bfloat16)
    assert weights.dtype == mx.bfloat16 and abs(weights.astype(mx.float32).sum().item() - 1) < 1e-2


@needs_cuda
@pytest.mark.parametrize("experts, k", [(60, 4), (128, 8), (512, 10)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_routed_gate_up_is_the_route_kernel_then_gate_up(experts, k, dtype, monkeypatch, seed):
    """The routed form routes each token inside the gate/up kernel: the same ids, weights and SwiGLU
    outputs as the route kernel followed by the plain gate/up kernel (outputs poisoned with NaN first,
    so an unwritten id or weight shows)."""
    from flashmoe.kernels import gpu

    monkeypatch.setattr(gpu, "_poison", float("nan"))
    gate, up = (stack(experts, 256, 512, 4, 64, dtype) for _ in range(2))
    x, logits = mx.random.normal((3, 512)).astype(dtype), distinct_logits(3, experts, dtype)
    norm = (mx.random.uniform(0.5, 1.5, (512,)).astype(dtype), 1e-6)
    kw = dict(bits=4, group_size=64, backend=BACKEND)
    h, ids, weights = moe.routed_gate_up(x, gate, up, logits, k, True, **kw, norm=norm)
    want_ids, want_weights = moe.route(logits, k, True, backend=BACKEND, out_dtype=dtype)
    assert ids.tolist() == want_ids.tolist(), f"seed {seed}"
    assert mx.array_equal(weights, want_weights), f"seed {seed}"
    assert mx.array_equal(h, moe.moe_gate_up(x, gate, up, want_ids, **kw, norm=norm)), f"seed {seed}"


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_shared_expert_slot_matches_reference(bits, dtype, monkeypatch, seed):
    """The shared forms at Qwen3-Coder-Next's widths (D 2048, 512 experts, K 10, I 512), two tokens:
    routed_gate_up with the shared expert as slot K (the router's logits one column wider, the shared
    gate's) against the route kernel and the references; moe_down's shared form against its reference
    (outputs poisoned with NaN first)."""
    from flashmoe.kernels import gpu

    monkeypatch.setattr(gpu, "_poison", float("nan"))
    experts, k, d, inter = 512, 10, 2048, 512
    gate, up = (stack(experts, inter, d, bits, 64, dtype) for _ in range(2))
    down = stack(experts, d, inter, bits, 64, dtype)
    shared_gate_up = tuple(a[0] for a in stack(1, 2 * inter, d, bits, 64, dtype))
    shared_down = tuple(a[0] for a in stack(1, d, inter, bits, 64, dtype))
    x = (0.5 * mx.random.normal((2, d))).astype(dtype)
    logits = mx.concatenate([distinct_logits(2, experts, dtype), mx.random.normal((2, 1)).astype(dtype)], -1)
    kw = dict(bits=bits, group_size=64, backend=BACKEND)
    h, ids, weights = moe.routed_gate_up(
        x, gate, up, logits, k, True, **kw, shared=shared_gate_up, experts=experts
    )
    want_ids, want_weights = moe.route(logits[:, :experts], k, True, backend=BACKEND, out_dtype=dtype)
    assert ids.tolist() == want_ids.tolist() and mx.array_equal(weights, want_weights), f"seed {seed}"
    ref = dict(bits=bits, group_size=64, shared=shared_gate_up)
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    assert rel_err(h, moe.moe_gate_up_reference(x, gate, up, want_ids, **ref)) < tol, f"seed {seed}"
    shared_gate = moe.SharedGate(logits, experts)
    y = moe.moe_down(h, down, ids, weights, **kw, residual=x, shared=shared_down, shared_gate=shared_gate)
    want = x + moe.moe_down_reference(
        h, down, ids, weights, bits=bits, group_size=64, shared=shared_down, shared_gate=shared_gate
    )
    assert not mx.isnan(y).any().item() and rel_err(y, want) < tol, f"seed {seed}"
