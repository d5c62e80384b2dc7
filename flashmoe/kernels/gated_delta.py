"""Gated DeltaNet decode step (T = 1) in one launch: conv update, gating, state update, gated norm.

    gated_delta_step(qkv, conv_state, conv_w, z, b, a, A_log, dt_bias, norm_w, state,
                     n_k=, n_v=, d_k=, d_v=, rms_eps=, key_heads=) -> (out, state, conv_state)
    split_key_heads(qkvz, ba, n_k=, n_v=, d_k=, d_v=) -> qkv, z, b, a
    recurrence(q, k, v, decay, beta, state, backend=) -> (out, state)    the rule alone, any T (CPU paths)

For B sequences: qkv (B, C) the in-projection's [q | k | v] (C = 2 n_k d_k + n_v d_v), before the
conv; conv_state (B, W-1, C) the last W-1 inputs; conv_w (W, C) the depthwise kernel
(GatedDeltaNet.conv_weight); z (B, n_v, d_v); b, a (B, n_v); A_log, dt_bias (n_v,);
norm_w (d_v,); state (B, n_v, d_v, d_k) float32. Returns out (B, n_v, d_v) in qkv's dtype,
rmsnorm(o) * norm_w * silu(z), ready for out_proj; the new state (float32) and conv state.
The math is flashmoe.models.gated_delta.GatedDeltaNet's (mlx-lm's qwen3_next); reference()
below is that path in pure MLX.

key_heads=True takes qwen3_next's projections as they come (split_key_heads' inputs): qkv = z =
qkvz (B, n_k * (2 d_k + 2 r d_v)) and b = a = ba (B, n_k * 2 r), r = n_v / n_k; the kernel reads
each value where it lies instead of copies splitting them first.

Backends: metal and cuda run src/gated_delta_step.inc; native runs the C++ kernel of the
_flashmoe_native extension (float32: native.gated_delta_step), and any other backend reference(),
both on the inputs split as reference() takes them.
"""

from __future__ import annotations

import mlx.core as mx

from . import fused_backend, gpu, native

INPUTS = (
    "qkv",
    "conv_state",
    "conv_w",
    "z",
    "b",
    "a",
    "A_log",
    "dt_bias",
    "norm_w",
    "state",
    "eps",
)
OUTPUTS = ("out", "state_out", "conv_out")
QK_L2_EPS = 1e-6  # mlx-lm's l2norm eps, added to sum(x^2) (models.gated_delta uses it too)
SIMDS = 8


