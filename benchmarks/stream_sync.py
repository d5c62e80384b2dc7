"""Where a streamed MoE layer's time goes: moe_layer.py's fused streamed layer taken apart.

    python benchmarks/stream_sync.py [--layers 24] [--repeats 5]

The streamed layer (moe_layer.fused_streamed_layer) does, per layer: the router matvec and route on
the device, the ids to the host (np.array: evaluates the chain so far and waits), then gate/up and
down on the buffer of the K experts read. The rows, each a chain of `layers` layers (us per layer,
median and spread, interleaved):

  no sync            the same kernels, nothing brought to the host (the resident layer on the buffer)
  sync, slot order   today (StreamedExperts since session 9): the ids to the host, the buffer in
                     routing order, so the local ids are one held array 0..K-1
  sync, upload       session 8: np.unique's inverse as the local ids, a fresh array sent every layer
  round trip only    x + 1 and np.array of one element per layer: a sync alone
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np
from moe_layer import D, chained, fused_streamed_layer, make_layer, microseconds_per_layer

from flashmoe import kernels
from flashmoe.analysis.bench import spread


def unique_upload(host_ids: np.ndarray) -> mx.array:
    """Session 8's local ids: each id's index among the sorted ids read, sent to the device."""
    return mx.array(
        np.unique(host_ids.reshape(-1), return_inverse=True)[1].reshape(host_ids.shape).astype(np.uint32)
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--distinct", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--backend", default=next((b for b in ("metal", "cuda") if kernels.backend_available(b)), "reference")
    )
    args = ap.parse_args(argv)
    layers = [make_layer(True) for _ in range(args.distinct)]
    x0 = mx.random.normal((1, D)).astype(mx.bfloat16)
    b = args.backend

    def round_trip(x, L):
        y = x + 1
        np.array(y[:, :1].astype(mx.float32))
        return y - x

    rows = {
        "no sync": lambda x, L: fused_streamed_layer(x, L, b, sync=False),
        "sync, slot order": lambda x, L: fused_streamed_layer(x, L, b),
        "sync, upload": lambda x, L: fused_streamed_layer(x, L, b, local=unique_upload),
        "round trip only": round_trip,
    }
    runners = {name: chained(fn, layers, args.layers) for name, fn in rows.items()}
    samples = microseconds_per_layer(runners, x0, args.layers, args.repeats)
    print(
        f"device {mx.default_device()}, backend {b}, bf16, {args.layers} layers per eval, {args.repeats} repeats"
    )
    for name, s in samples.items():
        print(f"{name:20s} {spread(s).median:9.1f} us/layer  ({min(s):.1f}-{max(s):.1f})")


if __name__ == "__main__":
    main()
