"""One MoE layer at Qwen3-Coder-Next width, flashmoe's fused kernels next to mlx-lm's gather_qmm path.

    python benchmarks/moe_layer.py [--layers 32] [--distinct 4] [--repeats 9] [--compiled] [--streamed]

D 2048, 512 experts, top 10 (norm_topk_prob), expert width 512, a shared expert of width 512
with a sigmoid gate; router and shared gate 8-bit g64, experts 4-bit g64, bf16 activations.
Each evaluation chains `layers` layer calls (x = x + moe(x), cycling over `distinct` weight
sets so routing and weights vary), as a decode step would: launch overhead counts. The two
paths alternate within one process; the table gives median and spread (min-max) per layer.
`--compiled` adds both paths with the chain inside mx.compile, as flashmoe's decode step runs
(Python and graph building then cost once per chain instead of once per op).

mlx path: quantized_matmul router, softmax/argpartition routing, gather_qmm gate, up, down,
silu * up, weighted sum, shared expert (3 quantized_matmul) and its gate (mlx-lm's
Qwen3NextSparseMoeBlock). fused path, as flashmoe's MoE block runs a decode token (models.moe,
SharedSlot): one 8-bit matvec for the router and the shared gate (their rows stacked at load),
then routed_gate_up (routing, the 10 experts and the shared expert as slot K, one launch) and
moe_down (the 10 experts, their weighted sum and the gated shared expert, one launch): three
launches a layer.

`--streamed` adds both paths as flashmoe's expert streaming runs them (streaming.experts,
StreamedExperts): routing on the device, the chosen ids brought to the host (one sync per MoE layer,
inherent to streaming, so these paths run uncompiled), then the experts computed on a buffer of
the K experts just read. A decode token's K ids are all different and StreamedExperts reads them in
routing order, so slot k's expert is row k of the buffer and the local ids are 0..K-1, one array
held (until session 8 the ids went through np.unique and a fresh array was sent every layer:
benchmarks/stream_sync.py times both). Disk I/O is excluded: each layer has one buffer, made at
load, that both paths read whichever ids came out, so the rows time the compute on experts that
just arrived. mlx streamed: gather_qmm over the (K, I, D) / (K, D, I) buffer with the same local
ids, the shared expert and its gate as above. fused streamed: the router matvec, moe.route, then
moe_gate_up / moe_down on the buffer and the shared expert as slot K (their shared forms), as
flashmoe's streamed MoE block runs a decode token since session 9 (MoE._streamed_with_shared).
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np

from flashmoe import kernels
from flashmoe.analysis.bench import interleaved, print_speedups, seconds_per_call, spread
from flashmoe.analysis.parity import rel_err
from flashmoe.kernels import moe

D, E, K, I = 2048, 512, 10, 512
G = 64


def q(w, bits):
    return mx.quantize(w, group_size=G, bits=bits)


def make_layer(streamed=False):
    n = lambda *s: (0.02 * mx.random.normal(s)).astype(mx.bfloat16)  # noqa: E731
    layer = dict(
        router=q(n(E, D), 8),
        sgate=q(n(1, D), 8),
        gate=q(n(E, I, D), 4),
        up=q(n(E, I, D), 4),
        down=q(n(E, D, I), 4),
        s_gate=q(n(I, D), 4),
        s_up=q(n(I, D), 4),
        s_down=q(n(D, I), 4),
    )
    # fused layout, made once at load: router + shared gate rows in one matrix (SharedSlot.router);
    # the shared expert's gate and up rows in one matrix (models.layers.Projections)
    layer["router_plus"] = tuple(mx.concatenate([a, b]) for a, b in zip(layer["router"], layer["sgate"]))
    layer["s_gate_up"] = tuple(mx.concatenate([a, b]) for a, b in zip(layer["s_gate"], layer["s_up"]))
    if streamed:  # the buffer of the K experts just read (made once: I/O is not timed)
        layer["buf_gate"], layer["buf_up"] = q(n(K, I, D), 4), q(n(K, I, D), 4)
        layer["buf_down"] = q(n(K, D, I), 4)
    mx.eval(layer)
    return layer


def qmm(x, w, bits):
    return mx.quantized_matmul(x, *w, transpose=True, group_size=G, bits=bits)


def mlx_route(x, L):
    """mlx-lm's routing: softmax, argpartition, renormalised top-K scores."""
    gates = mx.softmax(qmm(x, L["router"], 8).astype(mx.float32), axis=-1)
    inds = mx.argpartition(-gates, kth=K - 1, axis=-1)[..., :K]
    scores = mx.take_along_axis(gates, inds, axis=-1)
    return inds, scores / scores.sum(-1, keepdims=True)