def gated_delta_step(
    qkv,
    conv_state,
    conv_w,
    z,
    b,
    a,
    A_log,
    dt_bias,
    norm_w,
    state,
    *,
    n_k: int,
    n_v: int,
    d_k: int,
    d_v: int,
    rms_eps: float,
    key_heads: bool = False,
    layout: tuple | None = None,
    flat: bool = False,
    backend: str = "auto",
):
    """layout: None (qkv, z, b, a each its own array, as above), or ((row, offset) of qkv, z, b, a):
    where sequence b's values start (b * row + offset) in a larger array given as that input (the
    projections' stacked output, passed as all four: no slices made). flat: out as (B, 1, HV * DV),
    as out_proj takes it, instead of (B, HV, DV)."""
    if native_step_runs(backend, qkv.dtype):
        cpu_step = _native_step
    else:
        cpu_step = reference if fused_backend(backend) == "reference" else None
    if cpu_step is not None:  # the inputs split as reference() takes them, then one CPU kernel or MLX's ops
        if layout is not None:
            qkv, z, b, a = _unstack(qkv, layout, n_k, n_v, d_k, d_v, key_heads)
        else:  # each its own array, maybe with a token axis (B, 1, ...): the shapes reference() takes
            B = conv_state.shape[0]
            qkv, b, a = (t.reshape(B, -1) for t in (qkv, b, a))
            z = z.reshape(B, -1) if key_heads else z.reshape(B, n_v, d_v)
        if key_heads:  # qwen3_next's layout split first
            qkv, z, b, a = (t[:, 0] for t in split_key_heads(qkv[:, None], b[:, None], n_k, n_v, d_k, d_v))
        dims = dict(n_k=n_k, n_v=n_v, d_k=d_k, d_v=d_v, rms_eps=rms_eps)
        out, new_state, new_conv = cpu_step(
            qkv, conv_state, conv_w, z, b, a, A_log, dt_bias, norm_w, state, **dims
        )
        return (out.reshape(out.shape[0], 1, -1) if flat else out), new_state, new_conv
    backend = fused_backend(backend)
    B = conv_state.shape[0]
    W = conv_w.shape[0]
    rows = layout or tuple((t.size // B, 0) for t in (qkv, z, b, a))
    eps = gpu.float_array(QK_L2_EPS, rms_eps)
    out, new_state, new_conv = gpu.kernel(
        backend,
        "gated_delta_step.inc",
        "flashmoe_gated_delta_step",
        INPUTS,
        OUTPUTS,
    )(
        inputs=[qkv, conv_state, conv_w, z, b, a, A_log, dt_bias, norm_w, state, eps],
        template=[
            ("T", qkv.dtype),
            ("DK", d_k),
            ("DV", d_v),
            ("W", W),
            ("HV", n_v),
            ("HK", n_k),
            ("SIMDS", SIMDS),
            ("LAYOUT", int(key_heads)),
            *[
                (f"{x}_{what}", v)
                for x, r in zip(("QKV", "Z", "B", "A"), rows)
                for what, v in zip(("ROW", "OFF"), r)
            ],
        ],
        grid=(B * n_v * SIMDS * 32, 1, 1),
        threadgroup=(SIMDS * 32, 1, 1),
        output_shapes=[(B, 1, n_v * d_v) if flat else (B, n_v, d_v), state.shape, conv_state.shape],
        output_dtypes=[qkv.dtype, mx.float32, conv_state.dtype],
        **gpu.output_init(),
    )
    return out, new_state, new_conv


def _unstack(stacked, layout, n_k, n_v, d_k, d_v, key_heads) -> tuple:
    """qkv, z, b, a (or qkvz, qkvz, ba, ba for key_heads) cut out of the stacked array (B, ...) by layout."""
    B = stacked.shape[0]
    rows = stacked.reshape(B, -1)
    r = n_v // n_k
    widths = (
        (n_k * (2 * d_k + 2 * r * d_v),) * 2 + (n_k * 2 * r,) * 2
        if key_heads
        else (2 * n_k * d_k + n_v * d_v, n_v * d_v, n_v, n_v)
    )
    parts = [rows[:, off : off + width] for (_, off), width in zip(layout, widths)]
    if not key_heads:
        parts[1] = parts[1].reshape(B, n_v, d_v)
    return tuple(parts)


def native_step_runs(backend: str, dtype: mx.Dtype) -> bool:
    """Whether gated_delta_step runs on `backend` as the native CPU kernel: the native backend computing
    in float32, with a build that has the kernel."""
    return backend == "native" and dtype == mx.float32 and native.has("gated_delta_step")


def _native_step(
    qkv, conv_state, conv_w, z, b, a, A_log, dt_bias, norm_w, state, *, n_k, n_v, d_k, d_v, rms_eps
):
    """reference()'s arguments through the native CPU kernel (float32; A_log, dt_bias as stored, cast)."""
    return native.gated_delta_step(
        qkv,
        conv_state,
        conv_w,
        z,
        b,
        a,
        A_log.astype(mx.float32),
        dt_bias.astype(mx.float32),
        norm_w,
        state,
        key_heads=n_k,
        qk_eps=QK_L2_EPS,
        rms_eps=rms_eps,
    )


def recurrence(q, k, v, decay, beta, state, *, backend: str):
    """The gated delta rule over T tokens: q, k (B, T, H_k, d_k), v (B, T, H_v, d_v), decay and beta
    (B, T, H_v), state (B, H_v, d_v, d_k) float32 -> (out (B, T, H_v, d_v), state).

    The native backend runs flashmoe's CPU kernel when everything is float32 (what it computes in),
    4.5-5x faster than mx.fast.gated_delta_update at Qwen3-Coder-Next's 32 heads of 128 x 128 on a
    2-core CPU (benchmarks/gated_delta_cpu.py); the same math, summed in another order (within 1e-5 in
    the tests). Else MLX's op.
    """
    if (
        backend == "native"
        and native.has("gated_delta_update")
        and all(a.dtype == mx.float32 for a in (q, k, v, decay, beta, state))
    ):
        return native.gated_delta_update(q, k, v, decay, beta, state)
    return mx.fast.gated_delta_update(q, k, v, decay, beta, state)


def split_key_heads(qkvz, ba, n_k: int, n_v: int, d_k: int, d_v: int):
    """qwen3_next's fused projections, grouped by key head, in the split form: qkvz (B, T, n_k *
    (2 d_k + 2 r d_v)) = [q, k, v (r heads), z (r heads)] per key head and ba (B, T, n_k * 2 r) =
    [b (r), a (r)] per key head -> qkv (B, T, C) in conv-channel order [q | k | v], z (B, T, n_v, d_v),
    b and a (B, T, n_v)."""
    B, T = qkvz.shape[:2]
    r = n_v // n_k  # value heads per key head
    qkvz = qkvz.reshape(B, T, n_k, -1)
    q, k, v, z = mx.split(qkvz, [d_k, 2 * d_k, 2 * d_k + r * d_v], axis=-1)
    b, a = mx.split(ba.reshape(B, T, n_k, 2 * r), [r], axis=-1)  # (B, T, n_k, r) each
    qkv = mx.concatenate([t.reshape(B, T, -1) for t in (q, k, v)], axis=-1)  # (B, T, C)
    return qkv, z.reshape(B, T, n_v, d_v), b.reshape(B, T, n_v), a.reshape(B, T, n_v)


def reference(
    qkv,
    conv_state,
    conv_w,
    z,
    b,
    a,
    A_log,
    dt_bias,
    norm_w,
    state,
    *,
    n_k: int,
    n_v: int,
    d_k: int,
    d_v: int,
    rms_eps: float,
):
    """GatedDeltaNet.__call__'s math for T = 1 after the projections, in pure MLX."""
    B, C = qkv.shape
    window = mx.concatenate([conv_state, qkv[:, None, :]], axis=1)  # (B, W, C)
    new_conv = window[:, 1:]
    conv = (window * conv_w).sum(axis=1)  # (B, C)
    conv = conv * mx.sigmoid(conv)
    key_dim = n_k * d_k
    q = conv[:, :key_dim].reshape(B, 1, n_k, d_k)
    k = conv[:, key_dim : 2 * key_dim].reshape(B, 1, n_k, d_k)
    v = conv[:, 2 * key_dim :].reshape(B, 1, n_v, d_v)
    inv = d_k**-0.5
    eps = QK_L2_EPS * inv**2
    q = (inv**2) * mx.fast.rms_norm(q, None, eps)
    k = inv * mx.fast.rms_norm(k, None, eps)
    decay = mx.exp(-mx.exp(A_log.astype(mx.float32)) * mx.logaddexp(a + dt_bias, 0))[:, None]  # (B, 1, H_v)
    beta = mx.sigmoid(b)[:, None]
    out, new_state = mx.fast.gated_delta_update(q, k, v, decay, beta, state)  # (B, 1, H_v, d_v)
    normed = mx.fast.rms_norm(out, norm_w, rms_eps)
    gated = (
        z.astype(mx.float32)[:, None] * mx.sigmoid(z.astype(mx.float32)[:, None]) * normed.astype(mx.float32)
    )
    return gated.astype(qkv.dtype)[:, 0], new_state, new_conv
