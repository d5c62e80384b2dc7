"""Fused mixture-of-experts kernels for decode: a token's K experts in two launches.

    moe_gate_up(x, gate, up, ids, bits=, group_size=)          x (..., D) -> (..., K, I)
        silu(gate[e] @ x) * (up[e] @ x) for the K experts e = ids (..., K), one launch
    moe_down(h, down, ids, weights, bits=, group_size=)         h (..., K, I) -> (..., D)
        sum_k weights[k] * down[ids[k]] @ h[k] (+ residual), one launch, no atomics
    shared=...                                                  (..., K + 1, I), and into (..., D)
        both (and routed_gate_up) can take the model's shared expert as slot K, added by moe_down
        with its sigmoid gate: a Qwen3-Next / Qwen2-MoE layer's experts, shared one included, in two
        launches
    route(logits, top_k, norm_topk_prob, backend=)              -> ids (..., K) uint32, weights (..., K)
        softmax, top-K and renormalisation of the router's logits, one launch on a GPU
    routed_gate_up(x, gate, up, logits, top_k, norm_topk_prob, ...) -> h, ids, weights
        route and moe_gate_up in one launch (each threadgroup routes its token itself): with moe_down,
        a decode token's routing and experts in two launches

Each kernel reading x can also RMSNorm it as it reads it (norm=(weight, eps)).

gate, up, down are mlx-lm's switch_mlp stacks (w, scales, biases): w (E, out, in * bits / 32)
uint32, scales / biases (E, out, in / group_size). Streamed experts work the same: a buffer
(K, out, words) holding only the selected experts, with ids = arange(K).

Backends: "auto" (metal, else cuda, else reference), "metal", "cuda", "reference" (the
pure-MLX ground truth below, float32 inside). Kernels cover affine 2/4/8 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from . import fused_backend, gpu, reference, rms_norm

GATE_UP_INPUTS = ("x", "gw", "gs", "gb", "uw", "us", "ub", "ids", "dims", "nw", "neps")
ROUTED_INPUTS, ROUTED_OUTPUTS = (*GATE_UP_INPUTS[:7], "logits", *GATE_UP_INPUTS[8:]), ("y", "rid", "rw")
DOWN_INPUTS = ("h", "w", "scales", "biases", "ids", "rw", "res", "dims")
# The shared-expert forms (FM_SHARED_EXPERT): the shared expert's weights (gate/up stacked), and for
# down its gate's logits
SHARED_FORM = ("FM_SHARED_EXPERT",)
GATE_UP_SHARED_INPUTS = (*GATE_UP_INPUTS, "sw", "ss", "sb")
ROUTED_SHARED_INPUTS = (*ROUTED_INPUTS, "sw", "ss", "sb")
DOWN_SHARED_INPUTS = (*DOWN_INPUTS, "sw", "ss", "sb", "sgl")
ROUTE_INPUTS, ROUTE_OUTPUTS = ("logits", "dims"), ("ids", "w")
MAX_ROUTE_EXPERTS = 32 * 64  # experts the routing kernel holds in registers (64 per lane)
MAX_DOWN_K = 16  # experts per token the fused down kernel takes (one register slot each), shared one included


@dataclass(frozen=True)
class SharedGate:
    """Where the shared expert's gate logit lies: `logits` (..., G), one row per token,
    the logit at `column` (the router's matvec carries it as its last row when the two are stacked,
    so one launch gives both)."""

    logits: mx.array
    column: int


def moe_gate_up(
    x, gate, up, ids, *, bits: int, group_size: int, backend: str = "auto", norm=None, shared=None
) -> mx.array:
    """x (..., D), ids (..., K) -> silu(gate[ids] @ x) * (up[ids] @ x) of shape (..., K, I), x's dtype;
    x first through the RMSNorm norm = (weight, eps) when given (on a GPU as the kernel reads x).
    shared: the shared expert's stacked gate and up projections (w, scales, biases) of (2I, D), as
    slot K: (..., K + 1, I)."""
    gw, gs, gb = gate
    uw, us, ub = up
    backend = fused_backend(backend)
    if backend == "reference":
        x = rms_norm(x, norm)
        return moe_gate_up_reference(x, gate, up, ids, bits=bits, group_size=group_size, shared=shared)
    out_dim, in_dim = gw.shape[-2], x.shape[-1]
    k = ids.shape[-1]
    slots = k + (shared is not None)
    idx = ids if ids.dtype == mx.uint32 else ids.astype(mx.uint32)
    p = gpu.plan(out_dim, in_dim, bits, slots=2, rps=1, kind="gate_up")
    _check_shared(shared, 2 * out_dim, gate, "moe_gate_up")
    if shared is None:
        kernel = gpu.kernel(backend, "moe_gate_up.inc", "flashmoe_moe_gate_up", GATE_UP_INPUTS)
    else:
        kernel = gpu.kernel(
            backend,
            "moe_gate_up.inc",
            "flashmoe_moe_gate_up_shared",
            GATE_UP_SHARED_INPUTS,
            ("y",),
            SHARED_FORM,
        )
    (y,) = kernel(
        inputs=[x, gw, gs, gb, uw, us, ub, idx, gpu.int_array(out_dim, in_dim, k), *gpu.norm_inputs(norm)]
        + _shared_arrays(shared),
        template=_gate_up_template(x, bits, group_size, p, norm),
        grid=(idx.size // k * slots * p.simds * 32, math.ceil(out_dim / p.rows_per_group), 1),
        threadgroup=(p.simds * 32, 1, 1),
        output_shapes=[(*ids.shape[:-1], slots, out_dim)],
        output_dtypes=[x.dtype],
        **gpu.output_init(),
    )
    return y


def _shared_arrays(shared) -> list:
    """The shared forms' weights (w, scales, biases), or nothing."""
    return [] if shared is None else list(shared)


