"""The native Gated DeltaNet kernels: the recurrence (gated_delta_update) against the rule in float64 numpy
and against mx.fast.gated_delta_update, the op it stands in for; the decode step (gated_delta_step)
against kernels.gated_delta.reference, the model's pure-MLX lines."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.kernels import gated_delta, native
from tests.helpers import rel_err
from tests.kernels import test_gated_delta_kernel

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native CPU kernels not built here: {native.why_unavailable()}"
)

# (B, T, Hk, Hv, dk, dv): one decode token at Qwen3-Coder-Next's heads; a prompt with two value heads
# per key head; odd sizes (dk not a multiple of the SIMD width); several sequences
SHAPES = [(1, 1, 16, 32, 128, 128), (1, 6, 2, 4, 64, 32), (2, 3, 3, 3, 20, 7), (3, 1, 1, 2, 32, 16)]


def case(B, T, Hk, Hv, dk, dv):
    r = mx.random
    return (
        r.normal((B, T, Hk, dk)) * dk**-0.5,
        r.normal((B, T, Hk, dk)) * dk**-0.5,
        r.normal((B, T, Hv, dv)),
        r.uniform(0.5, 1.0, (B, T, Hv)),  # decay
        r.uniform(0.0, 1.0, (B, T, Hv)),  # beta
        r.normal((B, Hv, dv, dk)),
    )


def rule64(q, k, v, g, beta, state):
    """The gated delta rule, token by token, in float64: (y (B, T, Hv, dv), state (B, Hv, dv, dk))."""
    q, k, v, g, beta, S = (np.array(a, dtype=np.float64) for a in (q, k, v, g, beta, state))
    B, T, Hk, _ = q.shape
    Hv = v.shape[2]
    y = np.zeros(v.shape)
    for t in range(T):
        for h in range(Hv):
            kh = h // (Hv // Hk)  # value head h reads key head h / (Hv / Hk)
            S[:, h] *= g[:, t, h, None, None]
            delta = (v[:, t, h] - np.einsum("bij,bj->bi", S[:, h], k[:, t, kh])) * beta[:, t, h, None]
            S[:, h] += delta[:, :, None] * k[:, t, kh, None, :]
            y[:, t, h] = np.einsum("bij,bj->bi", S[:, h], q[:, t, kh])
    return y, S


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_rule_and_mlx(shape, seed):
    args = case(*shape)
    y, state = native.gated_delta_update(*args)
    want_y, want_state = rule64(*args)
    assert y.shape == want_y.shape and state.shape == want_state.shape
    errs = (rel_err(y, mx.array(want_y, mx.float32)), rel_err(state, mx.array(want_state, mx.float32)))
    assert max(errs) < 1e-5, f"y / state rel err {errs} (seed {seed})"
    theirs = mx.fast.gated_delta_update(*args)
    assert rel_err(y, theirs[0]) < 1e-5 and rel_err(state, theirs[1]) < 1e-5, f"seed {seed}"


def test_strided_inputs(seed):
    """Transposed or sliced inputs (not row-contiguous) read as their contiguous copies."""
    _, k, v, g, beta, _ = case(1, 4, 2, 4, 32, 16)
    q = mx.random.normal((1, 4, 2, 64))[..., ::2]  # every other element
    state = mx.swapaxes(mx.random.normal((1, 4, 32, 16)), 2, 3)  # (1, 4, 16, 32), transposed
    got = native.gated_delta_update(q, k, v, g, beta, state)
    want = native.gated_delta_update(mx.array(np.array(q)), k, v, g, beta, mx.array(np.array(state)))
    assert all(mx.array_equal(a, b) for a, b in zip(got, want)), f"seed {seed}"


def test_recurrence_takes_native_for_float32_only(monkeypatch, seed):
    calls = []
    monkeypatch.setattr(
        native, "gated_delta_update", lambda *a: calls.append(a) or mx.fast.gated_delta_update(*a)
    )
    args = case(1, 1, 2, 2, 32, 16)
    gated_delta.recurrence(*args, backend="native")
    gated_delta.recurrence(*args, backend="mlx")
    gated_delta.recurrence(*(a.astype(mx.bfloat16) for a in args[:5]), args[5], backend="native")
    assert len(calls) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "g": a["g"][..., :1]}, "g and beta must both be (B, T, Hv) = (1, 2, 4)"),
        (lambda a: {**a, "v": a["v"][:, :1]}, "v must be (B, T, Hv, dv) with q's B = 1 and T = 2"),
        (lambda a: {**a, "state": a["state"][..., :8]}, "state must be (B, Hv, dv, dk) = (1, 4, 16, 32)"),
        (lambda a: {**a, "k": a["k"].astype(mx.bfloat16)}, "k must be float32"),
        (
            lambda a: {
                **a,
                "v": a["v"][:, :, :3],
                "g": a["g"][..., :3],
                "beta": a["beta"][..., :3],
                "state": a["state"][:, :3],
            },
            "value heads 3 must be a multiple of key heads 2",
        ),
    ],
)
def test_bad_inputs_say_what_was_expected(change, message):
    args = dict(zip(("q", "k", "v", "g", "beta", "state"), case(1, 2, 2, 4, 32, 16)))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        native.gated_delta_update(**change(args))


# --- the whole decode step after the projections (native.gated_delta_step) -------------------------

STEP_NAMES = ("qkv", "conv_state", "conv_w", "z", "b", "a", "A_log", "dt_bias", "norm_w", "state")


@pytest.mark.parametrize(
    "heads", [(1, 16, 32, 128, 128), (2, 2, 4, 64, 32), (3, 3, 3, 20, 8)], ids=["coder-next", "gqa", "odd"]
)
def test_step_matches_the_reference_step(heads, seed):
    """conv, silu, q/k norms, gates, the rule and the gated RMSNorm in one primitive against
    kernels.gated_delta.reference (the model's pure-MLX lines), two steps chained."""
    B, n_k, n_v, d_k, d_v = heads
    args = test_gated_delta_kernel.inputs(B, n_k, n_v, d_k, d_v, 4, mx.float32)
    dims = dict(n_k=n_k, n_v=n_v, d_k=d_k, d_v=d_v, rms_eps=1e-6)
    for _ in range(2):
        got = native.gated_delta_step(
            *(args[k] for k in STEP_NAMES), key_heads=n_k, qk_eps=gated_delta.QK_L2_EPS, rms_eps=1e-6
        )
        want = gated_delta.reference(**args, **dims)
        errs = [rel_err(g, w) for g, w in zip(got, want)]
        assert max(errs) < 1e-5, f"out / state / conv rel err {errs} (seed {seed})"
        args = dict(args, state=got[1], conv_state=got[2], qkv=mx.random.normal(args["qkv"].shape))


def test_step_names_the_input_that_does_not_fit():
    args = test_gated_delta_kernel.inputs(1, 2, 4, 32, 16, 4, mx.float32)
    args["z"] = args["z"][:, :3]
    with pytest.raises(ValueError, match=r"gated_delta_step: z must be \(1, 4, 16\) .* got \(1, 3, 16\)"):
        native.gated_delta_step(*(args[k] for k in STEP_NAMES), key_heads=2, qk_eps=1e-6, rms_eps=1e-6)


@pytest.mark.parametrize("form", ["split", "key heads", "stacked"])
def test_gated_delta_step_takes_the_native_kernel_in_every_input_form(form, monkeypatch, seed):
    """kernels.gated_delta.gated_delta_step on the native backend: the inputs as the model gives them
    (qwen3_5's split projections, qwen3_next's key-head layout, one stacked row read by layout) go
    through the native kernel and give the reference backend's answer."""
    n_k, n_v, d_k, d_v = 2, 4, 32, 16
    args = test_gated_delta_kernel.inputs(2, n_k, n_v, d_k, d_v, 4, mx.float32)
    dims = dict(n_k=n_k, n_v=n_v, d_k=d_k, d_v=d_v, rms_eps=1e-6)
    extra = {}
    if form == "key heads":
        args = test_gated_delta_kernel.key_head_inputs(args, n_k, n_v, d_k, d_v)[0]
        extra = dict(key_heads=True)
    elif form == "stacked":
        parts = [args["qkv"], args["z"].reshape(2, -1), args["b"], args["a"]]
        row = mx.concatenate(parts, axis=-1)  # (B, C + H_v d_v + 2 H_v), as a stacked in_proj gives
        starts = [0, *np.cumsum([p.shape[-1] for p in parts[:-1]]).tolist()]
        args = dict(args, qkv=row, z=row, b=row, a=row)
        extra = dict(layout=tuple((row.shape[-1], at) for at in starts))
    calls = []
    kernel = native.gated_delta_step
    monkeypatch.setattr(native, "gated_delta_step", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    got = gated_delta.gated_delta_step(**args, **dims, **extra, backend="native")
    want = gated_delta.gated_delta_step(**args, **dims, **extra, backend="reference")
    assert calls == [1]
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) < 1e-5, f"out / state / conv rel err {errs} (seed {seed})"