def mlx_experts(x, gate, up, down, inds, scores, L):
    """gather_qmm gate, up, down over the stacks, the weighted sum, plus the gated shared expert."""
    xe = x[..., None, None, :]
    g = mx.gather_qmm(xe, *gate, rhs_indices=inds, transpose=True, group_size=G, bits=4)
    u = mx.gather_qmm(xe, *up, rhs_indices=inds, transpose=True, group_size=G, bits=4)
    h = (g * mx.sigmoid(g)) * u
    y = mx.gather_qmm(h, *down, rhs_indices=inds, transpose=True, group_size=G, bits=4).squeeze(-2)
    y = (y * scores[..., None].astype(y.dtype)).sum(-2)
    sg = qmm(x, L["s_gate"], 4)
    sh = qmm((sg * mx.sigmoid(sg)) * qmm(x, L["s_up"], 4), L["s_down"], 4)
    return y + mx.sigmoid(qmm(x, L["sgate"], 8)) * sh


def mlx_layer(x, L):
    """mlx-lm's Qwen3NextSparseMoeBlock for one token x (1, D)."""
    inds, scores = mlx_route(x, L)
    return mlx_experts(x, L["gate"], L["up"], L["down"], inds, scores, L)


SLOT_ORDER = mx.array(np.arange(K, dtype=np.uint32)[None])  # (1, K): buffer row k holds slot k's expert


def to_host(ids: mx.array) -> np.ndarray:
    """The routed ids on the host, as the expert reader needs them: one sync per MoE layer."""
    return np.array(ids)


def mlx_streamed_layer(x, L):
    """mlx_layer with the experts in a buffer of the K just read: routing, the ids to the host, gather_qmm."""
    inds, scores = mlx_route(x, L)
    to_host(inds)
    return mlx_experts(x, L["buf_gate"], L["buf_up"], L["buf_down"], SLOT_ORDER, scores, L)


def fused_layer(x, L, backend):
    """flashmoe's MoE block for a decode token: three launches."""
    kw = dict(bits=4, group_size=G, backend=backend)
    logits = kernels.dequant_matvec(x, *L["router_plus"], bits=8, group_size=G, backend=backend)  # (1, E + 1)
    h, ids, w = moe.routed_gate_up(
        x, L["gate"], L["up"], logits, K, True, **kw, shared=L["s_gate_up"], experts=E
    )  # (1, K + 1, I)
    return moe.moe_down(h, L["down"], ids, w, **kw, shared=L["s_down"], shared_gate=moe.SharedGate(logits, E))


def fused_streamed_layer(x, L, backend, local=None, sync=True):
    """The fused kernels on the buffer of the K experts just read: routing, the ids to the host,
    moe_gate_up / moe_down with the local ids (the held slot order unless `local` makes them from
    the host's ids) and the shared expert as slot K. sync=False: no ids to the host (for comparison)."""
    kw = dict(bits=4, group_size=G, backend=backend)
    logits = kernels.dequant_matvec(x, *L["router_plus"], bits=8, group_size=G, backend=backend)  # (1, E + 1)
    ids, w = moe.route(logits[..., :E], K, True, backend=backend, out_dtype=x.dtype)
    host_ids = to_host(ids) if sync else None
    local = SLOT_ORDER if local is None else local(host_ids)
    h = moe.moe_gate_up(x, L["buf_gate"], L["buf_up"], local, **kw, shared=L["s_gate_up"])
    gate = moe.SharedGate(logits, E)
    return moe.moe_down(h, L["buf_down"], local, w, **kw, shared=L["s_down"], shared_gate=gate)


