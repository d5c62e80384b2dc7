"""The one-launch Gated DeltaNet decode step against the pure-MLX path (flashmoe.models.gated_delta's math)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from flashmoe.kernels import gated_delta
from tests.helpers import needs_cuda, rel_err


def inputs(batch, n_k, n_v, d_k, d_v, width, dtype):
    c = 2 * n_k * d_k + n_v * d_v
    r = mx.random
    return dict(
        qkv=r.normal((batch, c)).astype(dtype),
        conv_state=r.normal((batch, width - 1, c)).astype(dtype),
        conv_w=(0.5 * r.normal((width, c))).astype(dtype),
        z=r.normal((batch, n_v, d_v)).astype(dtype),
        b=r.normal((batch, n_v)).astype(dtype),
        a=r.normal((batch, n_v)).astype(dtype),
        A_log=r.uniform(-1, 1, (n_v,)),
        dt_bias=r.normal((n_v,)),
        norm_w=(1 + 0.1 * r.normal((d_v,))).astype(dtype),
        state=0.1 * r.normal((batch, n_v, d_v, d_k)),
    )


def key_head_inputs(args, n_k, n_v, d_k, d_v):
    """(fused, split): args with random qwen3_next projections in, qkvz (B, n_k (2 d_k + 2 r d_v)) as
    qkv and z and ba (B, n_k 2 r) as b and a (what key_heads=True takes), and args with the same
    values split by split_key_heads (what reference() takes)."""
    batch, r = args["qkv"].shape[0], n_v // n_k
    qkvz = mx.random.normal((batch, n_k * (2 * d_k + 2 * r * d_v)))
    ba = mx.random.normal((batch, n_k * 2 * r))
    qkv, z, b, a = (
        t[:, 0] for t in gated_delta.split_key_heads(qkvz[:, None], ba[:, None], n_k, n_v, d_k, d_v)
    )
    return dict(args, qkv=qkvz, z=qkvz, b=ba, a=ba), dict(args, qkv=qkv, z=z, b=b, a=a)


@needs_cuda
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-4), (mx.bfloat16, 3e-2)], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", [(2, 4, 64, 32), (16, 32, 128, 128)], ids=["small", "coder-next"])
def test_step_matches_reference(batch, dtype, tol, heads, seed):
    n_k, n_v, d_k, d_v = heads
    args = inputs(batch, n_k, n_v, d_k, d_v, 4, dtype)
    dims = dict(n_k=n_k, n_v=n_v, d_k=d_k, d_v=d_v, rms_eps=1e-6)
    out, state, conv = gated_delta.gated_delta_step(**args, **dims, backend="cuda")
    f32 = {k: v.astype(mx.float32) for k, v in args.items()}
    r_out, r_state, r_conv = gated_delta.reference(**f32, **dims)
    assert out.shape == (batch, n_v, d_v) and out.dtype == dtype
    errs = rel_err(out, r_out), rel_err(state, r_state), rel_err(conv, r_conv)
    assert max(errs) < tol, f"out/state/conv rel err {errs} (seed {seed})"
    # a second step from the kernel's own outputs still agrees
    args2 = dict(args, conv_state=conv, state=state, qkv=mx.random.normal(args["qkv"].shape).astype(dtype))
    out2, _, _ = gated_delta.gated_delta_step(**args2, **dims, backend="cuda")
    r2, _, _ = gated_delta.reference(**{k: v.astype(mx.float32) for k, v in args2.items()}, **dims)
    assert rel_err(out2, r2) < tol, f"second step (seed {seed})"


@needs_cuda
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("heads", [(2, 4, 64, 32), (16, 32, 128, 128)], ids=["small", "coder-next"])
def test_key_head_layout_reads_the_projections_as_they_come(batch, heads, seed):
    """qwen3_next's in_proj_qkvz / in_proj_ba outputs straight in (key_heads=True) against the
    reference on split_key_heads' split of the same arrays."""
    n_k, n_v, d_k, d_v = heads
    fused, split = key_head_inputs(inputs(batch, n_k, n_v, d_k, d_v, 4, mx.float32), n_k, n_v, d_k, d_v)
    dims = dict(n_k=n_k, n_v=n_v, d_k=d_k, d_v=d_v, rms_eps=1e-6)
    out, state, conv = gated_delta.gated_delta_step(**fused, **dims, key_heads=True, backend="cuda")
    r_out, r_state, r_conv = gated_delta.reference(**split, **dims)
    errs = rel_err(out, r_out), rel_err(state, r_state), rel_err(conv, r_conv)
    assert max(errs) < 1e-4, f"out/state/conv rel err {errs} (seed {seed})"


@pytest.mark.parametrize("key_heads", [False, True])
def test_reference_takes_the_projections_with_their_token_axis(key_heads, seed):
    """Unstacked projections come in as the model has them, (B, 1, ...): the same step as (B, ...)."""
    n_k, n_v, d_k, d_v = 2, 4, 32, 32
    args = inputs(2, n_k, n_v, d_k, d_v, 4, mx.float32)
    dims = dict(n_k=n_k, n_v=n_v, d_k=d_k, d_v=d_v, rms_eps=1e-6, key_heads=key_heads, backend="reference")
    if key_heads:
        args = key_head_inputs(args, n_k, n_v, d_k, d_v)[0]
    flat = gated_delta.gated_delta_step(**args, **dims)
    with_axis = {k: args[k].reshape(2, 1, -1) for k in ("qkv", "z", "b", "a")}
    got = gated_delta.gated_delta_step(**dict(args, **with_axis), **dims)
    assert all(mx.array_equal(g, f) for g, f in zip(got, flat)), f"seed {seed}"