def _check_shared(shared, rows: int, gate, name: str) -> None:
    """The shared expert's arrays must be what the kernel reads in place of the experts': `rows`
    rows, the experts' words per row and scale dtype (one spec for all)."""
    if shared is None:
        return
    w, scales, _ = shared
    if w.shape[-2] != rows or w.shape[-1] != gate[0].shape[-1] or scales.dtype != gate[1].dtype:
        raise ValueError(
            f"{name}: the shared expert's weights are {tuple(w.shape)} with {scales.dtype} scales; the "
            f"fused kernels need ({rows}, {gate[0].shape[-1]}) with {gate[1].dtype} scales (the routed experts')"
        )


def routed_gate_up(
    x,
    gate,
    up,
    logits,
    top_k: int,
    norm_topk_prob: bool = True,
    *,
    bits: int,
    group_size: int,
    backend: str = "auto",
    norm=None,
    shared=None,
    experts: int | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """route() and moe_gate_up() together: x (..., D) (RMSNorm'd by norm when given), the router's
    logits (..., L), the experts' in the first `experts` columns (default all L; a stacked shared
    gate may follow) -> (h (..., K, I) in x's dtype, or (..., K + 1, I) with `shared` as in
    moe_gate_up; ids (..., K) uint32; weights (..., K) in x's dtype).
    On a GPU one launch: each threadgroup routes its token itself (moe_gate_up.inc's routed form)."""
    row = logits.shape[-1]
    experts = row if experts is None else experts
    backend = fused_backend(backend)
    if backend == "reference" or experts > MAX_ROUTE_EXPERTS or top_k > experts:
        ids, weights = route(logits[..., :experts], top_k, norm_topk_prob, backend=backend, out_dtype=x.dtype)
        kw = dict(bits=bits, group_size=group_size, backend=backend, norm=norm, shared=shared)
        return moe_gate_up(x, gate, up, ids, **kw), ids, weights
    gw, gs, gb = gate
    uw, us, ub = up
    out_dim, in_dim = gw.shape[-2], x.shape[-1]
    _check_shared(shared, 2 * out_dim, gate, "routed_gate_up")
    tokens = logits.size // row
    slots = top_k + (shared is not None)
    p = gpu.plan(out_dim, in_dim, bits, slots=2, rps=1, kind="gate_up")
    dims = gpu.int_array(out_dim, in_dim, top_k, experts, row)
    if shared is None:
        name, inputs, form = "flashmoe_moe_gate_up_routed", ROUTED_INPUTS, ("FM_ROUTED",)
    else:
        name, inputs, form = (
            "flashmoe_moe_gate_up_routed_shared",
            ROUTED_SHARED_INPUTS,
            ("FM_ROUTED", *SHARED_FORM),
        )
    h, ids, weights = gpu.kernel(backend, "moe_gate_up.inc", name, inputs, ROUTED_OUTPUTS, form)(
        inputs=[x, gw, gs, gb, uw, us, ub, logits, dims, *gpu.norm_inputs(norm), *_shared_arrays(shared)],
        template=[
            *_gate_up_template(x, bits, group_size, p, norm)[:5],
            ("OUT_T", x.dtype),
            ("EPL", -(-experts // 32)),
            ("K", top_k),
            ("RENORM", int(norm_topk_prob)),
            *p.template(),
        ],
        grid=(tokens * slots * p.simds * 32, math.ceil(out_dim / p.rows_per_group), 1),
        threadgroup=(p.simds * 32, 1, 1),
        output_shapes=[
            (*logits.shape[:-1], slots, out_dim),
            (*logits.shape[:-1], top_k),
            (*logits.shape[:-1], top_k),
        ],
        output_dtypes=[x.dtype, mx.uint32, x.dtype],
        **gpu.output_init(),
    )
    return h, ids, weights


def _gate_up_template(x, bits: int, group_size: int, p: gpu.Plan, norm) -> list:
    """moe_gate_up.inc's template values: T, BITS, GROUP_SIZE, RPS, NORM, then the launch shape's."""
    head = [("T", x.dtype), ("BITS", bits), ("GROUP_SIZE", group_size), ("RPS", p.rps)]
    return [*head, ("NORM", int(norm is not None)), *p.template()]


def moe_down(
    h,
    down,
    ids,
    weights,
    *,
    bits: int,
    group_size: int,
    backend: str = "auto",
    residual=None,
    shared=None,
    shared_gate: SharedGate | None = None,
) -> mx.array:
    """h (..., K, I), ids and weights (..., K) -> sum_k weights[k] * down[ids[k]] @ h[k] of shape (..., D),
    plus residual (..., D) when given (added to the sum rounded to h's dtype, as `residual + y` would).

    shared: the shared expert's down projection (w, scales, biases) of (D, I), with h (..., K + 1, I)
    (moe_gate_up's shared form) and its gate's logits, `shared_gate`: y gains
    sigmoid(gate) * shared_down @ h[K] before the residual, rounded as mlx-lm's blocks round it."""
    w, scales, biases = down
    backend = fused_backend(backend)
    k = ids.shape[-1]
    slots = k + (shared is not None)
    if (shared is None) != (shared_gate is None):
        raise ValueError("moe_down: the shared expert and its gate come together")
    if backend == "reference" or slots > MAX_DOWN_K:
        y = moe_down_reference(
            h, down, ids, weights, bits=bits, group_size=group_size, shared=shared, shared_gate=shared_gate
        )
        return y if residual is None else residual + y
    out_dim, in_dim = w.shape[-2], h.shape[-1]
    _check_shared(shared, out_dim, down, "moe_down")
    tokens = ids.size // k
    idx = ids if ids.dtype == mx.uint32 else ids.astype(mx.uint32)
    p = gpu.plan(out_dim, in_dim, bits, slots=slots, x_slots=slots, rps=1, kind="down")
    res = gpu.unread(h.dtype) if residual is None else residual
    if shared is None:
        kernel = gpu.kernel(backend, "moe_down.inc", "flashmoe_moe_down", DOWN_INPUTS)
        dims, extra = gpu.int_array(out_dim, in_dim), []
    else:
        kernel = gpu.kernel(
            backend, "moe_down.inc", "flashmoe_moe_down_shared", DOWN_SHARED_INPUTS, ("y",), SHARED_FORM
        )
        logits = shared_gate.logits
        dims, extra = gpu.int_array(out_dim, in_dim, logits.shape[-1], shared_gate.column), [*shared, logits]
    (y,) = kernel(
        inputs=[h, w, scales, biases, idx, weights, res, dims, *extra],
        template=[
            ("T", h.dtype),
            ("BITS", bits),
            ("GROUP_SIZE", group_size),
            ("K", k),
            ("RES", int(residual is not None)),
            *p.template(),
        ],
        grid=(tokens * p.simds * 32, math.ceil(out_dim / p.rows_per_group), 1),
        threadgroup=(p.simds * 32, 1, 1),
        output_shapes=[(*ids.shape[:-1], out_dim)],
        output_dtypes=[h.dtype],
        **gpu.output_init(),
    )
    return y


def route(
    logits: mx.array,
    top_k: int,
    norm_topk_prob: bool = True,
    *,
    backend: str = "auto",
    out_dtype: mx.Dtype = mx.float32,
) -> tuple[mx.array, mx.array]:
    """Softmax in float32 over the experts, the top_k of them, renormalised when norm_topk_prob:
    ids (..., K) uint32 and weights (..., K) in out_dtype (mlx-lm's qwen3_next / qwen3_moe routing).

    On a GPU backend one launch (src/moe_route.inc), the ids in descending order of probability;
    the reference gives them in argpartition's order. The kernel has no gradient: training
    (many tokens) routes through the reference.
    """
    experts = logits.shape[-1]
    backend = fused_backend(backend)
    if backend == "reference" or experts > MAX_ROUTE_EXPERTS or top_k > experts:
        return route_reference(logits, top_k, norm_topk_prob, out_dtype)
    rows = logits.size // experts
    ids, weights = gpu.kernel(backend, "moe_route.inc", "flashmoe_moe_route", ROUTE_INPUTS, ROUTE_OUTPUTS)(
        inputs=[logits, gpu.int_array(experts)],
        template=[
            ("T", logits.dtype),
            ("OUT_T", out_dtype),
            ("EPL", -(-experts // 32)),
            ("K", top_k),
            ("RENORM", int(norm_topk_prob)),
        ],
        grid=(rows * 32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(*logits.shape[:-1], top_k)] * 2,
        output_dtypes=[mx.uint32, out_dtype],
        **gpu.output_init(),
    )
    return ids, weights


def route_reference(logits, top_k: int, norm_topk_prob: bool = True, out_dtype=mx.float32):
    """route() in MLX ops, as mlx-lm routes: softmax, argpartition, take, renormalise. The weights
    carry gradients (training), the ids none."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
    ids = mx.stop_gradient(mx.argpartition(probs, kth=-top_k, axis=-1)[..., -top_k:])
    weights = mx.take_along_axis(probs, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return ids.astype(mx.uint32), weights.astype(out_dtype)


# ---- pure-MLX references (float32 inside)


def moe_gate_up_reference(x, gate, up, ids, *, bits: int, group_size: int, shared=None) -> mx.array:
    g = reference.gather_dequant_matvec(x.astype(mx.float32), *gate, ids, bits=bits, group_size=group_size)
    u = reference.gather_dequant_matvec(x.astype(mx.float32), *up, ids, bits=bits, group_size=group_size)
    if shared is not None:  # slot K: the shared expert, its gate rows then its up rows
        gs, us = mx.split(
            reference.dequant_matvec(x.astype(mx.float32), *shared, bits=bits, group_size=group_size),
            2,
            axis=-1,
        )
        g, u = mx.concatenate([g, gs[..., None, :]], axis=-2), mx.concatenate([u, us[..., None, :]], axis=-2)
    return (g * mx.sigmoid(g) * u).astype(x.dtype)


def moe_down_reference(
    h, down, ids, weights, *, bits: int, group_size: int, shared=None, shared_gate: SharedGate | None = None
) -> mx.array:
    k = ids.shape[-1]
    routed = h[..., :k, :]
    y = reference.gather_dequant_matvec(
        routed.astype(mx.float32), *down, ids, bits=bits, group_size=group_size
    )
    y = (y * weights.astype(mx.float32)[..., None]).sum(-2).astype(h.dtype)  # (..., D)
    if shared is None:
        return y
    out = reference.dequant_matvec(h[..., k, :].astype(mx.float32), *shared, bits=bits, group_size=group_size)
    gate = mx.sigmoid(shared_gate.logits[..., shared_gate.column : shared_gate.column + 1].astype(mx.float32))
    return y + gate.astype(h.dtype) * out.astype(h.dtype)  # each op rounded to h's dtype, as mlx-lm's
