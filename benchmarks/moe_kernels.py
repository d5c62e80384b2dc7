"""Kernel time of the fused MoE launches, per launch shape, next to the gathered matvec and MLX's gather_qmm.

    python benchmarks/moe_kernels.py [--calls 40] [--json out.json]        (NVIDIA GPU: CUPTI kernel time)

For the routed experts of one token at the Qwen3-30B (8 of 128, D 2048, I 768) and Coder-Next
(10 of 512, D 2048, I 512) shapes, 4-bit g64, bf16: GPU time per call, measured as kernels.py
--mode device measures (a dependent chain of `calls` calls under CUPTI, each call on K experts of
its own, so the weights come from memory, not the L2), for
    gate_up    moe_gate_up (gate + up + SwiGLU) in plan()'s shape and in every gpu.MOE_GRID shape
    down       moe_down (down projections + weighted sum) likewise
    gathered   the down projections alone as the dense kernel's gathered form (K rows of D out)
    gather_qmm MLX's gather_qmm for the same down projections (K rows of D out)
with the weight bytes each call reads and the GB/s that makes.
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
from matvec_sweep import with_override

import kernels as kernel_bench  # benchmarks/kernels.py, beside this script
from flashmoe import kernels
from flashmoe.kernels import gpu, moe

SHAPES = [(128, 8, 2048, 768, "q30"), (512, 10, 2048, 512, "cn")]  # experts, K, D, I
GS, BITS = 64, 4


def stack(experts: int, out_dim: int, in_dim: int) -> tuple:
    w = (mx.random.normal((experts, out_dim, in_dim)) / in_dim**0.5).astype(mx.bfloat16)
    return mx.quantize(w, group_size=GS, bits=BITS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    print(f"{'shape':<5} {'launch':<10} {'launch shape':<22} {'us':>8} {'GB/s':>8}")
    for experts, k, d, inter, what in SHAPES:
        gate, up, down = stack(experts, inter, d), stack(experts, inter, d), stack(experts, d, inter)
        mx.eval(gate, up, down)
        per_expert = sum(a.nbytes for a in down) / experts  # one matrix of one expert

        def ids():
            return mx.random.permutation(experts)[:k].astype(mx.uint32)

        sets = [ids() for _ in range(args.calls)]
        rw = mx.softmax(mx.random.normal((k,)), axis=-1).astype(mx.bfloat16)
        x = mx.random.normal((1, d)).astype(mx.bfloat16)
        h = mx.random.normal((1, k, inter)).astype(mx.bfloat16)
        mx.eval(sets, rw, x, h)
        cases = {
            "gate_up": (x, 2, lambda x, e: moe.moe_gate_up(x, gate, up, e[None], bits=BITS, group_size=GS)),
            "down": (h, 1, lambda h, e: moe.moe_down(h, down, e[None], rw[None], bits=BITS, group_size=GS)),
        }
        for launch, (inp, matrices, fn) in cases.items():
            for shape in [{}] + gpu.MOE_GRID:
                us = (
                    with_override(shape, lambda: kernel_bench.device_seconds(fn, inp, sets, args.calls)) * 1e6
                )
                nbytes = matrices * k * per_expert
                rows.append(dict(what=what, launch=launch, shape=shape, us=us, gbps=nbytes / us / 1e3))
                print(f"{what:<5} {launch:<10} {json.dumps(shape):<22} {us:8.2f} {nbytes / us / 1e3:8.0f}")

        def gathered(h, e):
            return kernels.gather_dequant_matvec(h, *down, e[None], bits=BITS, group_size=GS, backend="cuda")

        def gather_qmm(h, e):
            return kernels.gather_dequant_matvec(h, *down, e[None], bits=BITS, group_size=GS, backend="mlx")

        for launch, fn in (("gathered", gathered), ("gather_qmm", gather_qmm)):
            us = kernel_bench.device_seconds(fn, h, sets, args.calls) * 1e6
            nbytes = k * per_expert
            rows.append(dict(what=what, launch=launch, shape={}, us=us, gbps=nbytes / us / 1e3))
            print(f"{what:<5} {launch:<10} {'':<22} {us:8.2f} {nbytes / us / 1e3:8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