def chained(fn, layers: list, depth: int):
    """x -> x after `depth` calls of x = x + fn(x, layer), cycling over `layers`, as a decode step
    chains its layers (launch overhead counts)."""

    def run(x):
        for i in range(depth):
            x = x + fn(x, layers[i % len(layers)])
        return x

    return run


def microseconds_per_layer(runners: dict, x0, depth: int, repeats: int) -> dict[str, list]:
    """Each chain's time per layer (us), the chains timed in turns (A, B, B, A...) after a warm-up."""
    return interleaved(
        {
            name: lambda run=run: 1e6 * seconds_per_call(lambda: run(x0)) / depth
            for name, run in runners.items()
        },
        repeats=repeats,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--distinct", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument(
        "--backend",
        default=next((b for b in ("metal", "cuda") if kernels.backend_available(b)), "reference"),
    )
    ap.add_argument("--compiled", action="store_true", help="also time both paths inside mx.compile")
    ap.add_argument(
        "--streamed",
        action="store_true",
        help="also time both paths on a buffer of the K experts read, ids synced to the host (no I/O)",
    )
    args = ap.parse_args(argv)
    layers = [make_layer(args.streamed) for _ in range(args.distinct)]
    x0 = mx.random.normal((1, D)).astype(mx.bfloat16)
    # agreement on one layer (bf16 both ways)
    a, b = mlx_layer(x0, layers[0]), fused_layer(x0, layers[0], args.backend)
    err = rel_err(b, a)
    if args.streamed:
        a, b = mlx_streamed_layer(x0, layers[0]), fused_streamed_layer(x0, layers[0], args.backend)
        err_streamed = rel_err(b, a)

    def chain(fn):
        return chained(fn, layers, args.layers)

    paths = {
        "mlx gather_qmm": mlx_layer,
        f"flashmoe fused ({args.backend})": lambda x, L: fused_layer(x, L, args.backend),
    }
    runners = {name: chain(fn) for name, fn in paths.items()}
    if args.compiled:
        runners.update({f"{name}, compiled": mx.compile(chain(fn)) for name, fn in paths.items()})
    streamed = {
        "mlx gather_qmm, streamed": mlx_streamed_layer,
        f"flashmoe fused ({args.backend}), streamed": lambda x, L: fused_streamed_layer(x, L, args.backend),
    }
    if args.streamed:  # uncompiled: the host sync in every layer splits the chain
        runners.update({name: chain(fn) for name, fn in streamed.items()})
    samples = microseconds_per_layer(runners, x0, args.layers, args.repeats)
    print(
        f"MoE layer D={D} E={E} K={K} I={I} + shared expert, experts 4-bit g64, router 8-bit, bf16; "
        f"{args.layers} layers per eval, {args.repeats} repeats; rel diff of outputs {err:.2e}"
    )
    if args.streamed:
        print(
            f"streamed: experts in a buffer of the {K} read, ids synced "
            f"to the host every layer, no disk I/O; rel diff of outputs {err_streamed:.2e}"
        )
    print_speedups(samples, "mlx gather_qmm", "us/layer")
    if args.compiled:
        mlx_c, ours_c = (spread(samples[f"{name}, compiled"]).median for name in paths)
        print(f"compiled, flashmoe fused against gather_qmm: {mlx_c / ours_c:.2f}x")
    if args.streamed:
        mlx_s, ours_s = (spread(samples[name]).median for name in streamed)
        print(f"streamed, flashmoe fused against gather_qmm: {mlx_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
